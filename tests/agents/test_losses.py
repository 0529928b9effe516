"""Hand-computed checks of agents.common.losses (arithmetic written out next to each number)."""

from __future__ import annotations

import math

import pytest
import torch

from agents.common.losses import (
    AdaptiveKLController,
    dpo_loss,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    regression_loss,
    sequence_kl,
)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# ----------------------------------------------------------------------------------------- regression_loss
def _regression_inputs(grad: bool = False) -> dict[str, torch.Tensor]:
    # pair 0: ratio_a = -1 - (-1.5) = 0.5, ratio_b = -3 - (-2) = -1   -> diff  1.5; reward diff 0.3-0.1 =  0.2
    # pair 1: ratio_a = -2 - (-2)   = 0,   ratio_b = -1 - (-1.5) = 0.5 -> diff -0.5; reward diff 0.1-0.4 = -0.3
    # pair 2: ratio_a = 0,                 ratio_b = 0                  -> diff  0;   reward diff 1.0-0.0 =  1.0
    # pair 3: ratio_a = -1 - (-2)   = 1,   ratio_b = 0                  -> diff  1;   reward diff 0.5-0.5 =  0
    return {
        "logp_a": t(-1.0, -2.0, -1.0, -1.0, grad=grad),
        "logp_ref_a": t(-1.5, -2.0, -1.0, -2.0),
        "logp_b": t(-3.0, -1.0, -1.0, -1.0, grad=grad),
        "logp_ref_b": t(-2.0, -1.5, -1.0, -1.0),
        "reward_a": t(0.3, 0.1, 1.0, 0.5),
        "reward_b": t(0.1, 0.4, 0.0, 0.5),
    }


