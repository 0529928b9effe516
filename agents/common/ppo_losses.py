"""Token-level PPO: generalised advantage estimation, the clipped policy and value losses, the KL-penalised
rewards and the adaptive KL coefficient (conventions as in :mod:`agents.common.losses`: pure functions returning
``(loss, metrics)``, masks of 0/1 over the assistant tokens, ``ValueError`` naming a bad argument)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from agents.common.loss_checks import as_mask, check_positive, check_shapes
from agents.common.masked import masked_mean

__all__ = ["AdaptiveKLController", "explained_variance", "gae", "kl_penalized_rewards", "ppo_policy_loss",
           "ppo_value_loss", "sequence_kl"]


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
    check_shapes(fn, 2, rewards=rewards, values=values, mask=mask)
    for name, v in (("gamma", gamma), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{fn}: {name} must be a number in [0, 1], got {v!r}")
    m = as_mask(fn, "mask", mask)
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
    clip = check_positive(fn, "clip", clip)
    check_shapes(fn, 2, logp_new=logp_new, logp_old=logp_old, advantages=advantages, mask=mask)
    m = as_mask(fn, "mask", mask)
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
        clip = check_positive(fn, "clip", clip)
    check_shapes(fn, 2, values_new=values_new, values_old=values_old, returns=returns, mask=mask)
    m = as_mask(fn, "mask", mask)
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
    check_shapes(fn, None, values=values, returns=returns, mask=mask)
    m = as_mask(fn, "mask", mask)
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
    check_shapes(fn, 2, scores=scores, logp=logp, logp_ref=logp_ref, mask=mask)
    m = as_mask(fn, "mask", mask)
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
    check_shapes(fn, 2, logp=logp, logp_ref=logp_ref, mask=mask)
    m = as_mask(fn, "mask", mask)
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
            check_positive(fn, "target", self.target)
        check_positive(fn, "horizon", self.horizon)
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
