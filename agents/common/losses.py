"""Losses and advantage estimators shared by the agents: REFUEL/REBEL regression, DPO, token-level PPO.

Every loss is a pure function of tensors that returns ``(loss, metrics)``: ``loss`` is a scalar tensor that
carries gradients, ``metrics`` a ``dict[str, float]`` of detached diagnostics (``"loss"`` included). Metric
names carry no namespace; an agent logs them as ``{f"loss/{k}": v for k, v in metrics.items()}``.

Shapes: ``B`` is the batch (pairs for the regression and DPO losses, sequences for PPO), ``T`` the token
positions of a padded batch. Masks are ``(B, T)`` tensors of 0/1 (bool, int or float); a mask marks the
assistant (action) tokens. In a multi-turn dialogue the user's tokens are part of the state: they are never
actions and are skipped by every function here.

Bad input (wrong shapes, non-positive coefficients, an empty mask) raises ``ValueError`` naming the argument,
what was wrong and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptiveKLController",
    "dpo_loss",
    "explained_variance",
    "gae",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "regression_loss",
    "sequence_kl",
]


# --------------------------------------------------------------------------------------------- validation
def _check_shapes(fn: str, expected_ndim: int | None, **tensors: torch.Tensor) -> torch.Size:
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


def _check_positive(fn: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _as_mask(fn: str, name: str, mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as a bool tensor; anything other than 0 and 1 is an error."""
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{fn}: {name} must contain only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    return mask


