"""Token-exact training batches: the prompt ids the engine used plus the reply ids the policy sampled.

No re-tokenisation: a reply is trained on exactly the tokens that were sampled (including the end-of-turn token
when the policy produced one), appended to the prompt ids the generation engine rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agents.common.logprobs import sequence_logprobs
from agents.common.sharding import LogProbModule


@dataclass
class Reply:
    """One sampled assistant turn.

    Attributes:
        prompt_ids: the rendered conversation the policy answered (chat template + generation prompt).
        token_ids: the sampled reply ids (end-of-turn token included when produced).
        text: the decoded reply (what the env received).
        finished: the reply ended with a stop token (False: cut at max_new_tokens).
        logprobs: the engine's log-prob of each sampled token at the sampling temperature, when it gave them.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool = True
    logprobs: list[float] | None = None

    @classmethod
    def from_generation(cls, g: Any) -> Reply:
        logprobs = list(g.logprobs) if getattr(g, "logprobs", None) is not None else None
        return cls(list(g.prompt_token_ids), list(g.token_ids), g.text, bool(g.finished), logprobs)


def collate(replies: Sequence[Reply], pad_id: int, max_length: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask, loss_mask)``, each (B, T); ``loss_mask`` marks reply tokens.

    ``max_length`` cuts the prompt from the left (the reply is always kept whole).
    """
    seqs, masks = [], []
    for r in replies:
        prompt = list(r.prompt_ids)
        if max_length is not None and len(prompt) + len(r.token_ids) > max_length:
            prompt = prompt[max(0, len(prompt) + len(r.token_ids) - max_length):]
        seqs.append(prompt + list(r.token_ids))
        masks.append([0] * len(prompt) + [1] * len(r.token_ids))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, width - len(s):] = torch.tensor(s)
        attention[b, width - len(s):] = 1
        loss[b, width - len(s):] = torch.tensor(m)
    return ids, attention, loss


def collate_on(replies: Sequence[Reply], pad_id: int, max_length: int | None, device: Any
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`collate` with the three tensors moved to ``device``."""
    ids, attention, mask = collate(replies, pad_id, max_length)
    return ids.to(device), attention.to(device), mask.to(device)


def pack_right(pieces: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 tensor shaped and placed like ``like``, with row b's last ``len(pieces[b])`` positions set to
    ``pieces[b]`` and 0 elsewhere (:func:`collate` left-pads, so a reply's per-token values sit last in its row)."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for b, x in enumerate(pieces):
        out[b, like.shape[1] - len(x):] = x.to(like.device)
    return out


def unpack_right(x: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """The inverse of :func:`pack_right`: row b's last ``lengths[b]`` values, detached, as float32 on the CPU."""
    return [x[b, x.shape[1] - n:].detach().float().cpu() for b, n in enumerate(lengths)]


def values_like(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 tensor of host numbers on ``like``'s device (references and rewards that meet log-probs)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=like.device)


def reply_logprobs(model: Any, replies: Sequence[Reply], pad_id: int, temperature: float = 1.0,
                   batch_size: int = 8, max_length: int | None = None) -> torch.Tensor:
    """(N,) fp32 summed log-probs of each reply's tokens given its prompt, on the model's device (gradients flow
    unless disabled)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(replies), batch_size):
        ids, attention, loss = collate(replies[start:start + batch_size], pad_id, max_length)
        if isinstance(model, LogProbModule):  # sharded: through the FSDP root's forward (agents/common/sharding.py)
            out.append(model(ids.to(device), attention.to(device), loss.to(device), temperature))
        else:
            out.append(sequence_logprobs(model, ids.to(device), attention.to(device), loss.to(device),
                                         temperature=temperature))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32, device=device)
