"""Typed configuration of the Stable-Baselines3 agent (``conf/sb3.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.common.config import ConfigError, check, check_env
from dialogue_gym.config import EnvConfig

ALGOS = ("ppo", "a2c", "dqn")
WRAPPERS = ("choice", "token")


@dataclass
class ChoiceSettings:
    """The candidate-choice wrapper (``wrapper=choice``)."""

    model: str = "embedded"  # the frozen engine that proposes candidates and computes the features
    k: int = 4  # candidate replies per turn (the action space is Discrete(k))
    temperature: float = 0.7  # candidates' sampling temperature
    top_p: float = 1.0  # candidates' nucleus mass
    max_new_tokens: int = 32  # candidates' length cap in tokens
    max_context_tokens: int = 256  # the conversation's features read its last this many tokens
    net_arch: list[int] = field(default_factory=lambda: [64, 64])  # hidden layers of the MLP policy/Q-network


@dataclass
class TokenSettings:
    """The token-level wrapper (``wrapper=token``): the policy is a causal LM acting one token per step."""

    model: str = "tiny"  # the LM trained as the policy (its tokenizer defines the action space)
    window: int = 128  # observation length in tokens
    max_reply_tokens: int = 16  # a reply reaching this many tokens ends the turn


@dataclass
class Sb3EvalSettings:
    """Held-out evaluation: the first ``dialogues`` test rows, fixed seeds, deterministic actions."""

    dialogues: int = 32  # test rows (the first n of the test split), played all at once
    seed: int = 1234  # dialogue and candidate seeds (row i gets seed + i): both policies see the same candidates
    success_threshold: float = 1.0  # a dialogue is solved when its return reaches this (arithmetic verifier: 1)
    n_boot: int = 2000  # bootstrap resamples over test rows for the 95% intervals


@dataclass
class Sb3Config:
    """Stable-Baselines3 (PPO, A2C, DQN) on the numeric wrappers of the dialogue env."""

    env: EnvConfig = field(default_factory=EnvConfig)  # the environment (embedded default; +env=NAME)
    algo: str = "ppo"  # ppo, a2c or dqn (dqn: wrapper=choice only)
    wrapper: str = "choice"  # choice (Discrete(K) over candidate replies) or token (Discrete(vocab), one token a step)
    choice: ChoiceSettings = field(default_factory=ChoiceSettings)  # settings of wrapper=choice
    token: TokenSettings = field(default_factory=TokenSettings)  # settings of wrapper=token
    eval: Sb3EvalSettings = field(default_factory=Sb3EvalSettings)  # held-out evaluation after training
    num_envs: int = 4  # sub-envs of the one batched env (one user and one reward call per step for all)
    total_timesteps: int = 96  # environment steps in all (summed over sub-envs)
    n_steps: int = 8  # ppo/a2c: steps per sub-env per rollout (the update batch is n_steps * num_envs)
    batch_size: int = 16  # ppo minibatch / dqn batch size
    n_epochs: int = 4  # ppo: passes over each rollout
    learning_rate: float = 3e-4  # optimizer learning rate
    gamma: float = 0.99  # discount over steps
    ent_coef: float = 0.01  # ppo/a2c entropy bonus
    learning_starts: int = 32  # dqn: steps of random actions before learning
    exploration_fraction: float = 0.5  # dqn: share of training over which epsilon decays to its final value
    seed: int = 0  # seeds SB3, the training dialogues and the candidates
    device: str = "cpu"  # torch device of the SB3 policy
    run_dir: str = "."  # output directory (Hydra's run dir)


def validate(cfg: Sb3Config) -> None:
    """Range checks at start-up, before any model loads."""
    check(cfg.algo in ALGOS, f"algo is {cfg.algo!r}; allowed: {', '.join(ALGOS)}")
    check(cfg.wrapper in WRAPPERS, f"wrapper is {cfg.wrapper!r}; allowed: {', '.join(WRAPPERS)}")
    check(not (cfg.algo == "dqn" and cfg.wrapper == "token"),
          "algo=dqn needs wrapper=choice (a Q-network over a 49k-token action space is not offered)")
    check_env(cfg.env)
    for name in ("num_envs", "total_timesteps", "n_steps", "batch_size", "n_epochs"):
        check(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    check(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}")
    check(0 < cfg.gamma <= 1, f"gamma must be in (0, 1], got {cfg.gamma}")
    check(cfg.choice.k >= 2, f"choice.k must be >= 2 (a choice needs candidates), got {cfg.choice.k}")
    check(cfg.choice.temperature > 0, f"choice.temperature must be > 0 (candidates must differ), got "
                                      f"{cfg.choice.temperature}")
    check(cfg.choice.max_new_tokens >= 1, f"choice.max_new_tokens must be >= 1, got {cfg.choice.max_new_tokens}")
    check(cfg.token.window >= 8, f"token.window must be >= 8, got {cfg.token.window}")
    check(cfg.token.max_reply_tokens >= 1, f"token.max_reply_tokens must be >= 1, got {cfg.token.max_reply_tokens}")
    check(cfg.eval.dialogues >= 1, f"eval.dialogues must be >= 1, got {cfg.eval.dialogues}")
    check(cfg.eval.n_boot >= 100, f"eval.n_boot must be >= 100, got {cfg.eval.n_boot}")


__all__ = ["ConfigError", "Sb3Config", "validate"]
