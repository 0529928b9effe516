"""Input checks shared by the loss functions: each raises ``ValueError`` naming the function, the argument, what
was wrong and what is allowed."""

from __future__ import annotations

import math

import torch


def check_shapes(fn: str, expected_ndim: int | None, **tensors: torch.Tensor) -> torch.Size:
    """All ``tensors`` must be tensors of one shape (and ``expected_ndim`` dimensions); returns that shape."""
    first_name, first = None, None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if first is None:
            first_name, first = name, t
            if expected_ndim is not None and t.dim() != expected_ndim:
                layout = "(B,)" if expected_ndim == 1 else "(B, T)"
                raise ValueError(
                    f"{fn}: {name} must have shape {layout} ({expected_ndim} dimension(s)), got {tuple(t.shape)}"
                )
            if t.numel() == 0:
                raise ValueError(f"{fn}: {name} is empty (shape {tuple(t.shape)}); at least one element is needed")
        elif t.shape != first.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; "
                "all inputs must have the same shape"
            )
    assert first is not None
    return first.shape


def check_positive(fn: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def as_mask(fn: str, name: str, mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as a bool tensor; anything other than 0 and 1 is an error."""
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{fn}: {name} must contain only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    return mask
