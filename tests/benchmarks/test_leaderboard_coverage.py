"""The look coverage check (python -m benchmarks.leaderboard.coverage): counts on worlds whose answers are known."""

import numpy as np
import pytest

import benchmarks.leaderboard as lb
from benchmarks.leaderboard import coverage
from benchmarks.leaderboard.stats import seed_test


def test_a_constant_difference_is_always_covered_and_never_a_false_claim():
    # every draw of a constant matrix has mean c and no spread: both intervals are [c, c] and cover c; centred on 0
    # every draw is all zeros, whose seed-level p is 1: no false claim, and no p as small as the observed 0
    c = coverage.resampled_coverage(np.full((4, 5), 0.25), sims=20, alpha=0.05)
    assert (c.crossed, c.seed_level, c.false_claims, c.false_rule, c.calibrated_p) == (1.0, 1.0, 0.0, 0.0, 0.0)
    assert c.error(0.5) == pytest.approx(np.sqrt(0.25 / 20))


def test_on_a_normal_world_the_intervals_cover_and_the_test_keeps_its_level():
    rng = np.random.default_rng(3)
    diff = rng.normal(0.2, 0.3, (12, 1)) + rng.normal(0, 0.5, (1, 40)) + rng.normal(0, 0.5, (12, 40))
    c = coverage.resampled_coverage(diff, sims=300, alpha=0.05, n_boot=100)
    assert 0.9 <= c.crossed <= 0.98  # 300 draws: Monte-Carlo error ~0.013
    # the seed-level test holds the states fixed, and this world draws them too: it covers less and claims more
    # often than its level, and the crossed interval is what the rule adds to keep a claim near its level
    assert 0.8 <= c.seed_level <= 0.95 and 0.05 <= c.false_claims <= 0.2
    assert c.false_rule < c.false_claims and c.false_rule <= 0.1
    p = seed_test(diff).p
    assert p is not None and 0.1 < p < 0.15 and 0.1 < c.calibrated_p < 0.3  # this draw's own p, read in its world


def test_a_consistent_difference_reads_as_rare_in_its_centred_world():
    # every seed's difference positive and large: the observed p is tiny, and draws from the world centred on 0
    # rarely reach it, though they do pass the test at 0.05 at times
    diff = np.linspace(0.5, 1.0, 8)[:, None] + np.zeros((1, 6))
    c = coverage.resampled_coverage(diff, sims=200, alpha=0.05, n_boot=50)
    assert c.calibrated_p < 0.02 and c.false_claims > 0.0


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"at least 2 of each, got shape \(1, 3\)"):
        coverage.resampled_coverage(np.zeros((1, 3)), sims=5, alpha=0.05)
    assert coverage.main([str(tmp_path / "missing.csv"), "--a", "refuel", "--b", "initial"]) == 2
    assert "missing.csv" in capsys.readouterr().err
    groups = {"initial": {"success": np.zeros((1, 3, 2))},
              "refuel": {"success": np.tile(np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]), (3, 1, 1))}}
    lb.write_states(tmp_path / "a.csv", lb.Matrices(groups, {"refuel": [5, 6, 7]}, ["s0", "s1", "s2"],
                                                    [False, False, False], None))
    assert coverage.main([str(tmp_path / "a.csv"), "--a", "rebel", "--b", "initial"]) == 2
    assert "--a/--b: no agent 'rebel' in these files (agents: ['initial', 'refuel'])" in capsys.readouterr().err
    assert coverage.main([str(tmp_path / "a.csv"), "--a", "refuel", "--b", "initial", "--turn", "3"]) == 2
    assert "--turn: 3 is not a turn of these runs (1-2)" in capsys.readouterr().err
    assert coverage.main([str(tmp_path / "a.csv"), "--a", "refuel", "--b", "initial", "--turn", "2", "--sims", "10",
                          "--out", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    assert "refuel - initial, success at h=2: population = the observed 3 seeds x 3 states (mean +0.667)" in out
    assert (tmp_path / "c.md").read_text().strip() == out.strip()
