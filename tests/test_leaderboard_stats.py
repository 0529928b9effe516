"""The leaderboard's intervals: the hierarchical bootstrap and paired differences, against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.leaderboard.stats import hierarchical_ci, hierarchical_means, paired_difference, paired_rows


def freq(means: np.ndarray, value: float) -> float:
    return float(np.isclose(means, value).mean())


def test_one_seed_resamples_the_states_only():
    # one seed, states [0, 1]: a replicate draws 2 states -> mean 0, 0.5, 1 with probability 1/4, 1/2, 1/4
    means = hierarchical_means(np.array([[0.0, 1.0]]), 40_000, np.random.default_rng(0))
    assert freq(means, 0.0) == pytest.approx(0.25, abs=0.01) and freq(means, 0.5) == pytest.approx(0.5, abs=0.01)
    assert freq(means, 1.0) == pytest.approx(0.25, abs=0.01)


def test_seeds_are_resampled_before_the_states():
    # two seeds whose states agree ([0, 0] and [1, 1]): only the seed draw matters -> 0, 0.5, 1 at 1/4, 1/2, 1/4
    means = hierarchical_means(np.array([[0.0, 0.0], [1.0, 1.0]]), 40_000, np.random.default_rng(1))
    assert freq(means, 0.0) == pytest.approx(0.25, abs=0.01) and freq(means, 0.5) == pytest.approx(0.5, abs=0.01)
    # two identical seeds [0, 1]: 4 state draws in all (2 per drawn seed) -> P(mean 0) = 1/16, P(0.5) = 6/16
    means = hierarchical_means(np.array([[0.0, 1.0], [0.0, 1.0]]), 40_000, np.random.default_rng(2))
    assert freq(means, 0.0) == pytest.approx(1 / 16, abs=0.01) and freq(means, 0.5) == pytest.approx(6 / 16, abs=0.01)


def test_seed_to_seed_variance_widens_the_interval():
    rng = np.random.default_rng(3)
    n = 40
    # the same 120 outcomes (60 ones), once spread evenly over 3 seeds, once concentrated by seed (training varies)
    even = np.stack([rng.permutation(np.r_[np.ones(20), np.zeros(20)]) for _ in range(3)])
    spread = np.stack([np.r_[np.ones(k), np.zeros(n - k)] for k in (8, 20, 32)])
    assert even.mean() == spread.mean() == 0.5
    m1, lo1, hi1 = hierarchical_ci(even, n_boot=4000, seed=0)
    m2, lo2, hi2 = hierarchical_ci(spread, n_boot=4000, seed=0)
    assert m1 == m2 == 0.5 and lo2 < lo1 < 0.5 < hi1 < hi2
    assert (hi2 - lo2) > 1.5 * (hi1 - lo1)


def test_a_constant_matrix_has_a_point_interval():
    assert hierarchical_ci(np.full((3, 5), 0.25), n_boot=200) == (0.25, 0.25, 0.25)


def test_paired_differences_by_hand():
    a = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert paired_difference(a, a.copy(), n_boot=500) == (0.0, 0.0, 0.0)  # identical agents: exactly 0
    base = np.array([[0.0, 0.0, 1.0]])  # the initial policy: one row, compared with every seed
    d, lo, hi = paired_difference(a, base, n_boot=2000)
    assert d == pytest.approx((1 + 0 + 0 + 0 + 1 + 0) / 6) and lo <= d <= hi
    # the same states cancel: a policy that is better by exactly 1 on every state has the point interval (1, 1)
    assert paired_difference(base + 1, base, n_boot=300) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same states and seeds"):
        paired_difference(a, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same states and seeds"):
        paired_difference(a, np.zeros((3, 3)))


def test_paired_rows_compare_each_agent_with_the_initial_policy_and_with_each_other():
    base = np.zeros((1, 4, 2))
    refuel = np.ones((2, 4, 2))
    groups = {"initial": {"success": base, "score": base}, "refuel": {"success": refuel, "score": refuel},
              "rebel": {"success": refuel.copy(), "score": refuel * 0.5}, "dpo": {"success": refuel[:1],
                                                                                  "score": refuel[:1]}}
    rows = paired_rows(groups, {"refuel": [0, 1], "rebel": [0, 1], "dpo": [0]}, n_boot=200)
    pairs = {(r["a"], r["b"], r["metric"], r["turn"]): r for r in rows}
    assert pairs["refuel", "initial", "success", 2]["diff"] == 1.0 and pairs["refuel", "initial", "success", 2][
        "excludes_0"]
    assert pairs["refuel", "rebel", "success", 1]["diff"] == 0.0 and not pairs["refuel", "rebel", "success", 1][
        "excludes_0"]
    assert pairs["refuel", "rebel", "score", 1]["diff"] == 0.5
    assert ("refuel", "dpo", "score", 1) not in pairs  # different seeds: no agent-agent pairing
    assert len(rows) == (3 + 1) * 2 * 2  # 3 vs initial + refuel-rebel; 2 metrics; 2 turns
