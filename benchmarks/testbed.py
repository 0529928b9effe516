"""The exact algorithm testbed as a table: each agent's trained table against the closed form of its update.

Runs every arm of :func:`agents.testbed.default_arms` (each agent's own ``run(cfg)`` on the table policy over
canned replies, once per seed) and prints, per arm, the closed form and the measured mean change of the centred
``log pi(reply | state)`` with its standard error over seeds, whether the arm passes its check (a mutant must
fail), and each arm's share of the wall time. ``tests/agents/test_testbed.py`` asserts the same checks.

Run:
    python -m benchmarks.testbed                  # every arm
    python -m benchmarks.testbed --arms refuel rebel

Writes ``benchmarks/results/testbed.md`` (the command, the machine, the tables).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agents import testbed as tb
from benchmarks.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "testbed.md"


def arm_table(name: str, check: tb.Check, deltas: np.ndarray) -> list[str]:
    """Markdown rows: one per (state, reply), closed form vs measured mean +- SE of the centred change."""
    d = tb.centred(deltas)
    mean, se = d.mean(0), d.std(0, ddof=1) / np.sqrt(d.shape[0])
    rows = [f"| {name} | {tb.STATES[i]} | {tb.REPLIES[j]} | {check.expected[i, j]:+.3f} | {mean[i, j]:+.3f} | "
            f"{se[i, j]:.3f} |" for i in range(len(tb.STATES)) for j in range(len(tb.REPLIES))]
    return rows


def main(argv: list[str] | None = None) -> None:
    arms = tb.default_arms()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(arms), choices=list(arms), help="which arms to run")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.disable(logging.INFO)
    bed = tb.Testbed(tb.PI0)
    rows, verdicts, seconds = [], {}, {}
    with tempfile.TemporaryDirectory() as root:
        for name in args.arms:
            arm, seeds = arms[name]
            t0 = time.time()
            deltas = tb.train(arm, seeds, Path(root) / name)
            seconds[name] = time.time() - t0
            check = arm.check(bed)
            failures = check.failures(deltas)
            verdicts[name] = (("fails, as a mutant must" if failures else "PASSES: the check missed the bug")
                              if arm.mutant else ("passes" if not failures else "FAILS: " + "; ".join(failures)))
            rows += arm_table(arm.name, check, deltas)
            print(f"{arm.name}: {len(seeds)} seeds, {seconds[name]:.1f} s, {verdicts[name]}", flush=True)
    total = sum(seconds.values())
    info = machine_info()
    lines = ["# The exact algorithm testbed: trained tables against closed forms", "",
             "Command: `" + " ".join(["python -m benchmarks.testbed",
                                      *(argv if argv is not None else sys.argv[1:])]) + "`",
             "", "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             f"Initial policy pi0 (ask, guess, answer) per state {list(tb.STATES)}: "
             + "; ".join(str([round(float(p), 3) for p in row]) for row in tb.PI0) + f". eta = {tb.ETA}, "
             f"cDPO beta = {tb.DPO_BETA}, eps = {tb.DPO_EPS}, n = {tb.DPO_N}; PPO lr = {tb.PPO_LR} (one step). "
             "The closed forms are in agents/testbed/ and docs/testbed.md (PPO's: lr * sign(Q(s, a) - V(s)), "
             "one AdamW step). A check passes when |mean - closed form| <= 5 SE + atol for every entry.", "",
             "| arm | seeds | verdict | share of the wall time |", "|---|---|---|---|"]
    lines += [f"| {arms[n][0].name} | {len(arms[n][1])} | {verdicts[n]} | {seconds[n] / total:.0%} |"
              for n in args.arms]
    lines += ["", f"Wall time {total:.0f} s in all (the machine may be shared: compare the shares, not seconds).", "",
              "Centred change of log pi(reply | state) after one iteration, mean and standard error over seeds:", "",
              "| arm | state (turn, number known) | reply | closed form | measured mean | SE |",
              "|---|---|---|---|---|---|"]
    lines += rows
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
