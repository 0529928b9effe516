"""Losses shared by the agents: REFUEL/REBEL regression and DPO here; token-level PPO in
:mod:`agents.common.ppo_losses` (re-exported, so ``agents.common.losses`` keeps every public name).

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

import torch
import torch.nn.functional as F

from agents.common.loss_checks import check_positive, check_shapes
from agents.common.masked import masked_mean, masked_whiten
from agents.common.ppo_losses import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_kl,
)

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
    eta = check_positive(fn, "eta", eta)
    check_shapes(
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
    beta = check_positive(fn, "beta", beta)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0.0 <= label_smoothing < 0.5
    ):
        raise ValueError(f"{fn}: label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")
    check_shapes(
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