def test_regression_loss_hand_computed():
    x = _regression_inputs(grad=True)
    loss, metrics = regression_loss(**x, eta=2.0)
    # residual = diff - eta * reward_diff:
    #   pair 0: 1.5 - 2*0.2    =  1.1 -> 1.21
    #   pair 1: -0.5 - 2*(-0.3) = 0.1 -> 0.01
    #   pair 2: 0 - 2*1.0      = -2   -> 4
    #   pair 3: 1 - 0          =  1   -> 1
    # mean = (1.21 + 0.01 + 4 + 1) / 4 = 6.22 / 4 = 1.555
    assert loss.item() == pytest.approx(1.555, abs=1e-6)
    assert metrics["loss"] == pytest.approx(1.555, abs=1e-6)
    # sign_align: pair 0 (+,+) yes; pair 1 (-,-) yes; pair 2 (0,+) no; pair 3 (+,0) no -> 2/4
    assert metrics["sign_align"] == pytest.approx(0.5)
    # |reward diff| = (0.2 + 0.3 + 1 + 0) / 4 = 0.375
    assert metrics["reward_diff_abs"] == pytest.approx(0.375, abs=1e-6)
    # mean diff = (1.5 - 0.5 + 0 + 1) / 4 = 0.5; mean |diff| = (1.5 + 0.5 + 0 + 1) / 4 = 0.75
    assert metrics["logratio_diff"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["logratio_diff_abs"] == pytest.approx(0.75, abs=1e-6)
    # d loss / d logp_a = 2 * residual / B = residual / 2 -> [0.55, 0.05, -1.0, 0.5]; d/d logp_b is its negative
    loss.backward()
    torch.testing.assert_close(x["logp_a"].grad, t(0.55, 0.05, -1.0, 0.5))
    torch.testing.assert_close(x["logp_b"].grad, t(-0.55, -0.05, 1.0, -0.5))


def test_regression_loss_zero_differences_are_aligned_and_minimiser_is_eta_times_reward():
    # Both differences 0 -> sign(0) == sign(0): aligned. Loss 0.
    z = t(-1.0)
    loss, metrics = regression_loss(z, z, z, z, t(0.7), t(0.7), eta=5.0)
    assert loss.item() == 0.0 and metrics["sign_align"] == 1.0
    # Log-ratio diff exactly eta * reward diff = 3 * (0.5 - 0.25) = 0.75 -> loss 0, aligned.
    loss, metrics = regression_loss(t(-1.0), t(-1.75), t(-2.0), t(-2.0), t(0.5), t(0.25), eta=3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and metrics["sign_align"] == 1.0


def test_regression_loss_reward_dtype_follows_logps():
    x = _regression_inputs()
    x["reward_a"], x["reward_b"] = x["reward_a"].double(), x["reward_b"].double()
    loss, _ = regression_loss(**x, eta=2.0)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_regression_loss_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
        regression_loss(**_regression_inputs(), eta=eta)


def test_regression_loss_shape_errors_name_the_argument():
    x = _regression_inputs()
    x["logp_ref_b"] = t(1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match=r"logp_ref_b has shape \(3,\) but logp_a has \(4,\)"):
        regression_loss(**x, eta=1.0)
    x = _regression_inputs()
    x["logp_a"] = x["logp_a"].reshape(2, 2)
    with pytest.raises(ValueError, match=r"logp_a must have shape \(B,\)"):
        regression_loss(**x, eta=1.0)
    x = _regression_inputs()
    x["reward_b"] = [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="reward_b must be a torch.Tensor"):
        regression_loss(**x, eta=1.0)
    with pytest.raises(ValueError, match="is empty"):
        e = torch.zeros(0)
        regression_loss(e, e, e, e, e, e, eta=1.0)


# ----------------------------------------------------------------------------------------- dpo_loss
def _dpo_inputs(grad: bool = False) -> dict[str, torch.Tensor]:
    # pair 0: chosen ratio -1 - (-2) = 1, rejected ratio -3 - (-2) = -1 -> Δ = 2,  βΔ = 0.2 (β = 0.1)
    # pair 1: chosen ratio -2 - (-2) = 0, rejected ratio -1 - (-2) =  1 -> Δ = -1, βΔ = -0.1
    return {
        "policy_chosen_logps": t(-1.0, -2.0, grad=grad),
        "policy_rejected_logps": t(-3.0, -1.0, grad=grad),
        "ref_chosen_logps": t(-2.0, -2.0),
        "ref_rejected_logps": t(-2.0, -2.0),
    }


def test_dpo_loss_hand_computed():
    x = _dpo_inputs(grad=True)
    loss, metrics = dpo_loss(**x, beta=0.1)
    # -log σ(0.2)  = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    # -log σ(-0.1) = log(1 + e^0.1)  = log(2.1051709181) = 0.7443966600
    # mean = 0.6712677647
    assert loss.item() == pytest.approx(0.6712677647, abs=1e-6)
    # implicit rewards β·ratio: chosen [0.1, 0], rejected [-0.1, 0.1]
    assert metrics["chosen_reward"] == pytest.approx(0.05, abs=1e-7)  # (0.1 + 0) / 2
    assert metrics["rejected_reward"] == pytest.approx(0.0, abs=1e-7)  # (-0.1 + 0.1) / 2
    assert metrics["margin"] == pytest.approx(0.05, abs=1e-7)  # (0.2 - 0.1) / 2
    assert metrics["reward_accuracy"] == 0.5  # 0.1 > -0.1 yes, 0 > 0.1 no
    # d loss / d chosen_logp = -β σ(-βΔ) / B: pair 0: -0.1 * σ(-0.2) / 2 = -0.1 * 0.4501660027 / 2 = -0.0225083
    #                                        pair 1: -0.1 * σ(0.1) / 2  = -0.1 * 0.5249791875 / 2 = -0.0262490
    loss.backward()
    torch.testing.assert_close(x["policy_chosen_logps"].grad, t(-0.0225083, -0.0262490), atol=1e-6, rtol=0)
    torch.testing.assert_close(x["policy_rejected_logps"].grad, t(0.0225083, 0.0262490), atol=1e-6, rtol=0)


def test_dpo_loss_label_smoothing():
    loss, _ = dpo_loss(**_dpo_inputs(), beta=0.1, label_smoothing=0.1)
    # per pair: 0.9·softplus(-x) + 0.1·softplus(x) = softplus(-x) + 0.1·x   (softplus(x) − softplus(−x) = x)
    # pair 0 (x = 0.2):  0.5981388693 + 0.02 = 0.6181388693
    # pair 1 (x = -0.1): 0.7443966600 - 0.01 = 0.7343966600
    # mean = 0.6762677647
    assert loss.item() == pytest.approx(0.6762677647, abs=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"beta": -0.1}, "beta must be a finite number > 0"),
    ({"beta": 0.1, "label_smoothing": 0.5}, r"label_smoothing must be a number in \[0, 0.5\)"),
    ({"beta": 0.1, "label_smoothing": -0.1}, r"label_smoothing must be a number in \[0, 0.5\)"),
])
def test_dpo_loss_rejects_bad_coefficients(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(**_dpo_inputs(), **kwargs)


def test_dpo_loss_shape_error_names_argument():
    x = _dpo_inputs()
    x["ref_rejected_logps"] = t(1.0)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        dpo_loss(**x, beta=0.1)


# ----------------------------------------------------------------------------------------- masked helpers
def test_masked_mean_ignores_garbage_outside_mask():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, m).item() == pytest.approx(3.25)  # (1 + 2 + 4 + 6) / 4
    torch.testing.assert_close(masked_mean(x, m, dim=1), t(1.5, 5.0))  # (1+2)/2, (4+6)/2
    with pytest.raises(ValueError, match="all 0"):
        masked_mean(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_mean(x, torch.full((2, 3), 2.0))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3, std 0.8164966 -> ±1/0.8164966 = ±1.2247449
    torch.testing.assert_close(masked_whiten(x, m), torch.tensor([[-1.2247449, 0.0, 1.2247449, 0.0]]))
    # scale only: add the mean (2) back
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False), torch.tensor([[0.7752551, 2.0, 3.2247449, 0.0]]))


