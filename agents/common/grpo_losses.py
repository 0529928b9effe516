"""Group-relative advantages and the clipped importance-ratio surrogate of GRPO / RLOO / Dr. GRPO.

Pure functions of tensors, in the style of :mod:`agents.common.losses`: the loss returns ``(loss, metrics)``,
``metrics`` a ``dict[str, float]`` of detached diagnostics without a namespace. Shapes: ``N`` groups of ``G``
samples each; ``B`` sequences (rows) of a padded batch with ``T`` token positions; masks are (B, T) 0/1 tensors
that mark the action (assistant) tokens.

- :func:`group_advantages`: the advantage of each of a group's G samples from the G returns, with the group
  mean (GRPO) or the mean of the other G − 1 (``loo``, RLOO) as baseline, divided by the group's standard
  deviation (GRPO) or not (Dr. GRPO). A group whose returns are all equal gets exactly 0 and is counted.
- :func:`grpo_loss`: ``−min(r·A, clip(r, 1−ε, 1+ε)·A) + β·k3`` per action token, with ``r`` the ratio of the
  current policy to the sampling policy and ``k3 = exp(q) − q − 1``, ``q = log π_ref − log π_θ``, the
  non-negative per-token KL estimator DeepSeekMath adds to the loss; summed over the tokens and divided per token
  (every action token of the minibatch weighs the same) or per sequence (each sequence's token mean, then the mean
  over sequences, as DeepSeekMath writes it).

Bad input raises ``ValueError`` naming the argument, what was wrong and what is allowed.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BASELINES", "NORMALIZATIONS", "SCALES", "group_advantages", "grpo_loss"]

BASELINES = ("mean", "loo")
SCALES = ("std", "none")
NORMALIZATIONS = ("token", "sequence")


def _choice(fn: str, name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{fn}: {name} is {value!r}; allowed: {', '.join(allowed)}")
    return value


def group_advantages(returns: torch.Tensor, baseline: str = "mean", scale: str = "std", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages of every sample of every group from the group's returns.

    ``baseline="mean"``: ``A_i = R_i − mean(R)`` (GRPO). ``baseline="loo"``: ``A_i = R_i − mean_{j≠i} R_j``
    ``= G/(G−1)·(R_i − mean(R))`` (RLOO). ``scale="std"`` then divides by ``std(R) + eps`` (the sample standard
    deviation of the group, ``G − 1`` in the denominator); ``scale="none"`` leaves the advantage in reward units
    (Dr. GRPO). A group whose returns are all equal has advantage exactly 0 whatever the options (it carries no
    preference between its samples) and is counted in ``equal_groups``.

    Args:
        returns: (N, G) finite returns, one row per group, G >= 2.
        baseline: ``mean`` or ``loo``.
        scale: ``std`` or ``none``.
        eps: > 0, added to the standard deviation (a group of nearly equal returns is not blown up).

    Returns:
        ``(advantages (N, G) float32, metrics)``; metrics: ``groups``, ``equal_groups`` (counts),
        ``return_std`` (mean within-group standard deviation), ``abs_advantage`` (mean |A|).
    """
    fn = "group_advantages"
    _choice(fn, "baseline", baseline, BASELINES)
    _choice(fn, "scale", scale, SCALES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{fn}: eps must be a finite number > 0, got {eps!r}")
    if not isinstance(returns, torch.Tensor) or returns.dim() != 2:
        shape = tuple(returns.shape) if isinstance(returns, torch.Tensor) else type(returns).__name__
        raise ValueError(f"{fn}: returns must be a (N, G) tensor, one row per group; got {shape}")
    n, g = returns.shape
    if n < 1 or g < 2:
        raise ValueError(f"{fn}: returns has shape {(n, g)}; at least one group of G >= 2 samples is needed")
    r = returns.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{fn}: returns must be finite (drop failed samples first)")
    centred = r - r.mean(dim=1, keepdim=True)  # (N, G)
    adv = centred * (g / (g - 1)) if baseline == "loo" else centred
    std = r.std(dim=1, correction=1, keepdim=True)  # (N, 1)
    if scale == "std":
        adv = adv / (std + eps)
    equal = r.max(dim=1).values == r.min(dim=1).values  # (N,)
    adv = torch.where(equal[:, None], torch.zeros_like(adv), adv)
    metrics = {"groups": float(n), "equal_groups": float(equal.sum()), "return_std": float(std.mean()),
               "abs_advantage": float(adv.abs().mean())}
    return adv.to(torch.float32), metrics


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    normalization: str = "token",
    tokens: float | None = None,
    sequences: float | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate with an optional k3 KL to the reference, normalised per token or per sequence.

    Per action token ``t`` of row ``b``: ``r = exp(logp_new − logp_old)``,
    ``ℓ = −min(r·A_b, clip(r, 1 − clip, 1 + clip)·A_b) + beta·(exp(q) − q − 1)``, ``q = logp_ref − logp_new``.

    - ``normalization="token"``: ``loss = Σ_{b,t} mask·ℓ / tokens`` (``tokens`` defaults to ``mask.sum()``);
    - ``normalization="sequence"``: ``loss = Σ_b (Σ_t mask·ℓ) / lengths_b / sequences`` (``lengths`` default to
      each row's action tokens, ``sequences`` to B).

    Pass ``tokens`` / ``sequences`` (and ``lengths``) of the whole minibatch when this batch is one micro-batch of
    it (gradient accumulation, data-parallel shares): the micro-batch losses then add up to the minibatch's loss.
    ``lengths`` lets a "sequence" span several rows (a multi-turn dialogue's replies: give each row the
    dialogue's token count and count the dialogue once in ``sequences``).

    Args:
        logp_new: (B, T) per-token log-probs under the policy being trained; carries gradients.
        logp_old: (B, T) per-token log-probs under the policy that sampled the tokens (detached here).
        advantages: (B,) one advantage per row (broadcast over its tokens).
        mask: (B, T) 1 at action tokens; every row needs at least one.
        clip: ratio clip ε > 0 (DeepSeekMath: 0.2).
        beta: KL coefficient >= 0 (0: no reference needed).
        logp_ref: (B, T) reference log-probs; required when ``beta > 0``.
        normalization: ``token`` or ``sequence``.
        tokens: > 0, the denominator of ``token`` normalisation.
        sequences: > 0, the denominator of ``sequence`` normalisation.
        lengths: (B,) > 0, per-row token counts of ``sequence`` normalisation.

    Returns:
        ``(loss, metrics)``. Metrics (means over the action tokens of this batch): ``loss``, ``clip_fraction``
        (``|r − 1| > clip``), ``ratio``, ``approx_kl`` (k3 of KL(π_old ‖ π_θ)), ``kl_ref`` (k3 to the reference,
        0 without one).
    """
    fn = "grpo_loss"
    _choice(fn, "normalization", normalization, NORMALIZATIONS)
    for name, value, low_ok in (("clip", clip, False), ("beta", beta, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                value < 0 or (value == 0 and not low_ok):
            raise ValueError(f"{fn}: {name} must be a finite number {'>= 0' if low_ok else '> 0'}, got {value!r}")
    named = {"logp_new": logp_new, "logp_old": logp_old, "mask": mask}
    if logp_ref is not None:
        named["logp_ref"] = logp_ref
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape != logp_new.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a (B, T) tensor shaped like logp_new "
                             f"{tuple(logp_new.shape)}, got {shape}")
    b = logp_new.shape[0]
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (b,):
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"{fn}: advantages must be (B,) = ({b},), one per row, got {shape}")
    if beta > 0 and logp_ref is None:
        raise ValueError(f"{fn}: beta={beta} needs logp_ref (the reference policy's per-token log-probs)")
    m = mask.bool() if mask.dtype == torch.bool else mask != 0
    per_row = m.sum(dim=1)  # (B,)
    if bool((per_row == 0).any()):
        raise ValueError(f"{fn}: row {int((per_row == 0).nonzero()[0])} of mask has no action token")
    zero = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    log_ratio = torch.where(m, logp_new - logp_old.detach(), zero)  # 0 off the mask: no overflow in exp()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp_new.dtype)[:, None]  # (B, 1)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)  # (B, T)
    kl_ref = torch.zeros_like(per_token)
    if logp_ref is not None:
        q = torch.where(m, logp_ref.detach() - logp_new, zero)
        kl_ref = torch.exp(q) - q - 1.0
        if beta > 0:
            per_token = per_token + beta * kl_ref
    summed = torch.where(m, per_token, zero)
    if normalization == "token":
        denom = float(per_row.sum()) if tokens is None else _positive(fn, "tokens", tokens)
        loss = summed.sum() / denom
    else:
        lens = per_row.to(summed.dtype) if lengths is None else lengths.to(summed.dtype)
        if lens.shape != (b,) or bool((lens <= 0).any()):
            raise ValueError(f"{fn}: lengths must be (B,) = ({b},) with every entry > 0")
        denom = float(b) if sequences is None else _positive(fn, "sequences", sequences)
        loss = (summed.sum(dim=1) / lens).sum() / denom
    with torch.no_grad():
        count = per_row.sum().clamp(min=1)
        mean = lambda x: float((torch.where(m, x, zero)).sum() / count)  # noqa: E731
        metrics = {"loss": float(loss), "clip_fraction": mean(((ratio - 1.0).abs() > clip).to(ratio.dtype)),
                   "ratio": mean(ratio), "approx_kl": mean(ratio - 1.0 - log_ratio), "kl_ref": mean(kl_ref.detach())}
    return loss, metrics


def _positive(fn: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return float(value)
