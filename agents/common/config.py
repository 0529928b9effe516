"""Typed config schemas shared by the agents, and helpers to build envs and validate a Hydra config early.

Each agent's Hydra config (``conf/<agent>.yaml``) is merged over its dataclass schema, so a misspelt key or a
wrong type is an error before any model loads; :func:`check` then validates ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from agents.common.policy import PolicySettings
from dialogue_gym.config import EnvConfig, EnvConfigError


class ConfigError(ValueError):
    """A bad setting, found at start-up before any model loads."""


# The env node of every agent's schema is the env's own config (fields, defaults, docs and checks in one place).
# ``EnvSettings`` is the name this module used before; kept so code written against it still imports.
EnvSettings = EnvConfig


@dataclass
class SamplingSettings:
    """How the policy samples its replies."""

    temperature: float = 0.8  # policy sampling temperature; log-probs are computed at the same temperature
    top_p: float = 1.0  # nucleus mass
    max_new_tokens: int = 64  # reply length cap in tokens (the policy's engine is policy.engine)


@dataclass
class OptimSettings:
    """AdamW with cosine decay and linear warm-up (REFUEL reference: lr 3e-7, betas (0.9, 0.95), wd 1e-6)."""

    lr: float = 1e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    weight_decay: float = 1e-6  # AdamW weight decay
    warmup_ratio: float = 0.1  # share of all optimizer steps spent warming up
    batch_size: int = 8  # pairs (or sequences) per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation up to batch_size)
    epochs: int = 1  # passes over each iteration's data
    max_grad_norm: float = 1.0  # gradient clipping
    max_length: int = 1024  # longest training sequence in tokens (prompts are cut from the left)


@dataclass
class EvalSettings:
    """In-run evaluation on held-out states with fixed user seeds."""

    dialogues: int = 16  # rows evaluated (the first n of the split)
    split: str = "test"  # the rows evaluated: test, or validation for choices made by looking at results
    seed: int = 1234  # user and policy seeds of every evaluation
    temperature: float = 0.0  # policy temperature at evaluation (0 = greedy)
    every: int = 0  # evaluate every k iterations as well (0: only before and after training)
    reward_mode: str = "per_turn"  # evaluation scores every turn


def merge_schema(cfg: DictConfig, schema: type) -> Any:
    """Merge a Hydra config over a dataclass schema and return the typed object.

    Raises:
        ConfigError: unknown key or wrong type, naming the key.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf's errors carry the key; keep the message, drop the traceback noise
        key = getattr(e, "full_key", None)
        where = f" at '{key}'" if key else ""
        raise ConfigError(f"bad configuration{where}: {str(e).splitlines()[0]}") from None


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def env_kwargs(env: EnvConfig, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``gym.make_vec`` from the env settings (None entries = task defaults)."""
    kw = {k: v for k, v in vars(env).items() if v is not None}
    kw["task_kwargs"] = dict(env.task_kwargs)
    kw.update(overrides)
    return kw


def check_common(env: EnvConfig, policy: PolicySettings, sampling: SamplingSettings, optim: OptimSettings) -> None:
    """Range checks shared by every agent (before any model loads)."""
    check_placement("policy", policy.device, policy.dtype)
    check_env(env)
    check(policy.lora_r >= 0, f"policy.lora_r must be >= 0 (0 = full fine-tuning), got {policy.lora_r}")
    check(sampling.temperature > 0, f"sampling.temperature must be > 0 for on-policy sampling, got "
                                    f"{sampling.temperature}")
    check_policy_engine(policy, sampling)
    check(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    check(optim.batch_size >= 1 and optim.micro_batch_size >= 1, "optim.batch_size and micro_batch_size must be >= 1")
    check(optim.epochs >= 1, f"optim.epochs must be >= 1, got {optim.epochs}")


def check_placement(where: str, device: str, dtype: str) -> None:
    """``<where>.device`` names a device this machine has and ``<where>.dtype`` a known dtype (ConfigError)."""
    from dialogue_gym.models import DeviceError, resolve_device, resolve_dtype

    try:
        dev = resolve_device(device)
    except DeviceError as e:
        raise ConfigError(f"{where}.device: {e}") from None
    try:
        resolve_dtype(dtype, dev)
    except DeviceError as e:
        raise ConfigError(f"{where}.dtype: {e}") from None


def check_env(env: EnvConfig) -> None:
    """The env settings, by the env's own :meth:`EnvConfig.validate` (before any model loads or server is asked).

    Raises:
        ConfigError: ``"env.<field> ..."``, naming the bad setting.
    """
    try:
        env.validate()
    except EnvConfigError as e:
        raise ConfigError(f"env.{e}") from None


# The name this check had when it covered only the engines; kept so code written against it still imports.
check_engines = check_env


def check_policy_engine(policy: PolicySettings, sampling: SamplingSettings) -> None:
    """``policy.engine``: ``hf``, or ``vllm`` when vLLM is installed and can serve the policy (its LoRA adapter,
    or with ``lora_r=0`` its full weights)."""
    import importlib.util

    from agents.common.policy_engine import VLLM_LORA_RANKS

    check(policy.engine in ("hf", "vllm"), f"policy.engine is {policy.engine!r}; allowed: hf, vllm")
    check(policy.lora_sync in ("adapter", "merged"),
          f"policy.lora_sync is {policy.lora_sync!r}; allowed: adapter, merged")
    if policy.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        from dialogue_gym.generation.vllm import INSTALL_HINT

        raise ConfigError(f"policy.engine=vllm needs vLLM, which is not installed. {INSTALL_HINT} Or set "
                          "policy.engine=hf.")
    check(policy.lora_sync == "merged" or policy.lora_r <= max(VLLM_LORA_RANKS),
          f"policy.lora_r={policy.lora_r} is above the largest LoRA rank vLLM serves ({max(VLLM_LORA_RANKS)}): lower "
          "policy.lora_r, set policy.lora_sync=merged, or set policy.engine=hf")
    check(0 < policy.engine_memory <= 1, f"policy.engine_memory must be in (0, 1], got {policy.engine_memory}")
    check(sampling.top_p == 1.0, f"policy.engine=vllm with sampling.top_p={sampling.top_p}: vLLM's log-probs are "
                                 "renormalised within the nucleus and would not match the trainer's; use "
                                 "sampling.top_p=1.0 or policy.engine=hf")
    if policy.model == "tiny":
        import torch

        check(torch.cuda.is_available(), "policy.model=tiny has attention heads 16 wide, which vLLM's CPU "
                                         "attention cannot serve (its engine copy has widened heads, which neither "
                                         "the trained LoRA adapter nor the trained weights fit); use "
                                         "policy.model=embedded (or another model) with policy.engine=vllm, or "
                                         "policy.engine=hf")


EVAL_SPLITS = ("test", "validation")


def build_task_early(env: EnvConfig, eval_dialogues: int | None = None, eval_split: str = "test") -> Any:
    """Build the task now (cheap, no model) so a missing dataset, an evaluation split the task lacks, or an
    evaluation larger than its split (``eval_dialogues`` rows asked for), fails before any model loads."""
    from dialogue_gym.conversation import DialogueError
    from dialogue_gym.tasks import build_task

    check(eval_split in EVAL_SPLITS, f"eval.split must be one of {list(EVAL_SPLITS)}, got {eval_split!r}")
    try:
        task = build_task(env.task, **env.task_kwargs)
        n_rows = len(task.rows(eval_split)) if eval_dialogues is not None else 0
    except DialogueError as e:
        raise ConfigError(str(e)) from None  # a missing dataset: the task's own message names it
    check(eval_dialogues is None or n_rows > 0,
          f"eval.split is {eval_split!r} but task {env.task!r} has no {eval_split} rows; use eval.split=test")
    check(eval_dialogues is None or eval_dialogues <= n_rows,
          f"eval.dialogues is {eval_dialogues} but the {eval_split} split of task {env.task!r} has {n_rows} rows: "
          f"lower eval.dialogues to at most {n_rows}")
    return task
