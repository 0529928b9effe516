"""Paired differences of leaderboard runs pooled from their ``<report_name>_states.csv`` files.

    python -m benchmarks.leaderboard.pool A_states.csv B_states.csv [--n-boot 2000] [--seeds 5-12]

For one design run in parts: new seeds in another run directory, on another session's machine. The files must share
their stored states and the initial policy's results (:func:`~benchmarks.leaderboard.report.merge_states` refuses
otherwise) and, where both files carry one, the digest of the turn-1 probe's replies. Prints the paired tables of
the pooled seeds (success, or the score where the task has no verifier, at every turn; and the turn-1 probe) as the
report writes them. ``--seeds`` restricts every agent to the training seeds named (a pre-registered look at the
seeds it was read at, after later seeds were added to the same files); an agent that lacks one of them is an
error, so a look never silently compares fewer seeds than it names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.leaderboard.protocol import Matrices
from benchmarks.leaderboard.report import merge_states, paired_table, read_states
from benchmarks.leaderboard.stats import paired_rows


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


def pooled_tables(paths: list[Path], n_boot: int, seeds: list[int] | None = None) -> str:
    """The Markdown paired tables of the runs in ``paths`` pooled (in order), at ``seeds`` only if given."""
    parts = [read_states(path) for path in paths]
    mats = parts[0]
    for part in parts[1:]:
        mats = merge_states(mats, part)
    if seeds is not None:
        mats = select_seeds(mats, seeds)
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard.pool", description=__doc__.splitlines()[0])
    parser.add_argument("states", nargs="+", type=Path, help="<report_name>_states.csv files of one design")
    parser.add_argument("--n-boot", type=int, default=2000, help="crossed bootstrap replicates (default 2000)")
    parser.add_argument("--seeds", help="only these training seeds, e.g. 5-12 or 5,6,9 (default: every seed)")
    args = parser.parse_args(argv)
    if args.n_boot < 100:
        parser.error(f"--n-boot must be >= 100, got {args.n_boot}")
    try:
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
    except ValueError as e:
        parser.error(str(e))
    missing = [str(p) for p in args.states if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        print(pooled_tables(args.states, args.n_boot, seeds))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
