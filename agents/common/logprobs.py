"""Log-probabilities of chosen tokens under a causal language model, without a full-vocabulary log-softmax.

``token_logprobs`` returns, for each position ``t`` where ``loss_mask[b, t] == 1``, ``log p(x_t | x_<t)`` with the
logits divided by the sampling temperature (as the REFUEL/REBEL reference code does for both the policy and the
reference policy); ``sequence_logprobs`` sums them per row. These are the log-probs every agent trains on: the
turn-h assistant tokens for REFUEL/REBEL, a reply's tokens for DPO, each action token for PPO.

How the memory stays small. A full forward would produce ``(B, T, V)`` logits (8 × 256 × 49,152 fp32 = 400 MB
on the embedded model) and a log-softmax of the same size. Instead the model's decoder (the transformer without
its LM head) gives hidden states ``(B, T, H)``; only the ``N`` hidden states that predict a masked token are
gathered (the state at ``t − 1`` predicts token ``t``), and the LM head + log-softmax run on ``chunk_size`` of
them at a time in fp32. Under gradient, each chunk is checkpointed: its ``(chunk, V)`` logits are recomputed in
the backward pass instead of being stored, so peak extra memory is one chunk's logits either way.

Padding. Works with left padding (the generation engines' layout) and right padding: ``position_ids`` are
``cumsum(attention_mask) − 1``, so a sequence gets the same positions, hence the same log-probs, whatever padding
precedes it.

Models. Any transformers causal LM whose decoder is reachable through ``get_decoder()`` and LM head through
``get_output_embeddings()`` (Llama, Mistral, Qwen, SmolLM, Gemma — with its final-logit soft-capping), and the
same models wrapped by peft (LoRA layers live inside the decoder and head, so they are used). A wrapper that must
see the forward call itself (DDP, FSDP) is bypassed: pass the unwrapped module and synchronise as the launcher
requires.

No-grad use: gradients flow whenever autograd is on; for the frozen reference policy, call it under
``torch.inference_mode()`` (or ``torch.no_grad()``) — nothing is checkpointed or stored then.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "decoder_hidden_states",
    "logprobs_from_hidden",
    "position_ids_from_attention_mask",
    "sequence_logprobs",
    "token_logprobs",
]

DEFAULT_CHUNK_SIZE = 256  # hidden states per LM-head call: 256 × 49,152 fp32 logits = 48 MB


def _unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it); the model itself
    otherwise."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only attended tokens: ``cumsum(mask) − 1``, clamped at 0 on leading padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, temperature: float, chunk_size: int
) -> None:
    fn = "token_logprobs"
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must have shape (B, T), got {tuple(t.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}")
    for name, t in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}; they must match"
            )
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{fn}: {name} must contain only 0 and 1")
    if input_ids.shape[1] == 0:
        raise ValueError(f"{fn}: input_ids has no positions (shape {tuple(input_ids.shape)})")
    if bool((loss_mask[:, 0] != 0).any()):
        raise ValueError(
            f"{fn}: loss_mask is 1 at position 0; the first token of a row has no context to be predicted from"
        )
    if bool(((loss_mask != 0) & (attention_mask == 0)).any()):
        raise ValueError(f"{fn}: loss_mask is 1 at a padding position (attention_mask 0); mask only real tokens")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{fn}: temperature must be a number > 0, got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1, got {chunk_size!r}")


def decoder_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) final hidden states of the model's decoder (after its final norm, before the LM head).

    Shared with agents that read other heads off the same forward pass (e.g. a PPO value head).
    """
    decoder = _unwrap(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: Any, temperature: float, softcap: float | None
) -> torch.Tensor:
    """(n,) log p(target) from (n, H) hidden states: LM head, fp32, temperature, optional soft-cap, log-softmax.

    A plain linear head runs in fp32 even when the weights are bf16 (log-ratios of long replies are sums of
    per-token differences that bf16 logits, ~3 significant digits, would swamp); other heads are cast after.
    """
    if isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
        bias = None if head.bias is None else head.bias.float()
        logits = torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)  # (n, V)
    else:
        logits = head(hidden).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    return chosen - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token log-probs of the given tokens at the positions of ``loss_mask``.

    Args:
        model: a transformers causal LM, possibly peft-wrapped.
        input_ids: (B, T) token ids, left- or right-padded.
        attention_mask: (B, T) 1 at real tokens, 0 at padding.
        loss_mask: (B, T) 1 at the tokens whose log-prob is wanted (e.g. the turn-h assistant tokens);
            must be 0 at padding and at position 0.
        temperature: the logits are divided by it before the log-softmax (> 0).
        chunk_size: how many positions go through the LM head at once (memory: chunk_size × vocab × 4 bytes).

    Returns:
        (B, T) fp32: ``log softmax(logits_{t−1} / temperature)[x_t]`` where ``loss_mask`` is 1, 0 elsewhere.
        Differentiable with respect to the model's parameters when autograd is on.

    Raises:
        ValueError: shapes or dtypes wrong, masks not 0/1, ``loss_mask`` at padding or position 0,
            ``temperature`` not > 0, ``chunk_size`` < 1.
    """
    _check_inputs(input_ids, attention_mask, loss_mask, temperature, chunk_size)
    if not bool((loss_mask != 0).any()):
        return torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    hidden = decoder_hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    return logprobs_from_hidden(model, hidden, input_ids, loss_mask, temperature, chunk_size)


def logprobs_from_hidden(
    model: Any,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """:func:`token_logprobs` from decoder hidden states already computed (by :func:`decoder_hidden_states`).

    For agents that read another head off the same forward pass (PPO's value head), so the decoder runs once.

    Args:
        hidden: (B, T, H) decoder hidden states of ``input_ids``.
        Others: as :func:`token_logprobs` (inputs are assumed checked by the caller).

    Returns:
        (B, T) fp32 log-probs at the ``loss_mask`` positions, 0 elsewhere.
    """
    B, T = input_ids.shape
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"token_logprobs: {type(inner).__name__} has no output embeddings (LM head)")
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"logprobs_from_hidden: hidden has shape {tuple(hidden.shape)}; expected (B, T, H) with "
                         f"(B, T) = {tuple(input_ids.shape)}")
    softcap = getattr(getattr(inner, "config", None), "final_logit_softcapping", None)

    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    rows, cols = (loss_mask != 0).nonzero(as_tuple=True)  # (N,), (N,): row-major order
    if rows.numel() == 0:
        return out
    picked = hidden[rows, cols - 1]  # (N, H): the state at t − 1 predicts the token at t
    targets = input_ids[rows, cols].long()  # (N,)
    use_checkpoint = torch.is_grad_enabled() and (
        picked.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    pieces = []
    for start in range(0, picked.shape[0], chunk_size):
        h, y = picked[start : start + chunk_size], targets[start : start + chunk_size]
        if use_checkpoint:
            pieces.append(checkpoint(_chunk_logprobs, h, y, head, float(temperature), softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, y, head, float(temperature), softcap))
    values = torch.cat(pieces)  # (N,)
    return out.index_put((rows, cols), values)


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """(B,) fp32 sum over the ``loss_mask`` positions of ``log p(x_t | x_<t)`` (temperature-scaled).

    Same arguments and errors as :func:`token_logprobs`; a row with an all-zero ``loss_mask`` gives 0.
    """
    return token_logprobs(model, input_ids, attention_mask, loss_mask, temperature, chunk_size).sum(-1)
