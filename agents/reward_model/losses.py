"""Reward-model losses as pure functions: tensors in, ``(loss, metrics)`` out.

- :func:`bt_loss` — Bradley-Terry: ``-log sigmoid(r_chosen - r_rejected)``, averaged over pairs.
- :func:`preference_loss` — the pairwise preference model's loss on its two letter logits: the cross-entropy of the
  correct letter under the softmax over {"A", "B"} only, ``-log sigmoid(logit_correct - logit_other)``.

(If another agent needs them unchanged they move to ``agents/common/losses.py``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(fn: str, a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{fn}: {names[0]} and {names[1]} must be tensors")
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must be 1-D tensors of one shape (N,), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{fn}: got no pairs (N = 0)")


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss of scalar rewards.

    Args:
        r_chosen: (N,) rewards of the preferred replies.
        r_rejected: (N,) rewards of the rejected replies.

    Returns:
        ``mean(-log sigmoid(r_chosen - r_rejected))`` and metrics: ``loss/bt``, ``rm/accuracy`` (share of pairs with
        ``r_chosen > r_rejected``; ties count as wrong), ``rm/margin`` (mean ``r_chosen - r_rejected``),
        ``rm/reward_mean`` (mean of all 2N rewards).
    """
    _check_pair("bt_loss", r_chosen, r_rejected, ("r_chosen", "r_rejected"))
    diff = r_chosen.float() - r_rejected.float()  # (N,)
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {"loss/bt": float(loss), "rm/accuracy": float((diff > 0).float().mean()),
                   "rm/margin": float(diff.mean()),
                   "rm/reward_mean": float(torch.cat([r_chosen, r_rejected]).float().mean())}
    return loss, metrics


def preference_loss(logit_correct: torch.Tensor, logit_other: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a pairwise preference model on the letter logits of its prompts.

    Args:
        logit_correct: (N,) next-token logit of the letter naming the preferred reply.
        logit_other: (N,) next-token logit of the other letter.

    Returns:
        ``mean(-log sigmoid(logit_correct - logit_other))`` and metrics ``loss/preference``, ``rm/accuracy``
        (share of prompts where the correct letter has the larger logit), ``rm/p_correct`` (mean
        ``pA / (pA + pB)`` of the correct letter).
    """
    _check_pair("preference_loss", logit_correct, logit_other, ("logit_correct", "logit_other"))
    diff = logit_correct.float() - logit_other.float()
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {"loss/preference": float(loss), "rm/accuracy": float((diff > 0).float().mean()),
                   "rm/p_correct": float(torch.sigmoid(diff).mean())}
    return loss, metrics