# ----------------------------------------------------------------------------------------- gae
def _gae_inputs():
    # row 0: [user, asst, asst, user, asst, pad]; values at non-action positions are 9 (must be ignored)
    # row 1: [user, user, user, asst, asst, pad]
    rewards = torch.tensor([[0.0, 0.0, 0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 1.0, 2.0, 9.0, 3.0, 9.0], [9.0, 9.0, 9.0, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 0]])
    return rewards, values, mask


def test_gae_skips_user_tokens_hand_computed():
    rewards, values, mask = _gae_inputs()
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0, actions at t = 1, 2, 4 with V = 1, 2, 3 and r = 0, 0.5, 1 (γ = 1, γλ = 0.5):
    #   t=4: δ = 1 + 0 − 3 = −2                     A = −2
    #   t=2: δ = 0.5 + 3 − 2 = 1.5 (next V is t=4)  A = 1.5 + 0.5·(−2) = 0.5
    #   t=1: δ = 0 + 2 − 1 = 1                      A = 1 + 0.5·0.5 = 1.25
    # row 1, actions at t = 3, 4 with V = 0.5, 0.5 and r = 0, 2:
    #   t=4: δ = 2 − 0.5 = 1.5                      A = 1.5
    #   t=3: δ = 0 + 0.5 − 0.5 = 0                  A = 0 + 0.5·1.5 = 0.75
    torch.testing.assert_close(adv, torch.tensor([[0, 1.25, 0.5, 0, -2.0, 0], [0, 0, 0, 0.75, 1.5, 0]]))
    # returns = A + V at actions: row 0: 2.25, 2.5, 1.0; row 1: 1.25, 2.0
    torch.testing.assert_close(ret, torch.tensor([[0, 2.25, 2.5, 0, 1.0, 0], [0, 0, 0, 1.25, 2.0, 0]]))


