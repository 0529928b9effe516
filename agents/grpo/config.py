"""Typed configuration of the GRPO agent (``conf/grpo.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.common.config import ConfigError, EvalSettings, OptimSettings, SamplingSettings, check, check_common
from agents.common.grpo_losses import BASELINES, NORMALIZATIONS, SCALES
from agents.common.pairs import TURN_MODES
from agents.common.policy import PolicySettings
from dialogue_gym.config import EnvConfig

CREDITS = ("turn", "trajectory")
OLD_LOGPROBS = ("recompute", "engine")


@dataclass
class GrpoConfig:
    """GRPO / RLOO / Dr. GRPO settings (DeepSeekMath's values: G = 64, clip 0.2, β = 0.04, lr 1e-6 full FT)."""

    env: EnvConfig = field(default_factory=EnvConfig)  # the environment (embedded default; +env=NAME)
    policy: PolicySettings = field(default_factory=PolicySettings)  # model trained, LoRA or full
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=1.0))  # T = 1, as
    # conf/grpo.yaml (DeepSeekMath); the common default is 0.8
    optim: OptimSettings = field(default_factory=OptimSettings)  # AdamW + cosine; batch_size counts group members
    eval: EvalSettings = field(default_factory=EvalSettings)  # held-out evaluation before/after training
    seed: int = 0  # seeds rollouts, turn sampling, LoRA init and minibatch order
    iterations: int = 2  # GRPO iterations (the sampling policy is refreshed after each)
    dialogues: int = 4  # groups per iteration: one opening (trajectory) or one state s_h (turn) each
    group_size: int = 4  # G: samples per group (DeepSeekMath: 64)
    credit: str = "turn"  # turn: G replies forked at s_h, only turn-h tokens trained; trajectory: G whole dialogues
    baseline: str = "mean"  # mean: the group mean (GRPO); loo: the mean of the other G - 1 (RLOO)
    scale: str = "std"  # std: divide by the group's std (GRPO); none: raw centred returns (Dr. GRPO, RLOO)
    normalization: str = "token"  # token: every action token weighs the same; sequence: each reply's token mean
    steps: int = 0  # optimizer steps per iteration, exactly: minibatches of optim.batch_size members cycle through
    # reshuffled passes until this many (0: optim.epochs passes). Tied groups are dropped, so with epochs alone the
    # step count varies; a fixed count lets the leaderboard give GRPO the other arms' steps with small minibatches
    clip: float = 0.2  # ratio clip epsilon of the surrogate (DeepSeekMath: 0.2)
    beta: float = 0.0  # k3 KL coefficient to the initial policy (DeepSeekMath: 0.04; 0: no reference pass)
    old_logprobs: str = "recompute"  # recompute: one trainer pass before the update; engine: the sampler's own
    future_samples: int = 1  # m: credit=turn scores a reply by the mean final score of m continuations (CollabLLM)
    turn_sampling: str = "reference"  # credit=turn: reference (H' ~ U{1..H}, h ~ U{1..H'}) or uniform (h ~ U, H' = H)
    rollout_batch: int = 0  # groups per vector-env batch (0: all of this process's at once); must divide dialogues
    resume: bool = False  # continue from <run_dir>/checkpoints/last when present
    stop_after: int = 0  # stop (as if interrupted) after this many iterations of this process; 0 = never
    run_dir: str = "."  # output directory (Hydra's run dir)
    export: bool = True  # save the final policy (LoRA merged) to <run_dir>/policy


def validate(cfg: GrpoConfig) -> None:
    """Range checks at start-up, before any model loads (a ConfigError names the field and what is allowed)."""
    check(cfg.credit in CREDITS, f"credit is {cfg.credit!r}; allowed: {', '.join(CREDITS)}")
    check(cfg.steps >= 0, f"steps (optimizer steps per iteration) must be >= 0 (0: optim.epochs passes), got "
                          f"{cfg.steps}")
    check(cfg.baseline in BASELINES, f"baseline is {cfg.baseline!r}; allowed: {', '.join(BASELINES)}")
    check(cfg.scale in SCALES, f"scale is {cfg.scale!r}; allowed: {', '.join(SCALES)}")
    check(cfg.normalization in NORMALIZATIONS,
          f"normalization is {cfg.normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
    check(cfg.old_logprobs in OLD_LOGPROBS, f"old_logprobs is {cfg.old_logprobs!r}; allowed: {', '.join(OLD_LOGPROBS)}")
    check(cfg.turn_sampling in TURN_MODES, f"turn_sampling is {cfg.turn_sampling!r}; allowed: {', '.join(TURN_MODES)}")
    check_common(cfg.env, cfg.policy, cfg.sampling, cfg.optim)
    check(cfg.group_size >= 2, f"group_size (G, samples per group) must be >= 2 for a group baseline, got "
                               f"{cfg.group_size}")
    check(cfg.future_samples >= 1, f"future_samples (m, continuations per reply) must be >= 1, got "
                                   f"{cfg.future_samples}")
    check(cfg.future_samples == 1 or cfg.credit == "turn",
          f"future_samples={cfg.future_samples} needs credit=turn (a trajectory's return is already its own final "
          "score); set future_samples=1 or credit=turn")
    check(cfg.clip > 0, f"clip must be > 0, got {cfg.clip}")
    check(cfg.beta >= 0, f"beta must be >= 0 (0: no KL to the reference), got {cfg.beta}")
    check(cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}")
    check(cfg.dialogues >= 1, f"dialogues (groups per iteration) must be >= 1, got {cfg.dialogues}")
    check(cfg.rollout_batch >= 0 and (cfg.rollout_batch == 0 or cfg.dialogues % cfg.rollout_batch == 0),
          f"rollout_batch must be 0 or divide dialogues ({cfg.dialogues}), got {cfg.rollout_batch}")
    check(cfg.eval.dialogues >= 1, f"eval.dialogues must be >= 1, got {cfg.eval.dialogues}")
    check(cfg.stop_after >= 0, f"stop_after must be >= 0 (0 = never), got {cfg.stop_after}")
    check_budget(cfg)


def group_cost(cfg: GrpoConfig) -> int:
    """The fewest policy samples (assistant turns the env steps) one group can cost: G replies, each with its m
    continuations (credit=turn at h = H' = 1; a trajectory group's G dialogues of at least one turn)."""
    return cfg.group_size * cfg.future_samples


def check_budget(cfg: GrpoConfig) -> None:
    """Under an active training budget (the leaderboard's, :mod:`dialogue_gym.budget`), one group must fit in what
    is left of ``policy_samples``: a budget smaller than one group could never pay for an update."""
    from dialogue_gym.budget import active_budget

    budget = active_budget()
    if budget is None or budget.policy_samples is None or "train" not in budget.limited_splits:
        return
    left = budget.policy_samples - budget.usage("train").policy_samples
    check(left >= group_cost(cfg),
          f"the training budget has {left} policy samples left, less than one group costs "
          f"(group_size {cfg.group_size} x future_samples {cfg.future_samples} = {group_cost(cfg)}): raise the "
          "budget's policy_samples or lower group_size / future_samples")


__all__ = ["CREDITS", "ConfigError", "GrpoConfig", "group_cost", "validate"]
