"""Paired differences of leaderboard runs pooled from their ``<report_name>_states.csv`` files.

    python -m benchmarks.leaderboard.pool A_states.csv B_states.csv [--n-boot 2000] [--seeds 5-12] [--per-seed]
        [--alpha 0.048 [--power-at 0.19,0.25]]

For one design run in parts: new seeds in another run directory, on another session's machine. The files must share
their stored states and the initial policy's results (:func:`~benchmarks.leaderboard.report.merge_states` refuses
otherwise) and, where both files carry one, the digest of the turn-1 probe's replies. Prints the paired tables of
the pooled seeds (success, or the score where the task has no verifier, at every turn; and the turn-1 probe) as the
report writes them. ``--seeds`` restricts every agent to the training seeds named (a pre-registered look at the
seeds it was read at, after later seeds were added to the same files); an agent that lacks one of them is an
error, so a look never silently compares fewer seeds than it names. ``--per-seed`` adds every policy's mean at
each training seed (and each pair of agents' difference, seed by seed). ``--alpha`` adds the seed-level test at a
pre-registered look's threshold: whether each comparison passes it, and its power there at the observed per-seed
spread (the smallest difference it detects with 80% probability, and the chance it passes at each ``--power-at``
difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.leaderboard.protocol import Matrices
from benchmarks.leaderboard.report import merge_states, paired_table, read_states
from benchmarks.leaderboard.stats import POWER, paired_rows, seed_detectable, seed_power


def probe_check(paths: list[Path], parts: list[Matrices]) -> str:
    """One line on the probe's replies: the same digest in every file, or which files could not be compared (written
    before states files carried the digest). Differing digests never get here: :func:`merge_states` refuses them."""
    known = [str(p) for p, m in zip(paths, parts, strict=True) if m.probe_replies]
    unknown = [str(p) for p, m in zip(paths, parts, strict=True) if not m.probe_replies]
    digest = next((m.probe_replies for m in parts if m.probe_replies), None)
    if not unknown:
        return f"Probe replies: digest {digest} in every file."
    old = f"{', '.join(unknown)} (written before states files carried the digest of the probe's replies)"
    if len(known) < 2:
        return f"Probe replies not compared: no two files carry a digest; not checked: {old}."
    return f"Probe replies: digest {digest} in {', '.join(known)}; not checked: {old}."


def parse_seeds(text: str) -> list[int]:
    """``"5-12"``, ``"5,6,9"`` or both (``"5-7,9"``) as a sorted list of distinct seeds.

    Raises:
        ValueError: a part is not a seed or an ascending range of seeds.
    """
    seeds: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--seeds: {part.strip()!r} is not a seed or a range like 5-12 (got {text!r})") from None
        if a < 0 or b < a:
            raise ValueError(f"--seeds: {part.strip()!r} is not an ascending range of seeds >= 0 (got {text!r})")
        seeds.update(range(a, b + 1))
    return sorted(seeds)


def select_seeds(mats: Matrices, seeds: list[int]) -> Matrices:
    """``mats`` with every agent restricted to ``seeds``, in its own row order (agents stay paired by seed).

    Raises:
        ValueError: an agent lacks one of ``seeds``, naming the agent and the seeds it has.
    """
    groups, kept = {"initial": mats.groups["initial"]}, {}
    for name, have in mats.seeds.items():
        missing = [s for s in seeds if s not in have]
        if missing:
            raise ValueError(f"--seeds: agent {name!r} has no run at seed(s) {missing} in these files (its seeds: "
                             f"{have})")
        rows = [k for k, s in enumerate(have) if s in seeds]
        groups[name] = {m: v[rows] for m, v in mats.groups[name].items()}
        kept[name] = [have[k] for k in rows]
    return Matrices(groups, kept, list(mats.states), list(mats.covered), mats.probe_replies)


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({np.std(values, ddof=1):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def per_seed_tables(mats: Matrices, outcome: str) -> list[str]:
    """Markdown tables of every policy's mean over the states at each training seed, one table per metric and turn
    (the outcome, the behaviour of interest where the task counts one, the probe), with each pair of agents'
    difference on the seeds both ran: what a pooled comparison averages, seed by seed. ``outcome``: "success", or
    "score" where the task has no verifier."""
    agents = [a for a in mats.groups if a != "initial"]
    seeds = sorted({s for a in agents for s in mats.seeds[a]})
    initial = mats.groups["initial"]
    lines: list[str] = []
    labels = {outcome: outcome, "asks": "the behaviour of interest", "probe": "the turn-1 probe (nats)"}
    for metric, label in labels.items():
        if not any(metric in mats.groups[a] for a in agents):
            continue
        for h in range(next(mats.groups[a][metric] for a in agents if metric in mats.groups[a]).shape[2]):
            lines += [f"## Per seed: {label}, h={h + 1}", "",
                      "Mean over the states at each training seed (pooled tables average these; sd over seeds).", "",
                      "| policy | " + " | ".join(map(str, seeds)) + " | mean (sd) |",
                      "|---|" + "---|" * (len(seeds) + 1)]
            if metric in initial and metric != "probe":  # the probe is a change from the initial policy: 0 there
                v = float(initial[metric][0, :, h].mean())
                lines.append("| initial | " + " | ".join(f"{v:.3f}" for _ in seeds) + f" | {v:.3f} |")
            per = {a: dict(zip(mats.seeds[a], mats.groups[a][metric][:, :, h].mean(axis=1), strict=True))
                   for a in agents if metric in mats.groups[a]}
            for a, by_seed in per.items():
                lines.append(f"| {a} | " + " | ".join(f"{by_seed[s]:.3f}" if s in by_seed else "" for s in seeds)
                             + f" | {_mean_sd(list(by_seed.values()))} |")
            for i, a in enumerate(per):
                for b in list(per)[i + 1:]:
                    d = {s: per[a][s] - per[b][s] for s in seeds if s in per[a] and s in per[b]}
                    if d:
                        lines.append(f"| {a} - {b} | " + " | ".join(f"{d[s]:+.3f}" if s in d else "" for s in seeds)
                                     + f" | {_mean_sd(list(d.values()))} |")
            lines.append("")
    return lines


def look_table(paired: list[dict[str, Any]], outcome: str, alpha: float, differences: list[float]) -> list[str]:
    """The Markdown table of every comparison's seed-level test at p < ``alpha`` (a pre-registered look's
    threshold): the sign it passes with, or "no"; whether the crossed interval excludes 0; and the test's power at
    that threshold at the comparison's observed per-seed sd (the smallest difference detected with 80% probability,
    and, for the outcome, the chance of passing at each of ``differences``). Rows: the outcome (success, or the
    score where the task has no verifier) at every turn and the probe, as in the paired tables."""
    paired = [p for p in paired if p["metric"] in (outcome, "probe")]
    power_cols = "".join(f" power at {d:+g} |" for d in differences)
    lines = [f"## Seed-level test at p < {alpha:g}", "",
             f"Passes: the seed-level p is below {alpha:g} (with the sign of the difference). Power of that test "
             "at the observed sd of the per-seed differences (normal per-seed differences; the sd is estimated from "
             f"the same seeds, so the power is an estimate too): mde{POWER * 100:.0f} = the smallest true difference "
             f"it detects with probability {POWER:g}.", "",
             "| a | b | metric | h | seeds | a - b | per-seed sd | seed-level p | passes | crossed interval excludes 0 "
             f"| mde{POWER * 100:.0f} |" + power_cols,
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(differences)]
    for p in paired:
        sd, n = p.get("seed_sd"), p["seeds"]
        if n < 2:
            continue  # no seed-level test with one seed
        passes = "no" if p["seed_p"] >= alpha else ("yes, +" if p["diff"] > 0 else "yes, -")
        if not sd:  # every seed moved by the same amount: a power against an sd of 0 is not defined
            power = "n/a |" + " n/a |" * len(differences)
        else:  # the --power-at differences are in the outcome's units: the probe's nats get its mde only
            power = f"{seed_detectable(sd, n, alpha):.3f} |" + "".join(
                f" {seed_power(d, sd, n, alpha):.2f} |" if p["metric"] == outcome else " |" for d in differences)
        lines.append(f"| {p['a']} | {p['b']} | {p['metric']} | {p['turn']} | {n} | {p['diff']:+.3f} | "
                     f"{(sd or 0.0):.3f} | {p['seed_p']:.4f} | {passes} | {'yes' if p['excludes_0'] else 'no'} | "
                     f"{power}")
    return lines + [""]


def pooled_states(paths: list[Path], seeds: list[int] | None = None) -> tuple[list[Matrices], Matrices]:
    """Each states file in ``paths`` as read, and all of them pooled in order (:func:`merge_states`), restricted to
    ``seeds`` if given (:func:`select_seeds`)."""
    parts = [read_states(path) for path in paths]
    mats = parts[0]
    for part in parts[1:]:
        mats = merge_states(mats, part)
    return parts, (select_seeds(mats, seeds) if seeds is not None else mats)


def pooled_tables(paths: list[Path], n_boot: int, seeds: list[int] | None = None, per_seed: bool = False,
                  alpha: float | None = None, differences: list[float] | None = None) -> str:
    """The Markdown paired tables of the runs in ``paths`` pooled (in order), at ``seeds`` only if given; with
    ``per_seed`` the per-seed tables (:func:`per_seed_tables`), with ``alpha`` the seed-level tests at that threshold
    (:func:`look_table`, power at each of ``differences``)."""
    parts, mats = pooled_states(paths, seeds)
    paired = paired_rows(mats.groups, mats.seeds, n_boot)
    pooled = ", ".join(f"{a}: {mats.seeds[a]}" for a in mats.seeds)
    lines = [f"Pooled from {', '.join(str(p) for p in paths)}; seeds {pooled}; {len(mats.states)} states.", ""]
    if any(any(m.covered) for m in parts):  # a probe: were its replies the same in every file?
        lines += [probe_check(paths, parts), ""]
    outcome = "success" if any(p["metric"] == "success" for p in paired) else "score"  # a verifier's success, or
    # the judge's score where the task has none
    for metric, label in ((outcome, f"{outcome} at turn h"), ("probe", "the turn-1 probe (nats)")):
        for turn in sorted({p["turn"] for p in paired if p["metric"] == metric}):
            lines += paired_table(paired, metric, turn, f"Paired differences in {label}, h={turn}")
    if alpha is not None:
        lines += look_table(paired, outcome, alpha, differences or [])
    if per_seed:
        lines += per_seed_tables(mats, outcome)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard.pool", description=__doc__.splitlines()[0])
    parser.add_argument("states", nargs="+", type=Path, help="<report_name>_states.csv files of one design")
    parser.add_argument("--n-boot", type=int, default=2000, help="crossed bootstrap replicates (default 2000)")
    parser.add_argument("--seeds", help="only these training seeds, e.g. 5-12 or 5,6,9 (default: every seed)")
    parser.add_argument("--per-seed", action="store_true", help="also every policy's mean at each training seed")
    parser.add_argument("--alpha", type=float, help="also the seed-level test at p < ALPHA (a look's threshold), "
                        "with its power there")
    parser.add_argument("--power-at", help="with --alpha: true differences in the outcome to state the power at, "
                        "e.g. 0.19,0.25")
    args = parser.parse_args(argv)
    if args.n_boot < 100:
        parser.error(f"--n-boot must be >= 100, got {args.n_boot}")
    if args.alpha is not None and not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1 (exclusive), got {args.alpha:g}")
    differences = None
    if args.power_at is not None:
        if args.alpha is None:
            parser.error("--power-at needs --alpha (the threshold the power is stated at)")
        try:
            differences = [float(x) for x in args.power_at.split(",")]
        except ValueError:
            parser.error(f"--power-at: {args.power_at!r} is not a comma-separated list of numbers, e.g. 0.19,0.25")
    try:
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
    except ValueError as e:
        parser.error(str(e))
    missing = [str(p) for p in args.states if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        print(pooled_tables(args.states, args.n_boot, seeds, args.per_seed, args.alpha, differences))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