def test_gae_discount_counts_action_tokens_only():
    rewards, values, mask = _gae_inputs()
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    # γ = 0.9, γλ = 0.45:
    #   t=4: δ = 1 − 3 = −2                           A = −2
    #   t=2: δ = 0.5 + 0.9·3 − 2 = 1.2                A = 1.2 + 0.45·(−2) = 0.3
    #   t=1: δ = 0 + 0.9·2 − 1 = 0.8                  A = 0.8 + 0.45·0.3 = 0.935
    # (stepping through the user token at t=3 would discount twice and read its value 9)
    torch.testing.assert_close(adv, torch.tensor([[0, 0.935, 0.3, 0, -2.0, 0]]))


def test_gae_lambda_one_is_monte_carlo():
    rewards, values, mask = _gae_inputs()
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # γ = λ = 1: return = sum of rewards from the token on. Row 0: 1.5, 1.5, 1.0; row 1: 2, 2
    torch.testing.assert_close(ret, torch.tensor([[0, 1.5, 1.5, 0, 1.0, 0], [0, 0, 0, 2.0, 2.0, 0]]))


def test_gae_errors():
    rewards, values, mask = _gae_inputs()
    bad = rewards.clone()
    bad[0, 3] = 1.0  # a reward on a user token
    with pytest.raises(ValueError, match="rewards has non-zero entries where mask is 0"):
        gae(bad, values, mask)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        gae(rewards, values, mask, gamma=1.5)
    with pytest.raises(ValueError, match="values has shape"):
        gae(rewards, values[:, :3], mask)
    with pytest.raises(ValueError, match=r"rewards must have shape \(B, T\)"):
        gae(rewards[0], values[0], mask[0])


