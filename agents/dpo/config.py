"""Typed configuration of the DPO agent (``conf/dpo.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agents.common.branching import PREFIXES
from agents.common.config import ConfigError, EvalSettings, OptimSettings, SamplingSettings, check, check_common
from agents.common.pairs import TURN_MODES
from agents.common.policy import PolicySettings
from dialogue_gym.config import EnvConfig

MODES = ("offline", "online")
SOURCES = ("task", "file", "hub")
REFERENCES = ("sft", "previous")


@dataclass
class DataSettings:
    """Where offline DPO's fixed preference pairs come from (``mode=offline`` only; online mode ignores it)."""

    source: str = "task"  # task: n replies per task row from the initial policy, env-scored; file: path; hub: hub_id
    path: str | None = None  # JSON-lines file, one {"context": [messages], "chosen": str, "rejected": str} per line
    hub_id: str | None = None  # hub dataset id read with `datasets` (source=hub; needs network or a cached copy)
    hub_split: str = "train"  # split of the hub dataset
    max_pairs: int = 0  # keep the first max_pairs pairs of the file or hub data set; 0 = all
    prefix: str = "dataset"  # source=task: dataset (the rows' own prefixes) or on_policy (the initial policy rolls
    # in to the turn drawn by turn_sampling; with turn_sampling=last: the paper's last-turn DPO baseline)


@dataclass
class DpoConfig:
    """DPO settings. Reference values (RLHF Workflow, Llama-3-8B, full fine-tuning): docs/agents/dpo.md."""

    mode: str = "online"  # offline: fixed pairs (data.*); online: iterative, pairs sampled through the env
    env: EnvConfig = field(default_factory=EnvConfig)  # the environment (embedded default; +env=NAME)
    policy: PolicySettings = field(default_factory=PolicySettings)  # model trained, LoRA or full
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=1.0))  # recipe: T=1.0
    # AdamW + cosine; batch_size counts pairs
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-5, warmup_ratio=0.03, epochs=2))
    eval: EvalSettings = field(default_factory=EvalSettings)  # held-out evaluation before/after training
    data: DataSettings = field(default_factory=DataSettings)  # offline preference data
    seed: int = 0  # seeds rollouts, turn sampling, LoRA init and minibatch order
    iterations: int = 3  # online: DPO iterations (warm-started); offline: passes over the fixed pairs
    dialogues: int = 16  # online: contexts per iteration; offline source=task: task rows sampled (a pair each)
    rollout_batch: int = 0  # contexts per vector-env batch (0: all at once); must divide dialogues
    n: int = 8  # replies sampled per context; best vs worst become the pair (recipe: 8)
    steps: int = 0  # optimizer steps per iteration, exactly: minibatches cycle through reshuffled passes over the
    # pairs until this many (0: optim.epochs passes). Fixes the update's size whatever the pair count after ties
    # are dropped, so arms can be compared at equal optimizer steps (the leaderboard's fair arms)
    beta: float = 0.1  # DPO's KL strength β (recipe: 0.1)
    label_smoothing: float = 0.0  # cDPO: probability that a label is flipped, in [0, 0.5) (recipe code: 0.1)
    length_penalty: float = 0.0  # λ: pairs ranked by reward - λ * characters (recipe's concise variant: 0.001)
    future: bool = False  # online: score each branch at its horizon H' (REFUEL-style); false: immediate reward
    future_samples: int = 1  # m, with future=true: each reply scored by the mean of m continuations (CollabLLM)
    turn_sampling: str = "reference"  # turn h: reference (H' ~ U{1..H}, h ~ U{1..H'}), uniform, or last (h = H)
    reference: str = "sft"  # sft: the initial policy; previous: the last iterate (log-probs once per iteration)
    resume: bool = False  # continue from <run_dir>/checkpoints/last when present
    stop_after: int = 0  # stop (as if interrupted) after this many iterations of this process; 0 = never
    run_dir: str = "."  # output directory (Hydra's run dir)
    export: bool = True  # save the final policy (LoRA merged) to <run_dir>/policy


def validate(cfg: DpoConfig) -> None:
    """Range checks at start-up, before any model loads."""
    check(cfg.mode in MODES, f"mode is {cfg.mode!r}; allowed: {', '.join(MODES)}")
    check_common(cfg.env, cfg.policy, cfg.sampling, cfg.optim)
    check(cfg.beta > 0, f"beta must be > 0 (DPO's KL strength; recipe 0.1), got {cfg.beta}")
    check(0 <= cfg.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    check(cfg.n >= 2, f"n (replies sampled per context) must be >= 2 to make a pair, got {cfg.n}")
    check(cfg.length_penalty >= 0, f"length_penalty must be >= 0, got {cfg.length_penalty}")
    check(cfg.iterations >= 1, f"iterations must be >= 1, got {cfg.iterations}")
    check(cfg.dialogues >= 1, f"dialogues must be >= 1, got {cfg.dialogues}")
    check(cfg.steps >= 0, f"steps (optimizer steps per iteration) must be >= 0 (0: optim.epochs passes), got "
                          f"{cfg.steps}")
    check(cfg.rollout_batch >= 0 and (cfg.rollout_batch == 0 or cfg.dialogues % cfg.rollout_batch == 0),
          f"rollout_batch must be 0 or divide dialogues ({cfg.dialogues}), got {cfg.rollout_batch}")
    check(cfg.turn_sampling in TURN_MODES, f"turn_sampling is {cfg.turn_sampling!r}; allowed: {', '.join(TURN_MODES)}")
    check(cfg.reference in REFERENCES, f"reference is {cfg.reference!r}; allowed: {', '.join(REFERENCES)}")
    check(cfg.eval.dialogues >= 1, f"eval.dialogues must be >= 1, got {cfg.eval.dialogues}")
    check(cfg.stop_after >= 0, f"stop_after must be >= 0 (0 = never), got {cfg.stop_after}")
    check(cfg.future_samples >= 1, f"future_samples (m, continuations per reply) must be >= 1, got "
                                   f"{cfg.future_samples}")
    check(cfg.future_samples == 1 or (cfg.mode == "online" and cfg.future),
          f"future_samples={cfg.future_samples} needs mode=online and future=true (the continuations it averages); "
          "set future_samples=1")
    if cfg.mode == "offline":
        check(cfg.reference == "sft", "reference=previous needs mode=online (offline DPO keeps the initial policy "
                                      "as its reference)")
        d = cfg.data
        check(d.source in SOURCES, f"data.source is {d.source!r}; allowed: {', '.join(SOURCES)}")
        check(d.max_pairs >= 0, f"data.max_pairs must be >= 0 (0 = all), got {d.max_pairs}")
        check(d.prefix in PREFIXES, f"data.prefix is {d.prefix!r}; allowed: {', '.join(PREFIXES)}")
        if d.source == "file":
            check(bool(d.path), "data.source=file needs data.path: a JSON-lines file of {\"context\": [...], "
                                "\"chosen\": str, \"rejected\": str} records")
            check(Path(str(d.path)).expanduser().is_file(), f"data.path {d.path!r} is not a file")
        if d.source == "hub":
            check(bool(d.hub_id), "data.source=hub needs data.hub_id (a hub dataset id, read with `datasets`)")


__all__ = ["ConfigError", "DataSettings", "DpoConfig", "validate"]
