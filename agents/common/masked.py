"""Means and whitening over the action tokens of a padded batch (masks are ``(B, T)`` tensors of 0/1)."""

from __future__ import annotations

import torch

from agents.common.loss_checks import as_mask, check_shapes

__all__ = ["masked_mean", "masked_whiten"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``).

    Values of ``x`` outside the mask are ignored even if they are NaN or infinite.

    Raises:
        ValueError: shapes differ, the mask is not 0/1, or a mean would be over no position.
    """
    fn = "masked_mean"
    check_shapes(fn, None, x=x, mask=mask)
    m = as_mask(fn, "mask", mask)
    count = m.sum() if dim is None else m.sum(dim)
    if bool((count == 0).any()):
        where = "the mask" if dim is None else f"a slice of the mask along dim {dim}"
        raise ValueError(f"{fn}: {where} is all 0; a masked mean needs at least one position with mask 1")
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.to(total.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked positions; 0 outside the mask.

    The variance is the population variance (divide by the count). With ``shift_mean=False`` the mean is
    added back (scale only), as some PPO implementations do for rewards.
    """
    fn = "masked_whiten"
    m = as_mask(fn, "mask", mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))
