"""`make demo` over several training seeds and variants of its config: how much of the demo's result is the seed.

One `make demo` run is one training seed judged on 64 test problems, so its "before -> after" moves by a few
problems from seed to seed, and a change to the demo (bfloat16 weights, a learning rate) cannot be judged on one
run. This runs the demo's config (``conf/experiment/demo.yaml``) for each ``--seeds`` x arm, each in its own run
directory ``<arm>_seed<seed>`` (a directory that already holds a finished run is read, not run again). An arm is a
named set of Hydra overrides: ``--arm lr6e-4 optim.lr=6e-4``; ``--dtypes`` is shorthand for one arm per
``policy.dtype``, named after it. It reports, on the leaderboard's crossed (seeds x states) statistics
(:mod:`benchmarks.leaderboard.stats`):

- each arm's initial and trained policy, solved by the last turn, with 95% intervals;
- trained - initial per arm, and arm A - arm B between the trained policies (paired on states and seeds),
  each with the seed-level t-test and mde80 (the smallest difference the comparison detects with 80% probability);
- each run's solved count and its wall time (of the process, recorded for the runs this script started).

Run (8-11 minutes per bfloat16 run and 10-12 per float32 run on a quiet 2-core CPU, by host, one after another;
``--jobs 2`` runs two at a time with one thread each, more runs per hour but minutes that say nothing about the
demo's time)::

    python -m benchmarks.demo_seeds                                   # seeds 0 1 2, bfloat16 and float32
    python -m benchmarks.demo_seeds --seeds 0 1 --dtypes bfloat16 --runs-dir /tmp/demo_seeds
    python -m benchmarks.demo_seeds --seeds 0 1 --arm lr2e-4 optim.lr=2e-4 --arm lr6e-4 optim.lr=6e-4 \
        --jobs 2 --runs-dir /tmp/lr --out /tmp/lr.md eval.split=validation eval.dialogues=64

Writes ``--out`` (default ``benchmarks/results/demo_seeds.md``) with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from agents.common.evaluation import carry_forward
from benchmarks.leaderboard.report import difference_cells
from benchmarks.leaderboard.stats import comparison_row, crossed_interval
from benchmarks.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo_seeds.md"
DTYPES = ("bfloat16", "float32", "float16")
WALL_FILE = "demo_seeds_wall.json"  # the process wall time of a run this script started


ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"{arm}_seed{seed}"


def finished(directory: Path) -> bool:
    """A run whose eval.json holds the initial and the trained policy's evaluations."""
    path = directory / "eval.json"
    if not path.is_file():
        return False
    return len(json.loads(path.read_text()).get("evaluations", [])) >= 2


def run_demo(directory: Path, seed: int, overrides: list[str], threads: int = 0) -> float:
    """The demo's command (``make demo``'s) with this seed and these overrides, into ``directory``; records and
    returns the process's wall seconds. ``threads`` > 0 sets ``OMP_NUM_THREADS`` (torch's intra-op threads)."""
    cmd = [sys.executable, "-m", "agents.refuel", "+experiment=demo", f"seed={seed}", *overrides,
           f"hydra.run.dir={directory}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None
    sys.stdout.write(f"running: {' '.join(cmd)}\n")  # one write: parallel runs' lines do not interleave
    sys.stdout.flush()
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(directory / "demo_seeds.log", "w") as log:  # a run's own log: parallel runs would interleave
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}; its log: {directory / 'demo_seeds.log'}")
    wall = time.time() - t0
    (directory / WALL_FILE).write_text(json.dumps({"wall_s": wall}))
    sys.stdout.write(f"{directory.name}: {wall / 60:.1f} min\n")
    sys.stdout.flush()
    return wall


def wall_minutes(directory: Path) -> float | None:
    """The run's process wall time in minutes, as :func:`main` recorded it (None for a run it did not start)."""
    path = directory / WALL_FILE
    return json.loads(path.read_text())["wall_s"] / 60 if path.is_file() else None


def solved_by_last_turn(scores: list[list[float | None]]) -> np.ndarray:
    """(states,) 0/1: solved by the last turn, a dialogue's score carried forward after it ended."""
    m = np.array([[np.nan if x is None else x for x in row] for row in scores], dtype=float)
    return carry_forward(m)[:, -1]


def read_run(directory: Path) -> dict:
    data = json.loads((directory / "eval.json").read_text())
    first, last = data["evaluations"][0], data["evaluations"][-1]
    return {"initial": solved_by_last_turn(first["scores"]), "trained": solved_by_last_turn(last["scores"]),
            "minutes": wall_minutes(directory), "trained_name": last["policy"],
            "split": data.get("settings", {}).get("split", "test")}


def fmt_interval(values: np.ndarray) -> str:
    i = crossed_interval(values)
    return f"{i.mean:.3f} [{i.lo:.3f}, {i.hi:.3f}]"


def comparison(diff: np.ndarray) -> str:
    """The leaderboard's paired-comparison cells (difference, interval, mde80, seed-level test) of a (seeds x states)
    difference matrix."""
    return difference_cells(comparison_row("a", "b", "success", 1, diff, n_boot=2000, seed=0))


