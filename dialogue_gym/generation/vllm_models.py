"""What a vLLM engine loads: model names resolved to directories (the embedded model, the tiny test model with
its attention heads widened for vLLM's CPU attention, local paths), the CPU head-size check and the stop ids."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def widen_attention_heads(model: Any, head_dim: int) -> Any:
    """An equivalent Llama model whose attention heads are ``head_dim`` wide (zero-padded), e.g. 16 -> 32.

    vLLM's CPU attention supports head sizes 32, 64, 80, ... only; the tiny test model has 16. Padding is exact:

    - q/k: old rotary dimension ``i`` (and its partner ``i + d/2``) moves to ``m*i`` (and ``m*i + D/2``), where
      ``D = m*d``; RoPE gives new dimension ``j`` the frequency ``theta**(-2j/D)``, so ``m*i`` keeps the old
      ``theta**(-2i/d)``. The added dimensions are zero and add nothing to ``q . k``;
    - q is scaled by ``sqrt(D/d)`` so that the attention scale ``1/sqrt(D)`` still gives ``q . k / sqrt(d)``;
    - v and the matching ``o_proj`` columns move to the first ``d`` slots of each head; the rest are zero.

    Args:
        model: a ``LlamaForCausalLM`` with default RoPE and no attention biases.
        head_dim: the new head width, a multiple of the old one.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type != "llama" or getattr(config, "attention_bias", False):
        raise ValueError(
            f"widen_attention_heads handles Llama models without attention biases, not {config.model_type}"
        )
    if (config.rope_parameters or {}).get("rope_type", "default") != "default":
        raise ValueError("widen_attention_heads handles the default RoPE only")
    if head_dim % d or head_dim < d:
        raise ValueError(f"head_dim must be a multiple of the current head size {d}, got {head_dim}")
    m = head_dim // d
    rot = torch.cat([torch.arange(d // 2) * m, torch.arange(d // 2) * m + head_dim // 2])  # old dim -> new dim
    plain = torch.arange(d)

    def spread(w: torch.Tensor, heads: int, where: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        out = w.new_zeros(heads, head_dim, w.shape[1])  # (heads, D, hidden)
        out[:, where] = w.reshape(heads, d, w.shape[1]) * scale
        return out.reshape(heads * head_dim, w.shape[1])

    new_config = copy.deepcopy(config)
    new_config.head_dim = head_dim
    wide = AutoModelForCausalLM.from_config(new_config, dtype=next(model.parameters()).dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        state[p + "q_proj.weight"] = spread(state[p + "q_proj.weight"], heads, rot, (head_dim / d) ** 0.5)
        state[p + "k_proj.weight"] = spread(state[p + "k_proj.weight"], kv_heads, rot)
        state[p + "v_proj.weight"] = spread(state[p + "v_proj.weight"], kv_heads, plain)
        state[p + "o_proj.weight"] = spread(state[p + "o_proj.weight"].T.contiguous(), heads, plain).T.contiguous()
    wide.load_state_dict(state)
    wide.generation_config = model.generation_config
    return wide.eval()


def tiny_model_dir() -> Path:
    """A saved copy of the tiny random-weight test model (``load_model("tiny")``), written once, atomically.

    vLLM loads models from disk only, and its CPU attention needs heads at least 32 wide, so the copy is the
    tiny model with its 16-wide heads zero-padded to 32 (:func:`widen_attention_heads`): the same function, the
    same logits up to float rounding. The directory name carries a hash of the tiny config, so a changed config
    gets a fresh copy.
    """
    from dialogue_gym.models import cache_dir, load_tokenizer, tiny_config

    tokenizer = load_tokenizer("tiny")
    digest = hashlib.sha256(tiny_config(len(tokenizer)).to_json_string().encode()).hexdigest()[:10]
    target = cache_dir() / f"tiny-vllm-{digest}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from dialogue_gym.models import load_model, save_model_dir

    model, tokenizer = load_model("tiny", dtype="float32", device="cpu")
    d = model.config.head_dim
    wide = widen_attention_heads(model, 32 * -(-d // 32)) if d % 32 else model
    return save_model_dir(wide, tokenizer, target)


def resolve_model_source(model: str) -> str:
    """What vLLM should load for a model name: a directory for ``"embedded"``, ``"tiny"`` and local paths,
    the name itself for a hub id."""
    from dialogue_gym.models import EMBEDDED, TINY, embedded_model_dir, resolve_source

    if model == EMBEDDED:
        return str(embedded_model_dir())
    if model == TINY:
        return str(tiny_model_dir())
    return resolve_source(model)


def check_cpu_head_size(source: str) -> None:
    """vLLM's CPU attention supports a fixed set of head sizes; a model outside it fails only at its first
    generate call, with a dead engine. Say so before starting."""
    try:
        from transformers import AutoConfig
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        config = AutoConfig.from_pretrained(source)
        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # best effort: vLLM reports the problem itself later
        return
    text = getattr(config, "text_config", config)
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head not in supported:
        raise ValueError(
            f"model {source!r} has attention heads {head} wide; vLLM's CPU attention supports head sizes "
            f"{supported}. Use the HF engine for this model, or widen its heads (see widen_attention_heads)"
        )


def eos_ids(tokenizer: Any, source: str) -> list[int]:
    """Stop ids as HFEngine uses them: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        gen_eos = GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = None
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
    return sorted(int(i) for i in ids)