# ----------------------------------------------------------------------------------------- PPO losses
def test_ppo_policy_loss_hand_computed():
    logp_old = torch.zeros(1, 4)
    # ratios 1.5, 0.9, 0.5 at the three action tokens; a huge garbage value at the masked-out token
    logp_new = torch.tensor([[math.log(1.5), math.log(0.9), math.log(0.5), 100.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = ppo_policy_loss(logp_new, logp_old, adv, mask, clip=0.2)
    # token 0: r = 1.5, A = 1:  max(−1.5, −1.2) = −1.2 (clipped)
    # token 1: r = 0.9, A = −1: max(0.9, 0.9)   =  0.9 (inside the clip range)
    # token 2: r = 0.5, A = −2: max(1.0, 1.6)   =  1.6 (clipped at 0.8)
    # loss = (−1.2 + 0.9 + 1.6) / 3 = 0.4333333
    assert loss.item() == pytest.approx(1.3 / 3, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)  # |r − 1| = 0.5, 0.1, 0.5 > 0.2?
    # k3 = (r − 1) − log r: 0.5 − 0.4054651 = 0.0945349; −0.1 + 0.1053605 = 0.0053605; −0.5 + 0.6931472 = 0.1931472
    # mean = 0.2930426 / 3 = 0.0976809
    assert metrics["approx_kl"] == pytest.approx(0.0976809, abs=1e-6)
    assert metrics["ratio"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, abs=1e-6)
    # gradient: clipped tokens get 0; token 1: d(−A·r)/d logp = −A·r / 3 = 0.9 / 3 = 0.3; masked token 0 (no NaN)
    loss.backward()
    torch.testing.assert_close(logp_new.grad, torch.tensor([[0.0, 0.3, 0.0, 0.0]]))


def test_ppo_value_loss_hand_computed():
    v_old = torch.tensor([[1.0, 1.0, 1.0, 7.0]])
    v_new = torch.tensor([[1.5, 0.9, 2.0, 7.0]], requires_grad=True)
    ret = torch.tensor([[2.0, 0.0, 1.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = ppo_value_loss(v_new, v_old, ret, mask, clip=0.2)
    # t0: (1.5 − 2)² = 0.25; clipped V = 1.2: (1.2 − 2)² = 0.64 -> 0.64 (clipped larger)
    # t1: (0.9 − 0)² = 0.81; clipped V = 0.9 (inside)       -> 0.81
    # t2: (2.0 − 1.2)² = 0.64; clipped V = 1.2: 0            -> 0.64
    # loss = 0.5 · (0.64 + 0.81 + 0.64) / 3 = 0.3483333
    assert loss.item() == pytest.approx(0.5 * 2.09 / 3, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    # unclipped: 0.5 · (0.25 + 0.81 + 0.64) / 3 = 0.2833333
    loss_plain, m_plain = ppo_value_loss(v_new, v_old, ret, mask, clip=None)
    assert loss_plain.item() == pytest.approx(0.5 * 1.7 / 3, abs=1e-6)
    assert m_plain["clip_fraction"] == 0.0
    # gradients: t0 clipped branch (V_old + 0.2 is constant in V) -> 0; t1: (0.9 − 0)/3 = 0.3; t2: (2 − 1.2)/3
    loss.backward()
    torch.testing.assert_close(v_new.grad, torch.tensor([[0.0, 0.3, 0.8 / 3, 0.0]]))


def test_ppo_losses_reject_bad_clip():
    z = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        ppo_policy_loss(z, z, z, m, clip=0.0)
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        ppo_value_loss(z, z, z, m, clip=-1.0)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_policy_loss(z, z, torch.zeros(1, 3), m)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    val = torch.tensor([[1.0, 2.0, 3.0, 5.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # residual [0, 0, 0, −1]: mean −0.25, var (3·0.0625 + 0.5625) / 4 = 0.1875
    # returns var: mean 2.5, ((1.5² + 0.5²)·2) / 4 = 1.25 -> 1 − 0.1875 / 1.25 = 0.85
    assert explained_variance(val, ret, mask) == pytest.approx(0.85)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert math.isnan(explained_variance(val, torch.ones(1, 5), mask))


def test_kl_penalized_rewards_and_sequence_kl():
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    logp = torch.tensor([[-9.0, -1.0, -2.0, -0.5, -9.0]])
    logp_ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0]])
    scores = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0]])  # the turn's score on its last assistant token
    rewards = kl_penalized_rewards(scores, logp, logp_ref, mask, kl_coef=0.1)
    # logp − logp_ref at actions: 0.5, −1.0, 0 -> −0.1 × that: −0.05, 0.1, 0; plus score 2 on the last token
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1, 2.0, 0.0]]))
    torch.testing.assert_close(sequence_kl(logp, logp_ref, mask), t(-0.5))  # 0.5 − 1.0 + 0
    torch.testing.assert_close(kl_penalized_rewards(scores, logp, logp_ref, mask, kl_coef=0.0), scores)
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        kl_penalized_rewards(scores, logp, logp_ref, mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match="scores has non-zero entries where mask is 0"):
        kl_penalized_rewards(torch.tensor([[1.0, 0, 0, 0, 0]]), logp, logp_ref, mask, kl_coef=0.1)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    # kl 9: error 9/6 − 1 = 0.5 -> clipped to 0.2; × (1 + 0.2 · 1000/10000) = × 1.02 -> 0.102
    assert ctl.update(9.0, n_steps=1000) == pytest.approx(0.102)
    # kl 5.4: error 0.9 − 1 = −0.1; × (1 − 0.1 · 0.1) = × 0.99 -> 0.10098
    assert ctl.update(5.4, n_steps=1000) == pytest.approx(0.10098)
    fixed = AdaptiveKLController(value=0.05)
    assert fixed.update(100.0, n_steps=1000) == 0.05 and fixed.value == 0.05
    with pytest.raises(ValueError, match="target must be a finite number > 0"):
        AdaptiveKLController(value=0.1, target=0.0)
    with pytest.raises(ValueError, match="value must be a number >= 0"):
        AdaptiveKLController(value=-0.1)
    with pytest.raises(ValueError, match="current_kl must be finite"):
        ctl.update(float("nan"), n_steps=1)
