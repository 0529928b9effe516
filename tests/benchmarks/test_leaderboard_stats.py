"""The leaderboard's statistics: the crossed bootstrap, its coverage on matrices of known structure, the seed-level
test and the power of a design."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.leaderboard.stats import (
    Design,
    components,
    crossed_ci,
    crossed_interval,
    crossed_means,
    detectable,
    paired_difference,
    paired_rows,
    seed_detectable,
    seed_power,
    seed_test,
    simulated_power,
)


def test_components_by_hand():
    # y = [[1, 3], [3, 5]]: mean 3, row effects -1, +1, column effects -1, +1, no interaction
    c = components(np.array([[1.0, 3.0], [3.0, 5.0]]))
    assert c.mean == 3.0 and list(c.seed) == [-1.0, 1.0] and list(c.state) == [-1.0, 1.0]
    assert np.all(c.rest == 0) and c.var_rest == 0.0
    assert c.var_seed == pytest.approx(2.0 / 2) and c.var_state == pytest.approx(2.0 / 2)  # s^2 = 2, over 2
    assert c.df == pytest.approx(2.0)  # (1 + 1)^2 / (1/1 + 1/1)


def test_one_row_resamples_the_states_only():
    # one row [0, 1]: SE^2 = s^2 / N = 0.5 / 2 exactly; the replicates' variance estimates it
    means = crossed_means(np.array([[0.0, 1.0]]), 40_000, np.random.default_rng(0))
    assert means.var() == pytest.approx(0.25, rel=0.03)
    i = crossed_interval(np.array([[0.0, 1.0, 1.0, 0.0, 1.0]]), n_boot=20_000)
    se = np.sqrt(np.var([0, 1, 1, 0, 1], ddof=1) / 5)
    assert i.se == pytest.approx(se, rel=0.02) and i.df == pytest.approx(4)
    assert i.hi - i.mean == pytest.approx(sps.t.ppf(0.975, 4) * i.se)


def test_the_states_are_shared_by_every_seed():
    # Every seed plays the same states: three identical rows are one row's information (the nested bootstrap,
    # drawing states per seed, made them look like three times the states)
    row = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    one, three = crossed_interval(row[None, :], n_boot=20_000), crossed_interval(np.stack([row] * 3), n_boot=20_000)
    assert three.se == pytest.approx(one.se, rel=0.03)


def test_seed_to_seed_variance_widens_the_interval():
    rng = np.random.default_rng(3)
    n = 40
    even = np.stack([rng.permutation(np.r_[np.ones(20), np.zeros(20)]) for _ in range(3)])
    spread = np.stack([np.r_[np.ones(k), np.zeros(n - k)] for k in (8, 20, 32)])
    assert even.mean() == spread.mean() == 0.5
    m1, lo1, hi1 = crossed_ci(even, n_boot=4000)
    m2, lo2, hi2 = crossed_ci(spread, n_boot=4000)
    assert m1 == m2 == 0.5 and lo2 < lo1 < 0.5 < hi1 < hi2
    assert (hi2 - lo2) > 1.5 * (hi1 - lo1)


def test_a_constant_matrix_has_a_point_interval():
    assert crossed_ci(np.full((3, 5), 0.25), n_boot=200) == (0.25, 0.25, 0.25)


def test_bad_matrices_are_named():
    with pytest.raises(ValueError, match=r"non-empty \(seeds, states\) matrix, got shape \(3,\)"):
        crossed_ci(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        crossed_ci(np.array([[0.0, np.nan]]))


# Coverage on matrices of known structure, y_ij = a_i + b_j + e_ij (truth 0), at the leaderboard's size (3 seeds x
# 64 states). 2000 datasets per regime: the Monte-Carlo error of a 95% coverage is sqrt(.95 * .05 / 2000) = 0.005,
# so the 93-97% window is +-4 of it (a correct procedure fails it with probability < 1e-4); ~6 s per regime.
@pytest.mark.parametrize("regime, sd_seed, sd_state, sd_rest", [
    ("state-dominated", 0.05, 1.0, 0.3),  # var share of the mean: seeds ~0%, states ~93%
    ("seed-dominated", 1.0, 0.1, 0.3),  # seeds ~99%: t with ~2 degrees of freedom
])
def test_crossed_intervals_cover_the_truth_95_percent_of_the_time(regime, sd_seed, sd_state, sd_rest):
    rng, n = np.random.default_rng(7), 2000
    covered = 0
    for k in range(n):
        y = rng.normal(0, sd_seed, (3, 1)) + rng.normal(0, sd_state, (1, 64)) + rng.normal(0, sd_rest, (3, 64))
        i = crossed_interval(y, n_boot=200, seed=k)
        covered += i.lo <= 0.0 <= i.hi
    assert 0.93 <= covered / n <= 0.97, f"{regime}: coverage {covered / n:.3f}"


def test_the_nested_bootstrap_mistake_would_fail_the_coverage_test():
    # The same test applied to the earlier nested bootstrap (states drawn per drawn seed) covers far less in the
    # state-dominated regime: the check can fail.
    rng, n, covered = np.random.default_rng(8), 400, 0
    for _ in range(n):
        y = rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 1.0, (1, 64)) + rng.normal(0, 0.3, (3, 64))
        seeds = rng.integers(0, 3, size=(300, 3))
        states = rng.integers(0, 64, size=(300, 3, 64))
        lo, hi = np.quantile(y[seeds[:, :, None], states].mean(axis=(1, 2)), [0.025, 0.975])
        covered += lo <= 0 <= hi
    assert covered / n < 0.9


def test_paired_differences_by_hand():
    a = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert paired_difference(a, a.copy(), n_boot=500) == (0.0, 0.0, 0.0)  # identical agents: exactly 0
    base = np.array([[0.0, 0.0, 1.0]])  # the initial policy: one row, compared with every seed
    d, lo, hi = paired_difference(a, base, n_boot=2000)
    assert d == pytest.approx((1 + 0 + 0 + 0 + 1 + 0) / 6) and lo <= d <= hi
    assert paired_difference(base + 1, base, n_boot=300) == (1.0, 1.0, 1.0)  # the same states cancel
    with pytest.raises(ValueError, match="same states and seeds"):
        paired_difference(a, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same states and seeds"):
        paired_difference(a, np.zeros((3, 3)))


def test_seed_test_by_hand():
    # per-seed means 0.5, 0.75, 1.0: mean 0.75, sd 0.25, t = 0.75 / (0.25 / sqrt 3) with 2 degrees of freedom
    d = np.array([[0.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    t = seed_test(d)
    assert t.seeds == 3 and t.mean == pytest.approx(0.75)
    assert t.p == pytest.approx(2 * sps.t.sf(0.75 / (0.25 / np.sqrt(3)), 2))
    assert t.hi - t.mean == pytest.approx(sps.t.ppf(0.975, 2) * 0.25 / np.sqrt(3))
    assert t.sd == pytest.approx(0.25)
    one = seed_test(d[:1])
    assert one.seeds == 1 and one.p is None and one.lo is None and one.sd is None
    assert seed_test(np.zeros((3, 4))).p == 1.0


def test_seed_power_is_how_often_the_seed_test_passes():
    # at difference 0 the two tails of the central t hold exactly alpha
    assert seed_power(0.0, 0.4, 8, 0.048) == pytest.approx(0.048)
    assert seed_power(0.3, 0.4, 8, 0.05) == pytest.approx(seed_power(-0.3, 0.4, 8, 0.05))  # two-sided
    # by hand, far from 0: the upper tail alone, P(T > t_crit) of a noncentral t with nc = d sqrt(S) / sd
    nc, t = 0.45 * np.sqrt(8) / 0.386, sps.t.ppf(1 - 0.005 / 2, 7)
    assert seed_power(0.45, 0.386, 8, 0.005) == pytest.approx(sps.nct.sf(t, 7, nc), abs=1e-6)
    # against the test itself: normal per-seed means, seed_test's p below the threshold (4000 draws, MC se <= 0.008)
    rng = np.random.default_rng(5)
    for d, sd, seeds, alpha in ((0.45, 0.386, 8, 0.005), (0.19, 0.386, 16, 0.048), (0.1, 0.3, 3, 0.05)):
        hits = np.mean([seed_test(rng.normal(d, sd, (seeds, 1))).p < alpha for _ in range(4000)])
        assert hits == pytest.approx(seed_power(d, sd, seeds, alpha), abs=0.03), (d, sd, seeds, alpha)
    # far out in the tails it stays a probability (scipy's noncentral t cdf there is nan)
    assert seed_power(0.19, 0.022, 8, 0.005) == 1.0 and seed_power(-0.19, 0.022, 8, 0.005) == 1.0
    # the detectable difference is where the power reaches 80%, and it grows with the spread and a stricter alpha
    mde = seed_detectable(0.386, 16, 0.048)
    assert seed_power(mde, 0.386, 16, 0.048) == pytest.approx(0.8, abs=1e-6)
    assert seed_detectable(0.386, 16, 0.005) > mde > seed_detectable(0.2, 16, 0.048)
    assert seed_detectable(0.386, 2, 1e-8) == np.inf  # out of reach: said so (it ran for minutes before)
    for bad in ((0.1, 0.3, 1, 0.05), (0.1, 0.0, 8, 0.05), (0.1, 0.3, 8, 0.0), (0.1, 0.3, 8, 1.0)):
        with pytest.raises(ValueError, match="seed_power needs seeds >= 2, sd > 0 and 0 < alpha < 1"):
            seed_power(*bad)


def test_mde80_is_the_difference_seen_80_percent_of_the_time():
    # Gaussian matrices shifted by mde80 at the design's true SE (0.2^2/3 + 0.5^2/64 + 0.5^2/192) and typical
    # degrees of freedom are detected ~80% of the time (400 datasets: Monte-Carlo error 0.02)
    rng = np.random.default_rng(11)

    def draw(shift: float) -> np.ndarray:
        return shift + rng.normal(0, 0.2, (3, 1)) + rng.normal(0, 0.5, (1, 64)) + rng.normal(0, 0.5, (3, 64))

    se = np.sqrt(0.2 ** 2 / 3 + 0.5 ** 2 / 64 + 0.5 ** 2 / 192)
    df = np.median([crossed_interval(draw(0.0), n_boot=200, seed=k).df for k in range(100)])
    mde = detectable(float(sps.t.ppf(0.975, df)), df) * se
    hits = np.mean([crossed_interval(draw(mde), n_boot=200, seed=k).lo > 0 for k in range(400)])
    assert 0.74 <= hits <= 0.86
    assert detectable(1.96, float("inf")) == pytest.approx(1.96 + 0.8416, abs=1e-3)  # known variance: t + z


def test_simulated_power_grows_with_the_effect_and_the_design():
    small = Design(seeds=3, states=32, base=0.6, sd_seed=0.2, sd_state=1.5)
    p0, e0 = simulated_power(small, 0.0, n_sim=200, n_boot=200)
    p1, _ = simulated_power(small, 0.15, n_sim=200, n_boot=200)
    p2, _ = simulated_power(Design(seeds=3, states=128, base=0.6, sd_seed=0.2, sd_state=1.5), 0.15, n_sim=200,
                            n_boot=200)
    assert p0 <= 0.025 + 3 * 0.011  # no effect: one side of a 95% interval, ~2.5%
    assert p0 < p1 < p2 and p2 > 0.5
    assert e0 == pytest.approx(np.sqrt(p0 * (1 - p0) / 200))


def test_design_true_difference_matches_its_logit_shift():
    d = Design(seeds=3, states=64, base=0.5, sd_seed=0.0, sd_state=0.0)
    assert d.true_difference(0.0) == pytest.approx(0.0, abs=1e-3)
    assert d.true_difference(np.log(3)) == pytest.approx(0.25, abs=2e-3)  # sigmoid(log 3) = 0.75
    assert d.true_difference(d.effect_for(0.1)) == pytest.approx(0.1, abs=2e-3)


def test_paired_rows_compare_each_agent_with_the_initial_policy_and_with_each_other():
    base = np.zeros((1, 4, 2))
    refuel = np.ones((2, 4, 2))
    groups = {"initial": {"success": base, "score": base}, "refuel": {"success": refuel, "score": refuel},
              "rebel": {"success": refuel.copy(), "score": refuel * 0.5}, "dpo": {"success": refuel[:1],
                                                                                  "score": refuel[:1]}}
    rows = paired_rows(groups, {"refuel": [0, 1], "rebel": [0, 1], "dpo": [0]}, n_boot=200)
    pairs = {(r["a"], r["b"], r["metric"], r["turn"]): r for r in rows}
    r = pairs["refuel", "initial", "success", 2]
    assert r["diff"] == 1.0 and r["excludes_0"] and r["seeds"] == 2 and r["seed_p"] == 0.0
    assert pairs["refuel", "rebel", "success", 1]["diff"] == 0.0 and not pairs["refuel", "rebel", "success", 1][
        "excludes_0"]
    assert pairs["refuel", "rebel", "score", 1]["diff"] == 0.5
    # dpo ran seed 0 only: it is paired with each agent on that seed, and the row says so
    assert pairs["refuel", "dpo", "score", 1]["seeds"] == 1 and pairs["refuel", "dpo", "score", 1]["on_seeds"] == [0]
    assert pairs["refuel", "rebel", "score", 1]["on_seeds"] is None  # the same seeds
    assert pairs["refuel", "initial", "score", 1]["on_seeds"] is None
    assert len(rows) == (3 + 3) * 2 * 2  # 3 vs initial + 3 agent pairs; 2 metrics; 2 turns


def test_agents_are_paired_by_seed_not_by_row_position():
    # a: seeds [0, 1, 2], b: seeds [2, 0]; row k of each is its k-th seed. a - b on seeds 0 and 2 is 10 - 1 = 9 and
    # 30 - 3 = 27 on every state: mean 18. Seed 1 (a only) and the rows' order must not enter.
    a = np.array([10.0, 20.0, 30.0])[:, None, None] * np.ones((3, 4, 1))
    b = np.array([3.0, 1.0])[:, None, None] * np.ones((2, 4, 1))
    groups = {"initial": {"score": np.zeros((1, 4, 1))}, "a": {"score": a}, "b": {"score": b}}
    rows = paired_rows(groups, {"a": [0, 1, 2], "b": [2, 0]}, n_boot=200, metrics=("score",))
    r = next(r for r in rows if (r["a"], r["b"]) == ("a", "b"))
    assert r["diff"] == pytest.approx(18.0) and r["seeds"] == 2 and r["on_seeds"] == [0, 2]
    groups["c"] = {"score": np.ones((1, 4, 1))}
    rows = paired_rows(groups, {"a": [0, 1, 2], "b": [2, 0], "c": [7]}, n_boot=200, metrics=("score",))
    assert not [r for r in rows if "c" in (r["a"], r["b"]) and "initial" not in (r["a"], r["b"])]  # nothing shared


def test_a_sweep_that_cannot_tell_rates_apart_gives_every_agent_one_shared_rate():
    from benchmarks.leaderboard.runner import choose_rates

    n = 64
    ones, zeros, half = np.ones(n), np.zeros(n), np.r_[np.ones(n // 2), np.zeros(n // 2)]
    # refuel: 1e-3 solves everything, 1e-4 nothing (decisive); rebel: the same outcomes at both rates (a tie)
    values = {"refuel": {1e-4: zeros, 1e-3: ones}, "rebel": {1e-4: half, 1e-3: half.copy()}}
    chosen, decisive, shared = choose_rates([1e-4, 1e-3], values, n_boot=200)
    assert decisive == {"refuel": True, "rebel": False}
    assert shared == 1e-3 and chosen == {"refuel": 1e-3, "rebel": 1e-3}  # pooled: (0 + .5) vs (1 + .5)
    # both decisive, for different rates: each keeps its own
    values["rebel"] = {1e-4: ones, 1e-3: zeros}
    chosen, decisive, _ = choose_rates([1e-4, 1e-3], values, n_boot=200)
    assert all(decisive.values()) and chosen == {"refuel": 1e-3, "rebel": 1e-4}
    # a one-state difference is noise, not a decision; a full tie goes to the rate listed first
    tie = {"rebel": {1e-4: half, 1e-3: np.r_[half[:-1], 1.0]}, "dpo": {1e-4: half, 1e-3: half}}
    chosen, decisive, shared = choose_rates([1e-4, 1e-3], tie, n_boot=200)
    assert not any(decisive.values()) and shared == 1e-3 and set(chosen.values()) == {1e-3}
    chosen, _, shared = choose_rates([1e-4, 1e-3], {"dpo": {1e-4: half, 1e-3: half}}, n_boot=200)
    assert shared == 1e-4 == chosen["dpo"]


def test_fairness_is_the_spread_of_samples_and_optimizer_steps():
    from benchmarks.leaderboard.report import FAIR, fairness

    rows = [{"policy_samples": 100.0, "optimizer_steps": 16.0}, {"policy_samples": 104.0, "optimizer_steps": 20.0}]
    spread = fairness(rows)
    assert spread["policy_samples"] == pytest.approx(0.04) and spread["policy_samples"] <= FAIR
    assert spread["optimizer_steps"] == pytest.approx(0.25) and spread["optimizer_steps"] > FAIR
    assert fairness(rows[:1]) == {} and fairness([{"policy_samples": 0.0}, {"policy_samples": 3.0}])[
        "policy_samples"] == float("inf")