def report(runs: dict[tuple[str, int], dict], seeds: list[int], arms: dict[str, list[str]], command: str,
           jobs: int = 1) -> str:
    """The markdown report of finished runs, keyed by (arm, seed); ``arms``: each arm's overrides; ``jobs``: runs
    that were run at a time."""
    n_states = len(next(iter(runs.values()))["initial"])
    splits = sorted({r["split"] for r in runs.values()})
    lines = ["# `make demo` over training seeds and arms", "",
             f"Command: `{command}`", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in machine_info().items()), "",
             f"The demo's config (`conf/experiment/demo.yaml`) at training seeds {seeds} for each arm below; every run "
             f"judged on the same {n_states} problems of the {' and '.join(splits)} split (greedy, fixed user seeds). "
             "Outcome: solved by the last turn (3). Intervals: 95%, crossed (seeds x states) bootstrap with "
             "Satterthwaite degrees of freedom (`benchmarks/leaderboard/stats.py`, coverage checked in "
             "tests/benchmarks/test_leaderboard_stats.py); * = excludes 0.", "",
             "| arm | overrides |", "|---|---|"]
    lines += [f"| {a} | {' '.join(f'`{o}`' for o in o_) or '(the demo as it is)'} |" for a, o_ in arms.items()]
    lines += ["", "## Runs", ""]
    if jobs > 1:
        lines += [f"Run {jobs} at a time with a share of the threads each: their wall minutes are not the demo's.", ""]
    lines += ["| arm | seed | initial solved | trained solved | wall minutes |", "|---|---|---|---|---|"]
    for a in arms:
        for s in seeds:
            r = runs[(a, s)]
            minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
            lines.append(f"| {a} | {s} | {int(r['initial'].sum())} / {n_states} | {int(r['trained'].sum())} / "
                         f"{n_states} | {minutes} |")
    lines += ["", "## Solved by the last turn", "", "| arm | initial | trained (mean over seeds) |", "|---|---|---|"]
    mats = {}
    for a in arms:
        init = np.stack([runs[(a, s)]["initial"] for s in seeds])
        trained = np.stack([runs[(a, s)]["trained"] for s in seeds])
        mats[a] = (init, trained)
        lines.append(f"| {a} | {fmt_interval(init[:1])} | {fmt_interval(trained)} |")
    lines += ["", "## Paired differences (same states; between arms also the same seeds)", "",
              "| comparison | a - b | 95% interval | mde80 | seed-level 95% t-interval | seed-level p |",
              "|---|---|---|---|---|---|"]
    for a in arms:
        init, trained = mats[a]
        lines.append(f"| {a}: trained - initial | {comparison(trained - init)} |")
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lines.append(f"| trained {a} - trained {b} | {comparison(mats[a][1] - mats[b][1])} |")
    return "\n".join(lines) + "\n"


def parse_arms(ap: argparse.ArgumentParser, dtypes: list[str] | None, arm_args: list[list[str]] | None
               ) -> dict[str, list[str]]:
    """``--dtypes`` and ``--arm NAME OVERRIDE...`` as {arm name: overrides}; errors name the bad argument."""
    if dtypes and arm_args:
        ap.error("give --dtypes or --arm, not both (a dtype arm is --arm bfloat16 policy.dtype=bfloat16)")
    if not arm_args:
        names = dtypes or ["bfloat16", "float32"]
        if len(set(names)) != len(names):
            ap.error(f"--dtypes has a repeated dtype: {names}")
        return {d: [f"policy.dtype={d}"] for d in names}
    arms: dict[str, list[str]] = {}
    for name, *overrides in arm_args:
        if not ARM_NAME.fullmatch(name):
            ap.error(f"--arm name {name!r} must be letters, digits, '.', '_', '+' or '-' (it names run directories)")
        if name in arms:
            ap.error(f"--arm {name} is given twice")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            ap.error(f"--arm {name}: {bad[0]!r} is not a Hydra override (key=value)")
        arms[name] = overrides
    return arms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES,
                    help="one arm per policy.dtype value (base weights); default bfloat16 float32 when no --arm")
    ap.add_argument("--arm", nargs="+", action="append", metavar=("NAME", "OVERRIDE"),
                    help="an arm: its name, then its Hydra overrides (repeat --arm for each arm)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time; with more than 1, each run gets cpu_count // jobs threads")
    ap.add_argument("--runs-dir", default=str(ROOT / "outputs" / "demo_seeds"),
                    help="one run directory per arm and seed (<arm>_seed<seed>); finished runs are read")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. eval.split=validation)")
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds has a repeated seed: {args.seeds}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    arms = parse_arms(ap, args.dtypes, args.arm)
    runs_dir = Path(args.runs_dir)
    todo = [(a, s) for a in arms for s in args.seeds if not finished(run_dir(runs_dir, a, s))]
    threads = max(1, (os.cpu_count() or 2) // args.jobs) if args.jobs > 1 else 0
    failed = threading.Event()  # a failed run stops the queue: runs not started are skipped, running ones end

    def job(arm: str, seed: int) -> None:
        if failed.is_set():
            return
        try:
            run_demo(run_dir(runs_dir, arm, seed), seed, arms[arm] + args.overrides, threads)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the runs' processes
        for f in [pool.submit(job, a, s) for a, s in todo]:
            f.result()
    runs = {(a, s): read_run(run_dir(runs_dir, a, s)) for a in arms for s in args.seeds}
    command = "python -m benchmarks.demo_seeds " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(runs, args.seeds, arms, command.strip(), args.jobs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
