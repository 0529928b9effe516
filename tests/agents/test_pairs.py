"""Checks of agents.common.pairs: best/worst selection and REFUEL's turn sampling."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from agents.common.pairs import reference_turn_distribution, sample_turn, select_best_worst


# ----------------------------------------------------------------------------------------- select_best_worst
def test_best_and_worst():
    assert select_best_worst([0.2, 0.9, -0.4, 0.1]) == (1, 2)
    assert select_best_worst(np.array([3.0, 1.0])) == (0, 1)
    out = select_best_worst([0.5, 0.7])
    assert out == (1, 0) and all(type(i) is int for i in out)


def test_ties_are_dropped_and_partial_ties_pick_lowest_index():
    assert select_best_worst([0.3, 0.3, 0.3]) is None
    assert select_best_worst([0.3]) is None  # no pair from one sample
    assert select_best_worst([]) is None
    # two equal best (index 1 and 3) and two equal worst (0 and 2): the lowest index of each wins
    assert select_best_worst([0.0, 1.0, 0.0, 1.0]) == (1, 0)


def test_length_penalty_flips_the_choice():
    rewards, chars = [1.0, 0.8, 0.5], [300, 50, 100]
    assert select_best_worst(rewards, chars) == (0, 2)  # λ = 0: lengths are ignored
    # λ = 0.001: 1.0 − 0.3 = 0.70, 0.8 − 0.05 = 0.75, 0.5 − 0.1 = 0.40 -> best 1, worst 2
    assert select_best_worst(rewards, chars, length_penalty=0.001) == (1, 2)
    # λ = 0.002: 1.0 − 0.6 = 0.40, 0.8 − 0.1 = 0.70, 0.5 − 0.2 = 0.30 -> best 1, worst 2
    assert select_best_worst(rewards, chars, length_penalty=0.002) == (1, 2)
    # λ = 0.004: 1.0 − 1.2 = −0.2, 0.8 − 0.2 = 0.60, 0.5 − 0.4 = 0.10 -> best 1, worst 0
    assert select_best_worst(rewards, chars, length_penalty=0.004) == (1, 0)
    # the penalty can create a tie: 1.0 − 0.5·1 = 0.5 = 0.75 − 0.5·0.5 -> dropped
    assert select_best_worst([1.0, 0.75], [1, 0.5], length_penalty=0.5) is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rewards": [0.1, float("nan")]}, r"rewards\[1\] is nan"),
    ({"rewards": [[0.1, 0.2]]}, "rewards must be 1-D"),
    ({"rewards": ["a", "b"]}, "rewards must be a sequence of numbers"),
    ({"rewards": [0.1, 0.2], "lengths": [1, 2, 3]}, "lengths has 3 entries but rewards has 2"),
    ({"rewards": [0.1, 0.2], "lengths": [1, -2]}, r"lengths\[1\] is negative"),
    ({"rewards": [0.1, 0.2], "length_penalty": -0.1}, "length_penalty must be a finite number >= 0"),
    ({"rewards": [0.1, 0.2], "length_penalty": 0.001}, "needs lengths"),
])
def test_select_best_worst_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_best_worst(**kwargs)


# ----------------------------------------------------------------------------------------- turn sampling
def test_reference_turn_distribution_exact():
    p = reference_turn_distribution(5)
    # P(h) = (1/5) · Σ_{H'=h..5} 1/H'
    #   h=1: (1/5)(1 + 1/2 + 1/3 + 1/4 + 1/5) = (1/5)(137/60) = 137/300 ≈ 0.4567
    #   h=2: (1/5)(1/2 + 1/3 + 1/4 + 1/5)     = (1/5)(77/60)  =  77/300 ≈ 0.2567
    #   h=3: (1/5)(1/3 + 1/4 + 1/5)           = (1/5)(47/60)  =  47/300 ≈ 0.1567
    #   h=4: (1/5)(1/4 + 1/5)                 = (1/5)(27/60)  =  27/300 = 0.09
    #   h=5: (1/5)(1/5)                       = (1/5)(12/60)  =  12/300 = 0.04
    # 137 + 77 + 47 + 27 + 12 = 300
    expected = [Fraction(137, 300), Fraction(77, 300), Fraction(47, 300), Fraction(27, 300), Fraction(12, 300)]
    np.testing.assert_allclose(p, [float(f) for f in expected], rtol=0, atol=1e-15)
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(reference_turn_distribution(1), [1.0])
    np.testing.assert_allclose(reference_turn_distribution(2), [0.75, 0.25])  # (1/2)(1 + 1/2), (1/2)(1/2)


def test_sample_turn_reference_frequencies():
    rng = np.random.default_rng(0)
    n = 20_000
    draws = [sample_turn(rng, 5, "reference") for _ in range(n)]
    assert all(1 <= h <= horizon <= 5 and type(h) is int and type(horizon) is int for horizon, h in draws)
    freq = np.bincount([h for _, h in draws], minlength=6)[1:] / n
    # binomial standard error ≤ sqrt(0.25 / 20000) ≈ 0.0035; 0.015 is > 4 standard errors
    np.testing.assert_allclose(freq, reference_turn_distribution(5), atol=0.015)
    horizons = np.bincount([hz for hz, _ in draws], minlength=6)[1:] / n
    np.testing.assert_allclose(horizons, [0.2] * 5, atol=0.015)  # H' uniform in 1..5


def test_sample_turn_uniform_and_determinism():
    rng = np.random.default_rng(1)
    draws = [sample_turn(rng, 4, "uniform") for _ in range(8_000)]
    assert {hz for hz, _ in draws} == {4}
    freq = np.bincount([h for _, h in draws], minlength=5)[1:] / len(draws)
    np.testing.assert_allclose(freq, [0.25] * 4, atol=0.02)
    a = [sample_turn(np.random.default_rng(7)) for _ in range(3)]
    b = [sample_turn(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    assert sample_turn(np.random.default_rng(0), max_horizon=1) == (1, 1)


def test_sample_turn_last_is_the_horizon_and_draws_nothing():
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    assert [sample_turn(rng, 4, "last") for _ in range(3)] == [(4, 4)] * 3
    assert rng.bit_generator.state == state  # the plan's later draws (seeds) are unchanged by the mode


def test_sample_turn_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="mode must be one of reference, uniform, last"):
        sample_turn(rng, 5, "first")
    with pytest.raises(ValueError, match="max_horizon must be an int >= 1"):
        sample_turn(rng, 0)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        sample_turn(np.random.RandomState(0))
    with pytest.raises(ValueError, match="max_horizon must be an int >= 1"):
        reference_turn_distribution(2.5)
