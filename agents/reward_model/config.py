"""Typed configuration of the reward-model trainer (``conf/reward_model.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agents.common.config import (
    ConfigError,
    EvalSettings,
    OptimSettings,
    SamplingSettings,
    check,
    check_env,
    check_placement,
)
from agents.common.policy import PolicySettings
from dialogue_gym.config import EnvConfig

KINDS = ("bt", "pairwise")
SOURCES = ("task", "file", "hub")


@dataclass
class DataSettings:
    """Where the (context, chosen, rejected) pairs come from."""

    source: str = "task"  # task: sample replies to task rows, pair them by the env's reward; file: path; hub: hub_id
    path: str | None = None  # JSON-lines {"context": [messages], "chosen": str, "rejected": str} (source=file)
    eval_path: str | None = None  # held-out pairs in the same layout (file/hub); None: hold out test_fraction
    hub_id: str | None = None  # hub preference data set read with `datasets` (source=hub; needs network or a cache)
    hub_split: str = "train"  # split of the hub data set
    max_pairs: int = 0  # keep at most this many training pairs (file/hub: the first ones); 0 = all
    test_fraction: float = 0.1  # file/hub without eval_path: share of pairs held out (the last ones)
    generator: str = "${policy.model}"  # source=task: the model that samples the replies (default: the backbone)
    n: int = 8  # source=task: replies sampled per task row (temperature from sampling.temperature)
    pairs_per_row: int = 4  # source=task: at most this many pairs per task row
    min_gap: float = 0.5  # source=task: a pair needs score(chosen) - score(rejected) >= min_gap under the env reward
    reference_chosen: bool = True  # source=task: a row with no winning sample pairs its reference reply (profile
    # "reference", or "The answer is <answer>." when the profile has an "answer") against its losing samples
    generation_batch_size: int = 64  # source=task: prompts per generate call


@dataclass
class RewardModelConfig:
    """Reward-model training. Reference values (RLHF Workflow, Llama-3-8B): docs/agents/reward_models.md."""

    kind: str = "bt"  # bt: Bradley-Terry sequence classifier; pairwise: causal LM answering "A" or "B"
    env: EnvConfig = field(default_factory=EnvConfig)  # task rows and the reward that labels pairs (source=task)
    policy: PolicySettings = field(default_factory=PolicySettings)  # the backbone trained, LoRA or full (lora_r=0)
    # how data.generator samples (recipe T=1)
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=1.0))
    # AdamW + cosine; batch_size counts pairs
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(weight_decay=0.0, max_length=512))
    # eval.dialogues: held-out test rows; eval.every: steps
    eval: EvalSettings = field(default_factory=lambda: EvalSettings(dialogues=64))
    data: DataSettings = field(default_factory=DataSettings)  # pair source
    seed: int = 0  # seeds sampling, the head and LoRA initialisation, and minibatch order
    iterations: int = 1  # passes over the training pairs, each optim.epochs epochs (as DPO's offline mode)
    dialogues: int = 64  # source=task: train rows whose replies are sampled and paired
    trainable_layers: int = 0  # train only the top k decoder layers (and the head); 0 = all layers
    run_dir: str = "."  # output directory (Hydra's run dir)
    export: bool = True  # save the trained model (LoRA merged) to <run_dir>/reward_model


def validate(cfg: RewardModelConfig) -> None:
    """Range checks at start-up, before any model loads."""
    check(cfg.kind in KINDS, f"kind is {cfg.kind!r}; allowed: {', '.join(KINDS)}")
    check_placement("policy", cfg.policy.device, cfg.policy.dtype)
    check_env(cfg.env)
    check(cfg.policy.lora_r >= 0, f"policy.lora_r must be >= 0 (0 = full fine-tuning), got {cfg.policy.lora_r}")
    check(cfg.sampling.temperature > 0, f"sampling.temperature must be > 0 to sample distinct replies, got "
                                        f"{cfg.sampling.temperature}")
    o = cfg.optim
    check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    check(o.batch_size >= 1 and o.micro_batch_size >= 1, "optim.batch_size and optim.micro_batch_size must be >= 1")
    check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    check(o.max_length >= 16, f"optim.max_length must be >= 16 tokens, got {o.max_length}")
    check(cfg.iterations >= 1, f"iterations (passes over the pairs) must be >= 1, got {cfg.iterations}")
    check(cfg.trainable_layers >= 0, f"trainable_layers must be >= 0 (0 = all), got {cfg.trainable_layers}")
    check(cfg.eval.every >= 0, f"eval.every must be >= 0 (0 = before and after training only), got {cfg.eval.every}")
    d = cfg.data
    check(d.source in SOURCES, f"data.source is {d.source!r}; allowed: {', '.join(SOURCES)}")
    check(d.max_pairs >= 0, f"data.max_pairs must be >= 0 (0 = all), got {d.max_pairs}")
    if d.source == "task":
        check(cfg.dialogues >= 1, f"dialogues (train rows sampled) must be >= 1, got {cfg.dialogues}")
        check(cfg.eval.dialogues >= 1, f"eval.dialogues (held-out test rows) must be >= 1, got {cfg.eval.dialogues}")
        check(d.n >= 2, f"data.n (replies sampled per row) must be >= 2 to make a pair, got {d.n}")
        check(d.pairs_per_row >= 1, f"data.pairs_per_row must be >= 1, got {d.pairs_per_row}")
        check(d.min_gap > 0, f"data.min_gap must be > 0 (pairs need a preference), got {d.min_gap}")
        check(d.generation_batch_size >= 1, f"data.generation_batch_size must be >= 1, got {d.generation_batch_size}")
    else:
        check(0 < d.test_fraction < 1 or d.eval_path is not None,
              f"data.test_fraction must be in (0, 1) when no data.eval_path is given, got {d.test_fraction}")
    if d.source == "file":
        check(bool(d.path), "data.source=file needs data.path: a JSON-lines file of {\"context\": [...], "
                            "\"chosen\": str, \"rejected\": str} records")
        check(Path(str(d.path)).expanduser().is_file(), f"data.path {d.path!r} is not a file")
    if d.source == "hub":
        check(bool(d.hub_id), "data.source=hub needs data.hub_id (a hub preference data set, read with `datasets`)")
    if d.eval_path is not None:
        check(Path(str(d.eval_path)).expanduser().is_file(), f"data.eval_path {d.eval_path!r} is not a file")


__all__ = ["ConfigError", "DataSettings", "KINDS", "RewardModelConfig", "SOURCES", "validate"]