# --------------------------------------------------------------------------------------------- REFUEL / REBEL
def regression_loss(
    logp_a: torch.Tensor,
    logp_ref_a: torch.Tensor,
    logp_b: torch.Tensor,
    logp_ref_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The REBEL / REFUEL squared regression of the log-ratio difference onto the reward difference.

    ``loss = mean( ((logp_a − logp_ref_a) − (logp_b − logp_ref_b) − eta·(reward_a − reward_b))² )``

    With ``eta`` on the reward term as in the reference code (the paper writes ``1/eta`` on the log-ratio
    term: same minimiser, different gradient scale).

    Args:
        logp_a: (B,) log πθ(a|s), summed over the reply's tokens; carries gradients.
        logp_ref_a: (B,) log π_t(a|s) of the policy that sampled the pair (no gradient needed).
        logp_b: (B,) log πθ(b|s) of the other reply.
        logp_ref_b: (B,) log π_t(b|s).
        reward_a: (B,) reward (REBEL) or rollout return Q̂ (REFUEL) of reply a.
        reward_b: (B,) the same for reply b.
        eta: scale of the reward difference, > 0 (reference: 1e3 with raw ArmoRM scores for REFUEL).

    Returns:
        ``(loss, metrics)``. Metrics: ``loss``; ``sign_align``: the fraction of pairs where the log-ratio
        difference has the sign of the reward difference, with ``sign(0) = 0`` (so a pair counts as aligned
        only if both signs agree exactly: a zero log-ratio difference against a non-zero reward difference is
        NOT aligned — at the start of an iteration, when πθ = π_t, ``sign_align`` is 0 for every pair whose
        rewards differ — and a pair with equal rewards is aligned only if its log-ratio difference is exactly
        0); ``reward_diff_abs``: mean |reward_a − reward_b|; ``logratio_diff``: mean log-ratio difference;
        ``logratio_diff_abs``: its mean absolute value.

    Raises:
        ValueError: ``eta`` not > 0, an input not a 1-D tensor, or shapes that differ.
    """
    fn = "regression_loss"
    eta = _check_positive(fn, "eta", eta)
    _check_shapes(
        fn, 1, logp_a=logp_a, logp_ref_a=logp_ref_a, logp_b=logp_b, logp_ref_b=logp_ref_b,
        reward_a=reward_a, reward_b=reward_b,
    )
    logratio_diff = (logp_a - logp_ref_a) - (logp_b - logp_ref_b)  # (B,)
    reward_diff = (reward_a - reward_b).to(logratio_diff.dtype)  # (B,)
    loss = (logratio_diff - eta * reward_diff).pow(2).mean()
    with torch.no_grad():
        lr_d = logratio_diff.detach()
        metrics = {
            "loss": loss.item(),
            "sign_align": (torch.sign(lr_d) == torch.sign(reward_diff)).float().mean().item(),
            "reward_diff_abs": reward_diff.abs().mean().item(),
            "logratio_diff": lr_d.mean().item(),
            "logratio_diff_abs": lr_d.abs().mean().item(),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------- DPO
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss with conservative label smoothing (Rafailov et al. 2023; cDPO).

    With ``Δ = [log πθ(y_w) − log π_ref(y_w)] − [log πθ(y_l) − log π_ref(y_l)]`` and ``ε = label_smoothing``:
    ``loss = mean( −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) )``, i.e. the cross-entropy against a preference label
    that is right with probability 1 − ε.

    Args:
        policy_chosen_logps: (B,) log πθ of the preferred reply; carries gradients.
        policy_rejected_logps: (B,) log πθ of the rejected reply.
        ref_chosen_logps: (B,) log π_ref of the preferred reply.
        ref_rejected_logps: (B,) log π_ref of the rejected reply.
        beta: KL strength β > 0 (reference: 0.1).
        label_smoothing: ε in [0, 0.5): the assumed probability that a label is flipped (reference code: 0.1).

    Returns:
        ``(loss, metrics)``. Metrics: ``loss``; ``reward_accuracy``: fraction of pairs whose implicit chosen
        reward is strictly greater than the rejected one (ties count as wrong); ``margin``: mean of
        β·Δ; ``chosen_reward`` / ``rejected_reward``: mean implicit rewards β·(log πθ − log π_ref).

    Raises:
        ValueError: ``beta`` not > 0, ``label_smoothing`` outside [0, 0.5), bad shapes.
    """
    fn = "dpo_loss"
    beta = _check_positive(fn, "beta", beta)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0.0 <= label_smoothing < 0.5
    ):
        raise ValueError(f"{fn}: label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")
    _check_shapes(
        fn, 1, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratio - rejected_logratio)  # (B,) = βΔ
    eps = float(label_smoothing)
    loss = (-(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio.detach()
        rejected_reward = beta * rejected_logratio.detach()
        metrics = {
            "loss": loss.item(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
            "margin": (chosen_reward - rejected_reward).mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "rejected_reward": rejected_reward.mean().item(),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------- masked helpers
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``).

    Values of ``x`` outside the mask are ignored even if they are NaN or infinite.

    Raises:
        ValueError: shapes differ, the mask is not 0/1, or a mean would be over no position.
    """
    fn = "masked_mean"
    _check_shapes(fn, None, x=x, mask=mask)
    m = _as_mask(fn, "mask", mask)
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
    m = _as_mask(fn, "mask", mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------------------------- PPO
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the action tokens of token sequences.

    Convention. Row b of the batch is one dialogue laid out as tokens; ``mask`` marks the assistant tokens,
    the only actions. User, system and padding tokens are part of the state: the recursion jumps over them.
    Let ``t_1 < t_2 < … < t_K`` be the masked positions of a row. Then, with ``V(t_{K+1}) = 0`` (the dialogue
    ends after its last action; nothing is bootstrapped):

        δ_k = r(t_k) + γ·V(t_{k+1}) − V(t_k)
        A_k = δ_k + γ·λ·A_{k+1},   A_{K+1} = 0
        R_k = A_k + V(t_k)

    so the last token of turn h is followed, one discount step later, by the first assistant token of turn
    h+1 (the user's reply in between is the environment's transition). Discounting counts action tokens.

    Args:
        rewards: (B, T) per-token rewards, 0 where ``mask`` is 0 (e.g. from :func:`kl_penalized_rewards`).
        values: (B, T) value estimates; positions outside the mask are ignored.
        mask: (B, T) 1 at action tokens.
        gamma: discount per action token, in [0, 1].
        lam: GAE λ, in [0, 1].

    Returns:
        ``(advantages, returns)``, both (B, T), 0 where ``mask`` is 0. No gradient flows (computed under
        ``torch.no_grad``).

    Raises:
        ValueError: shapes differ or are not 2-D, a non-zero reward outside the mask (it would be silently
            dropped: put a turn's score on its last assistant token), ``gamma`` or ``lam`` outside [0, 1].
    """
    fn = "gae"
    _check_shapes(fn, 2, rewards=rewards, values=values, mask=mask)
    for name, v in (("gamma", gamma), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{fn}: {name} must be a number in [0, 1], got {v!r}")
    m = _as_mask(fn, "mask", mask)
    if bool(((rewards != 0) & ~m).any()):
        raise ValueError(
            f"{fn}: rewards has non-zero entries where mask is 0; rewards must be 0 outside the action tokens "
            "(place each turn's score on that turn's last assistant token)"
        )
    with torch.no_grad():
        rewards = rewards.detach().float()
        values = values.detach().float()
        B, T = rewards.shape
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # V at the next action token
        next_adv = torch.zeros_like(next_value)  # A at the next action token
        for t in range(T - 1, -1, -1):
            m_t = m[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv_t = delta + gamma * lam * next_adv
            advantages[:, t] = torch.where(m_t, adv_t, torch.zeros_like(adv_t))
            next_value = torch.where(m_t, values[:, t], next_value)
            next_adv = torch.where(m_t, adv_t, next_adv)
        returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


def ppo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate objective per token, averaged over the masked (action) tokens of the batch.

    ``r = exp(logp_new − logp_old)``; ``loss = masked_mean( max(−A·r, −A·clip(r, 1−c, 1+c)) )``.

    Args:
        logp_new: (B, T) per-token log-probs under the policy being trained; carries gradients.
        logp_old: (B, T) per-token log-probs under the policy that sampled the tokens.
        advantages: (B, T) advantages (usually whitened over the mask).
        mask: (B, T) 1 at action tokens.
        clip: ratio clip c > 0.

    Returns:
        ``(loss, metrics)``. Metrics: ``loss``; ``approx_kl``: the k3 estimator ``(r − 1) − log r`` averaged
        over the masked tokens, an unbiased, non-negative estimate of KL(π_old ‖ π_new) from tokens sampled
        by π_old (Schulman, "Approximating KL divergence", 2020); ``clip_fraction``: fraction of masked tokens
        with ``|r − 1| > c``; ``ratio``: mean ratio.
    """
    fn = "ppo_policy_loss"
    clip = _check_positive(fn, "clip", clip)
    _check_shapes(fn, 2, logp_new=logp_new, logp_old=logp_old, advantages=advantages, mask=mask)
    m = _as_mask(fn, "mask", mask)
    log_ratio = logp_new - logp_old.detach()
    # Outside the mask the ratio is forced to 1 so that garbage there cannot overflow exp() into NaN gradients.
    log_ratio = torch.where(m, log_ratio, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    surrogate = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip))
    loss = masked_mean(surrogate, m)
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        metrics = {
            "loss": loss.item(),
            "approx_kl": masked_mean((r - 1.0) - lr, m).item(),
            "clip_fraction": masked_mean(((r - 1.0).abs() > clip).float(), m).item(),
            "ratio": masked_mean(r, m).item(),
        }
    return loss, metrics


def ppo_value_loss(
    values_new: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: ``0.5 · masked_mean( max((V − R)², (V_clip − R)²) )``.

    ``V_clip = V_old + clip(V − V_old, −c, c)`` keeps the value head from moving further than ``c`` from the
    rollout's estimate per update (as in OpenAI baselines' PPO2). ``clip=None`` gives the plain
    ``0.5 · masked_mean((V − R)²)``.

    Args:
        values_new: (B, T) value predictions being trained; carries gradients.
        values_old: (B, T) the values recorded at rollout time.
        returns: (B, T) targets (from :func:`gae`).
        mask: (B, T) 1 at action tokens.
        clip: value clip c > 0, or None for no clipping.

    Returns:
        ``(loss, metrics)``. Metrics: ``loss``; ``clip_fraction``: fraction of masked tokens where the clipped
        error was the larger one (0 without clipping); ``value_mean``: mean of ``values_new``.
    """
    fn = "ppo_value_loss"
    if clip is not None:
        clip = _check_positive(fn, "clip", clip)
    _check_shapes(fn, 2, values_new=values_new, values_old=values_old, returns=returns, mask=mask)
    m = _as_mask(fn, "mask", mask)
    returns = returns.detach()
    err = (values_new - returns) ** 2
    if clip is None:
        per_token = err
        clipped_larger = torch.zeros_like(err, dtype=torch.bool)
    else:
        old = values_old.detach()
        v_clipped = old + torch.clamp(values_new - old, -clip, clip)
        err_clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(err, err_clipped)
        clipped_larger = err_clipped > err
    loss = 0.5 * masked_mean(per_token, m)
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "clip_fraction": masked_mean(clipped_larger.float(), m).item(),
            "value_mean": masked_mean(values_new.detach(), m).item(),
        }
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 − Var[R − V] / Var[R]`` over the masked tokens; NaN when the returns have no variance.

    1 is a perfect value function, 0 is no better than a constant, negative is worse than a constant.
    """
    fn = "explained_variance"
    _check_shapes(fn, None, values=values, returns=returns, mask=mask)
    m = _as_mask(fn, "mask", mask)
    with torch.no_grad():
        v, r = values.detach().double(), returns.detach().double()
        var_r = masked_mean((r - masked_mean(r, m)) ** 2, m)
        resid = r - v
        var_resid = masked_mean((resid - masked_mean(resid, m)) ** 2, m)
        if var_r.item() == 0.0:
            return float("nan")
        return (1.0 - var_resid / var_r).item()


def kl_penalized_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token PPO rewards: ``−kl_coef·(logp − logp_ref)`` on every action token, plus the sparse scores.

    Args:
        scores: (B, T) the reward model's score of each turn placed on that turn's last assistant token, 0
            elsewhere (terminal mode: only the final turn's last token is non-zero).
        logp: (B, T) per-token log-probs of the sampled tokens under the rollout policy.
        logp_ref: (B, T) the same under the frozen reference policy.
        mask: (B, T) 1 at action tokens.
        kl_coef: β ≥ 0 (0 disables the penalty).

    Returns:
        (B, T) rewards, 0 where ``mask`` is 0; no gradient.

    Raises:
        ValueError: bad shapes, ``kl_coef`` negative, or a score placed outside the mask.
    """
    fn = "kl_penalized_rewards"
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"{fn}: kl_coef must be a finite number >= 0, got {kl_coef!r}")
    _check_shapes(fn, 2, scores=scores, logp=logp, logp_ref=logp_ref, mask=mask)
    m = _as_mask(fn, "mask", mask)
    if bool(((scores != 0) & ~m).any()):
        raise ValueError(
            f"{fn}: scores has non-zero entries where mask is 0; put each turn's score on its last assistant token"
        )
    with torch.no_grad():
        kl = (logp - logp_ref).detach().float()
        penalty = torch.where(m, -float(kl_coef) * kl, torch.zeros_like(kl))
        return penalty + scores.detach().float()


def sequence_kl(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-sequence KL estimate ``Σ_t mask·(logp − logp_ref)`` of the sampled tokens (the quantity the
    :class:`AdaptiveKLController` steers; average it over the batch before ``update``)."""
    fn = "sequence_kl"
    _check_shapes(fn, 2, logp=logp, logp_ref=logp_ref, mask=mask)
    m = _as_mask(fn, "mask", mask)
    with torch.no_grad():
        diff = (logp - logp_ref).detach().float()
        return torch.where(m, diff, torch.zeros_like(diff)).sum(-1)


@dataclass
class AdaptiveKLController:
    """KL coefficient for PPO's reward penalty: fixed, or steered toward a target KL (Ziegler et al. 2019).

    With ``target`` set, each ``update(kl, n_steps)`` does
    ``value *= 1 + clip(kl / target − 1, −0.2, 0.2) · n_steps / horizon``: the coefficient grows when the
    policy drifts further than ``target`` nats per sequence from the reference and shrinks when it stays
    closer. With ``target=None`` the coefficient stays at ``value`` (fixed-coefficient option).

    Attributes:
        value: the current coefficient β (initial value), ≥ 0.
        target: target per-sequence KL in nats (reference: 6.0), or None for a fixed coefficient.
        horizon: how many samples it takes to change β by the full (clipped) proportional error (10,000).
    """

    value: float = 0.05
    target: float | None = None
    horizon: float = 10_000.0

    def __post_init__(self) -> None:
        fn = "AdaptiveKLController"
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not self.value >= 0:
            raise ValueError(f"{fn}: value must be a number >= 0, got {self.value!r}")
        if self.target is not None:
            _check_positive(fn, "target", self.target)
        _check_positive(fn, "horizon", self.horizon)
        self.value = float(self.value)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust the coefficient after a batch of ``n_steps`` samples whose mean KL was ``current_kl``.

        Returns the new coefficient (unchanged for a fixed controller).
        """
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl must be finite, got {current_kl!r}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"AdaptiveKLController.update: n_steps must be an int >= 0, got {n_steps!r}")
        if self.target is None:
            return self.value
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
