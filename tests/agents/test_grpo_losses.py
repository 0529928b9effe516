"""GRPO / RLOO / Dr. GRPO math against hand-worked numbers (agents/common/grpo_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from agents.common.grpo_losses import group_advantages, grpo_loss

# one hand-made group: returns 1, 2, 3, 6 -> mean 3, centred (-2, -1, 0, 3), sample variance (4+1+0+9)/3 = 14/3
GROUP = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
STD = math.sqrt(14 / 3)


@pytest.mark.parametrize("baseline, scale, expected", [
    ("mean", "none", [-2.0, -1.0, 0.0, 3.0]),
    # leave-one-out: 1 - (2+3+6)/3 = -8/3, 2 - (1+3+6)/3 = -4/3, 3 - (1+2+6)/3 = 0, 6 - (1+2+3)/3 = 4
    ("loo", "none", [-8 / 3, -4 / 3, 0.0, 4.0]),
    ("mean", "std", [-2 / STD, -1 / STD, 0.0, 3 / STD]),
    ("loo", "std", [-8 / 3 / STD, -4 / 3 / STD, 0.0, 4 / STD]),
])
def test_advantages_of_a_hand_made_group(baseline, scale, expected):
    adv, metrics = group_advantages(GROUP, baseline, scale, eps=1e-12)
    torch.testing.assert_close(adv, torch.tensor([expected]), rtol=1e-6, atol=1e-6)
    assert metrics["groups"] == 1 and metrics["equal_groups"] == 0
    assert metrics["return_std"] == pytest.approx(STD)


def test_eps_keeps_a_near_tie_from_blowing_up():
    adv, _ = group_advantages(torch.tensor([[0.0, 1e-6]]), "mean", "std", eps=1e-4)
    # centred +-5e-7, std 7.07e-7: divided by 1.0707e-4, not by 7e-7
    assert adv.abs().max().item() == pytest.approx(5e-7 / (math.sqrt(2) * 5e-7 + 1e-4), rel=1e-5)


def test_all_equal_groups_get_zero_and_are_counted():
    returns = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5], [-1.0, -1.0, -1.0, -1.0]])
    for baseline in ("mean", "loo"):
        for scale in ("std", "none"):
            adv, metrics = group_advantages(returns, baseline, scale)
            assert metrics["equal_groups"] == 2 and metrics["groups"] == 3
            assert torch.equal(adv[1:], torch.zeros(2, 4))
            assert adv[0].abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"returns": torch.tensor([1.0, 2.0])}, "returns must be a \\(N, G\\) tensor"),
    ({"returns": torch.tensor([[1.0]])}, "G >= 2"),
    ({"returns": torch.tensor([[1.0, float("nan")]])}, "returns must be finite"),
    ({"returns": GROUP, "baseline": "median"}, "baseline is 'median'; allowed: mean, loo"),
    ({"returns": GROUP, "scale": "mad"}, "scale is 'mad'; allowed: std, none"),
    ({"returns": GROUP, "eps": 0.0}, "eps must be a finite number > 0"),
])
def test_bad_advantage_input_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(**kwargs)


# ---- the surrogate ---------------------------------------------------------------------------------------------
# Two rows, logp_old = 0, so r = exp(logp_new): row 0 (A = 1) ratios 1.5, 0.9 and one padding position; row 1
# (A = -2) ratios 0.5, 1.1, 1.0. With clip 0.2, per token ℓ = -min(r·A, clip(r)·A):
#   row 0: r 1.5 -> -min(1.5, 1.2) = -1.2 (clipped: no gradient); r 0.9 -> -0.9 (dℓ/dlogp = -r·A = -0.9)
#   row 1: r 0.5 -> -min(-1.0, -1.6) = 1.6 (clipped); r 1.1 -> -min(-2.2, -2.4) = 2.2 (dℓ/dlogp = 2.2); r 1 -> 2
RATIOS = [[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]]
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -2.0])


def _logp_new() -> torch.Tensor:
    return torch.log(torch.tensor(RATIOS, dtype=torch.float64)).requires_grad_(True)


def test_surrogate_per_token_values_and_gradients():
    logp = _logp_new()
    loss, metrics = grpo_loss(logp, torch.zeros(2, 3, dtype=torch.float64), ADV, MASK, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.6 + 2.2 + 2.0) / 5)  # 0.74
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 5, 0.0], [0.0, 2.2 / 5, 2.0 / 5]],
                                                       dtype=torch.float64))
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["ratio"] == pytest.approx((1.5 + 0.9 + 0.5 + 1.1 + 1.0) / 5)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.9, 0.5, 1.1, 1.0)]
    assert metrics["approx_kl"] == pytest.approx(sum(k3) / 5) and metrics["kl_ref"] == 0.0


def test_surrogate_per_sequence_values_and_gradients():
    logp = _logp_new()
    loss, _ = grpo_loss(logp, torch.zeros(2, 3, dtype=torch.float64), ADV, MASK, normalization="sequence")
    # row 0: (-1.2 - 0.9) / 2 tokens = -1.05; row 1: (1.6 + 2.2 + 2) / 3 = 1.9333; mean over 2 sequences
    assert loss.item() == pytest.approx((-1.05 + 5.8 / 3) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9 / 2 / 2, 0.0], [0.0, 2.2 / 3 / 2, 2.0 / 3 / 2]],
                                                       dtype=torch.float64))


def test_micro_batches_with_the_minibatch_denominators_add_up_to_the_whole_loss():
    old = torch.zeros(2, 3, dtype=torch.float64)
    for norm, kw in (("token", {"tokens": 5.0}), ("sequence", {"sequences": 2.0})):
        whole, _ = grpo_loss(_logp_new(), old, ADV, MASK, normalization=norm)
        parts = [grpo_loss(_logp_new()[i:i + 1], old[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], normalization=norm,
                           **kw)[0] for i in range(2)]
        assert (parts[0] + parts[1]).item() == pytest.approx(whole.item())
    # a "sequence" spanning both rows (one dialogue of 5 action tokens): (-2.1 + 5.8) / 5 / 1 sequence
    loss, _ = grpo_loss(_logp_new(), old, ADV, MASK, normalization="sequence", sequences=1.0,
                        lengths=torch.tensor([5.0, 5.0]))
    assert loss.item() == pytest.approx(3.7 / 5)


def test_k3_kl_to_the_reference_adds_its_value_and_gradient():
    """beta = 0.1, logp_ref = 0: per token k3 = exp(-x) + x - 1 at x = log r, with gradient 1 - 1/r."""
    logp = _logp_new()
    old = torch.zeros(2, 3, dtype=torch.float64)
    loss, metrics = grpo_loss(logp, old, ADV, MASK, beta=0.1, logp_ref=torch.zeros(2, 3, dtype=torch.float64))
    ratios = [1.5, 0.9, 0.5, 1.1, 1.0]
    k3 = [1 / r + math.log(r) - 1 for r in ratios]  # 0.07213, 0.00649, 0.30685, 0.00440, 0
    assert loss.item() == pytest.approx(0.74 + 0.1 * sum(k3) / 5)
    assert metrics["kl_ref"] == pytest.approx(sum(k3) / 5)
    loss.backward()
    kl_grad = [[0.1 * (1 - 1 / 1.5) / 5, 0.1 * (1 - 1 / 0.9) / 5, 0.0],
               [0.1 * (1 - 1 / 0.5) / 5, 0.1 * (1 - 1 / 1.1) / 5, 0.0]]
    surrogate_grad = [[0.0, -0.9 / 5, 0.0], [0.0, 2.2 / 5, 2.0 / 5]]
    expected = torch.tensor(kl_grad, dtype=torch.float64) + torch.tensor(surrogate_grad, dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_an_all_equal_group_gives_zero_gradient():
    adv, _ = group_advantages(torch.tensor([[0.7, 0.7]]), "mean", "std")
    logp = _logp_new()
    for norm in ("token", "sequence"):
        loss, _ = grpo_loss(logp, torch.zeros(2, 3, dtype=torch.float64), adv[0], MASK, normalization=norm)
        loss.backward()
        assert torch.equal(logp.grad, torch.zeros_like(logp)) and loss.item() == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"normalization": "dialogue"}, "normalization is 'dialogue'; allowed: token, sequence"),
    ({"clip": 0.0}, "clip must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be a finite number >= 0"),
    ({"beta": 0.1}, "beta=0.1 needs logp_ref"),
    ({"advantages": torch.ones(3)}, "advantages must be \\(B,\\) = \\(2,\\)"),
    ({"mask": torch.tensor([[1, 1, 0], [0, 0, 0]])}, "row 1 of mask has no action token"),
    ({"logp_old": torch.zeros(2, 4)}, "logp_old must be a \\(B, T\\) tensor shaped like logp_new"),
    ({"tokens": 0.0}, "tokens must be a finite number > 0"),
])
def test_bad_surrogate_input_names_the_argument(kwargs, message):
    args = {"logp_new": _logp_new(), "logp_old": torch.zeros(2, 3, dtype=torch.float64), "advantages": ADV,
            "mask": MASK, **kwargs}
    with pytest.raises(ValueError, match=message):
        grpo_loss(**args)
