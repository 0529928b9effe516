"""Typed configuration of the REFUEL agent (``conf/refuel.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.common.config import ConfigError, EvalSettings, OptimSettings, SamplingSettings, check, check_common
from agents.common.policy import PolicySettings
from dialogue_gym.config import EnvConfig


@dataclass
class RefuelConfig:
    """REFUEL settings. Reference values (Llama-3-8B, 8xH100): +experiment=refuel_paper and docs/agents/refuel.md."""

    env: EnvConfig = field(default_factory=EnvConfig)  # the environment (embedded default; +env=NAME)
    policy: PolicySettings = field(default_factory=PolicySettings)  # model trained, LoRA or full
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # policy sampling (REFUEL: T=0.8)
    optim: OptimSettings = field(default_factory=OptimSettings)  # AdamW + cosine schedule
    eval: EvalSettings = field(default_factory=EvalSettings)  # held-out evaluation before/after training
    seed: int = 0  # seeds rollouts, turn sampling, LoRA init and minibatch order
    iterations: int = 2  # REFUEL iterations t (pi_t <- pi_theta after each)
    dialogues: int = 16  # dialogues rolled in per iteration (one pair each, fewer after filtering)
    rollout_batch: int = 0  # dialogues per vector-env batch (0: all at once); must divide dialogues
    eta: float = 1.0  # reward-difference scale in the regression target (reference: 1e3 with raw ArmoRM)
    turn_sampling: str = "reference"  # reference: H' ~ U{1..H}, h ~ U{1..H'}; uniform: h ~ U{1..H}, H' = H
    future_samples: int = 1  # m: each turn-h reply's Q is the mean final score of m continuations (CollabLLM)
    resume: bool = False  # continue from <run_dir>/checkpoints/last when present
    stop_after: int = 0  # stop (as if interrupted) after this many iterations of this process; 0 = never
    run_dir: str = "."  # output directory (Hydra's run dir)
    export: bool = True  # save the final policy (LoRA merged) to <run_dir>/policy


def validate(cfg: RefuelConfig) -> None:
    """Range checks at start-up, before any model loads."""
    check_common(cfg.env, cfg.policy, cfg.sampling, cfg.optim)
    check(cfg.eta > 0, f"eta must be > 0, got {cfg.eta}")
    check(cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}")
    check(cfg.dialogues >= 1, f"dialogues must be >= 1, got {cfg.dialogues}")
    check(cfg.rollout_batch >= 0 and (cfg.rollout_batch == 0 or cfg.dialogues % cfg.rollout_batch == 0),
          f"rollout_batch must be 0 or divide dialogues ({cfg.dialogues}), got {cfg.rollout_batch}")
    check(cfg.turn_sampling in ("reference", "uniform"),
          f"turn_sampling is {cfg.turn_sampling!r}; allowed: reference, uniform")
    check(cfg.eval.dialogues >= 1, f"eval.dialogues must be >= 1, got {cfg.eval.dialogues}")
    check(cfg.future_samples >= 1, f"future_samples (m, continuations per reply) must be >= 1, got "
                                   f"{cfg.future_samples}")


__all__ = ["ConfigError", "RefuelConfig", "validate"]
