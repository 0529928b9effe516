"""Typed configuration of the PPO agent (``conf/ppo.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.common.config import ConfigError, EvalSettings, OptimSettings, SamplingSettings, check, check_common
from agents.common.policy import PolicySettings
from dialogue_gym.config import EnvConfig

CRITICS = ("shared", "separate")


@dataclass
class PpoConfig:
    """Token-level PPO settings (common LM-PPO values: γ 1, λ 0.95, clip 0.2, value clip 0.2, KL 0.05)."""

    env: EnvConfig = field(default_factory=EnvConfig)  # the environment; env.reward_mode sets where scores land
    policy: PolicySettings = field(default_factory=PolicySettings)  # model trained, LoRA or full
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # policy sampling; log-probs use its T
    # batch_size: dialogues per minibatch; epochs: PPO epochs over each iteration's rollouts
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-5, epochs=2))
    eval: EvalSettings = field(default_factory=EvalSettings)  # held-out evaluation before/after training
    seed: int = 0  # seeds rollouts, LoRA and value-head init, minibatch order
    iterations: int = 4  # rollout batches, each followed by optim.epochs PPO epochs
    dialogues: int = 16  # full dialogues rolled out per iteration (train split)
    rollout_batch: int = 0  # dialogues per vector-env batch (0: all at once); must divide dialogues
    critic: str = "shared"  # shared: value head on the policy's decoder; separate: its own model + value head
    critic_model: str | None = None  # the separate critic's model (None = policy.model); same LoRA settings
    gamma: float = 1.0  # discount per action token
    lam: float = 0.95  # GAE λ
    clip: float = 0.2  # policy ratio clip
    vf_clip: float | None = 0.2  # value clip around the rollout's values (null: unclipped); scale to the reward
    vf_coef: float = 0.1  # weight of the value loss in the joint loss
    kl_coef: float = 0.05  # initial (or fixed) per-token KL penalty β to the reference policy
    kl_target: float | None = None  # adaptive β toward this per-dialogue KL in nats (reference 6.0); null: fixed
    kl_horizon: float = 10000.0  # adaptive controller horizon, in dialogues
    whiten_advantages: bool = True  # normalise advantages over the batch's action tokens
    resume: bool = False  # continue from <run_dir>/checkpoints/last when present
    stop_after: int = 0  # stop (as if interrupted) after this many iterations of this process; 0 = never
    run_dir: str = "."  # output directory (Hydra's run dir)
    export: bool = True  # save the final policy (LoRA merged) to <run_dir>/policy


def validate(cfg: PpoConfig) -> None:
    """Range checks at start-up, before any model loads."""
    check_common(cfg.env, cfg.policy, cfg.sampling, cfg.optim)
    check(cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}")
    check(cfg.dialogues >= 1, f"dialogues must be >= 1, got {cfg.dialogues}")
    check(cfg.rollout_batch >= 0 and (cfg.rollout_batch == 0 or cfg.dialogues % cfg.rollout_batch == 0),
          f"rollout_batch must be 0 or divide dialogues ({cfg.dialogues}), got {cfg.rollout_batch}")
    check(cfg.critic in CRITICS, f"critic is {cfg.critic!r}; allowed: {', '.join(CRITICS)}")
    check(cfg.critic_model is None or cfg.critic == "separate",
          f"critic_model={cfg.critic_model!r} needs critic=separate (the shared critic is the policy's decoder)")
    check(0 <= cfg.gamma <= 1, f"gamma must be in [0, 1], got {cfg.gamma}")
    check(0 <= cfg.lam <= 1, f"lam must be in [0, 1], got {cfg.lam}")
    check(cfg.clip > 0, f"clip must be > 0, got {cfg.clip}")
    check(cfg.vf_clip is None or cfg.vf_clip > 0, f"vf_clip must be > 0 or null (no clipping), got {cfg.vf_clip}")
    check(cfg.vf_coef > 0, f"vf_coef must be > 0, got {cfg.vf_coef}")
    check(cfg.kl_coef >= 0, f"kl_coef must be >= 0 (0 = no KL penalty), got {cfg.kl_coef}")
    check(cfg.kl_target is None or cfg.kl_target > 0, f"kl_target must be > 0 or null (fixed kl_coef), "
                                                      f"got {cfg.kl_target}")
    check(cfg.kl_horizon > 0, f"kl_horizon must be > 0, got {cfg.kl_horizon}")
    check(cfg.eval.dialogues >= 1, f"eval.dialogues must be >= 1, got {cfg.eval.dialogues}")
    check(cfg.stop_after >= 0, f"stop_after must be >= 0 (0 = never), got {cfg.stop_after}")


__all__ = ["ConfigError", "PpoConfig", "validate"]
