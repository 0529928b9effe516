"""Coverage of a look's intervals on a world shaped like its own data.

The unit test of the crossed interval checks coverage on Gaussian (seed + state + noise) matrices of 3 x 64. A look of
a real run has its own shape: more seeds, and per-seed differences that may be far from normal (last-turn DPO's are
bimodal). This command takes the observed (seeds x states) difference matrix of two agents as the population,
draws datasets of the same design from it (seeds and states drawn with replacement, crossed), and counts how often
the crossed 95% interval and the seed-level t-interval cover the population's mean difference; then it shifts the
population to a mean of 0 and counts how often the seed-level test passes at ``--alpha`` (its false-claim rate
here)::

    python -m benchmarks.leaderboard.coverage A_states.csv [B_states.csv ...] --a refuel --b dpo_last \\
        --metric success --turn 2 --seeds 5-20 --alpha 0.048 --sims 1000 --out benchmarks/results/x.md

The population is the data, so this checks the intervals where the data are, not everywhere; the Monte-Carlo
error of a coverage near 0.95 over 1000 draws is about 0.007. The seed-level test holds the stored states fixed
(it asks about these states), while this world draws states as well, so it is expected to cover less and claim more
often than its level here; the crossed interval carries the states' part, which is why a look-2 claim needs both.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.leaderboard.pool import parse_seeds, pooled_states
from benchmarks.leaderboard.stats import crossed_interval, seed_test


@dataclass(frozen=True)
class Coverage:
    """What :func:`resampled_coverage` counted: shares of ``sims`` draws, each with its Monte-Carlo error."""

    sims: int
    crossed: float
    seed_level: float
    false_claims: float
    false_rule: float
    calibrated_p: float

    def error(self, share: float) -> float:
        return float(np.sqrt(share * (1 - share) / self.sims))


def resampled_coverage(diff: np.ndarray, sims: int, alpha: float, n_boot: int = 200, seed: int = 0) -> Coverage:
    """Coverage of the crossed interval and the seed-level t-interval of ``diff``'s mean, on datasets drawn from
    ``diff`` itself (rows = seeds, columns = states, both drawn with replacement); on draws from ``diff`` centred
    on 0, the share in which the seed-level test passes at ``alpha`` (``false_claims``), the share in which it passes
    and the crossed interval also excludes 0 (``false_rule``, a look-2 claim), and the share whose seed-level p is
    at most the observed one (``calibrated_p``: the observed p read against this world's null)."""
    diff = np.asarray(diff, dtype=float)
    if diff.ndim != 2 or min(diff.shape) < 2:
        raise ValueError(f"diff: need a (seeds x states) matrix with at least 2 of each, got shape {diff.shape}")
    rng = np.random.default_rng(seed)
    truth = float(diff.mean())
    centred = diff - truth
    observed_p = seed_test(diff).p
    crossed = seeded = false = rule = below = 0
    for k in range(sims):
        rows = rng.integers(0, diff.shape[0], diff.shape[0])
        cols = rng.integers(0, diff.shape[1], diff.shape[1])
        draw = diff[np.ix_(rows, cols)]
        i = crossed_interval(draw, n_boot=n_boot, seed=k)
        crossed += i.lo <= truth <= i.hi
        null_draw = centred[np.ix_(rows, cols)]
        t, null = seed_test(draw), seed_test(null_draw)
        assert t.lo is not None and t.hi is not None and null.p is not None and observed_p is not None  # >= 2 seeds
        seeded += t.lo <= truth <= t.hi
        false += null.p < alpha
        rule += null.p < alpha and crossed_interval(null_draw, n_boot=n_boot, seed=sims + k).excludes_0()
        below += null.p <= observed_p
    return Coverage(sims, crossed / sims, seeded / sims, false / sims, rule / sims, below / sims)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard.coverage", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("states", nargs="+", type=Path, help="the run's _states.csv files, pooled in order")
    parser.add_argument("--a", required=True, help="agent a of the difference a - b")
    parser.add_argument("--b", required=True, help="agent b, or 'initial'")
    parser.add_argument("--metric", default="success")
    parser.add_argument("--turn", type=int, default=1, help="turn h, from 1")
    parser.add_argument("--seeds", help="training seeds to keep, e.g. 5-20")
    parser.add_argument("--alpha", type=float, default=0.05, help="the seed-level test's threshold")
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        _, mats = pooled_states(args.states, parse_seeds(args.seeds) if args.seeds else None)
        for name in (args.a, args.b):
            if name not in mats.groups:
                raise ValueError(f"--a/--b: no agent {name!r} in these files (agents: {sorted(mats.groups)})")
            if args.metric not in mats.groups[name]:
                raise ValueError(f"--metric: {name!r} has no {args.metric!r} (has {sorted(mats.groups[name])})")
        a, b = mats.groups[args.a][args.metric], mats.groups[args.b][args.metric]
        if not 1 <= args.turn <= a.shape[2]:
            raise ValueError(f"--turn: {args.turn} is not a turn of these runs (1-{a.shape[2]})")
        diff = a[:, :, args.turn - 1] - b[:, :, args.turn - 1]  # b's one row (initial) broadcasts to every seed
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = resampled_coverage(diff, args.sims, args.alpha)
    lines = [f"{args.a} - {args.b}, {args.metric} at h={args.turn}: population = the observed {diff.shape[0]} seeds "
             f"x {diff.shape[1]} states (mean {diff.mean():+.3f}), {c.sims} datasets drawn from it, seeds and states "
             "crossed, with replacement.", "",
             "| what | share | Monte-Carlo error |", "|---|---|---|",
             f"| crossed 95% interval covers the mean | {c.crossed:.3f} | {c.error(c.crossed):.3f} |",
             f"| seed-level 95% t-interval covers the mean | {c.seed_level:.3f} | {c.error(c.seed_level):.3f} |",
             f"| seed-level test passes at p < {args.alpha:g} when the mean is 0 | {c.false_claims:.3f} | "
             f"{c.error(c.false_claims):.3f} |",
             f"| ... and the crossed interval excludes 0 (a look-2 claim) when the mean is 0 | {c.false_rule:.3f} | "
             f"{c.error(c.false_rule):.3f} |",
             f"| seed-level p at most the observed {seed_test(diff).p:.4f} when the mean is 0 | {c.calibrated_p:.3f} | "
             f"{c.error(c.calibrated_p):.3f} |"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
