"""`make demo` over several training seeds and base-weight dtypes: how much of the demo's result is the seed.

One `make demo` run is one training seed judged on 64 test problems, so its "before -> after" moves by a few
problems from seed to seed, and a change to the demo (bfloat16 weights, say) cannot be judged on one run. This runs
the demo's config (``conf/experiment/demo.yaml``) for each ``--seeds`` x ``--dtypes`` (``policy.dtype``), each in
its own run directory (a directory that already holds a finished run is read, not run again), and reports, on the
leaderboard's crossed (seeds x states) statistics (:mod:`benchmarks.leaderboard.stats`):

- each dtype's initial and trained policy, solved by the last turn, with 95% intervals;
- trained - initial per dtype, and dtype A - dtype B between the trained policies (paired on states and seeds),
  each with the seed-level t-test and mde80 (the smallest difference the comparison detects with 80% probability);
- each run's solved count and its wall time (of the process, recorded for the runs this script started).

Run (8-11 minutes per bfloat16 run and 10-12 per float32 run on a quiet 2-core CPU, by host; one after another)::

    python -m benchmarks.demo_seeds                                   # seeds 0 1 2, bfloat16 and float32
    python -m benchmarks.demo_seeds --seeds 0 1 --dtypes bfloat16 --runs-dir /tmp/demo_seeds

Writes ``--out`` (default ``benchmarks/results/demo_seeds.md``) with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
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


def run_dir(runs: Path, dtype: str, seed: int) -> Path:
    return runs / f"{dtype}_seed{seed}"


def finished(directory: Path) -> bool:
    """A run whose eval.json holds the initial and the trained policy's evaluations."""
    path = directory / "eval.json"
    if not path.is_file():
        return False
    return len(json.loads(path.read_text()).get("evaluations", [])) >= 2


def run_demo(directory: Path, dtype: str, seed: int, extra: list[str]) -> None:
    """The demo's command (``make demo``'s) with this seed and dtype, into ``directory``."""
    cmd = [sys.executable, "-m", "agents.refuel", "+experiment=demo", f"seed={seed}", f"policy.dtype={dtype}",
           f"hydra.run.dir={directory}", *extra]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


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
            "minutes": wall_minutes(directory), "trained_name": last["policy"]}


def fmt_interval(values: np.ndarray) -> str:
    i = crossed_interval(values)
    return f"{i.mean:.3f} [{i.lo:.3f}, {i.hi:.3f}]"


def comparison(diff: np.ndarray) -> str:
    """The leaderboard's paired-comparison cells (difference, interval, mde80, seed-level test) of a (seeds x states)
    difference matrix."""
    return difference_cells(comparison_row("a", "b", "success", 1, diff, n_boot=2000, seed=0))


def report(runs: dict[tuple[str, int], dict], seeds: list[int], dtypes: list[str], command: str) -> str:
    n_states = len(next(iter(runs.values()))["initial"])
    lines = ["# `make demo` over training seeds and base-weight dtypes", "",
             f"Command: `{command}`", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in machine_info().items()), "",
             f"The demo's config (`conf/experiment/demo.yaml`) at training seeds {seeds} for each `policy.dtype` in "
             f"{dtypes}; every run judged on the same {n_states} test problems (greedy, fixed user seeds). Outcome: "
             "solved by the last turn (3). Intervals: 95%, crossed (seeds x states) bootstrap with Satterthwaite "
             "degrees of freedom (`benchmarks/leaderboard/stats.py`, coverage checked in "
             "tests/benchmarks/test_leaderboard_stats.py); * = excludes 0.", "",
             "## Runs", "", "| dtype | seed | initial solved | trained solved | wall minutes |",
             "|---|---|---|---|---|"]
    for d in dtypes:
        for s in seeds:
            r = runs[(d, s)]
            minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
            lines.append(f"| {d} | {s} | {int(r['initial'].sum())} / {n_states} | {int(r['trained'].sum())} / "
                         f"{n_states} | {minutes} |")
    lines += ["", "## Solved by the last turn", "", "| dtype | initial | trained (mean over seeds) |", "|---|---|---|"]
    mats = {}
    for d in dtypes:
        init = np.stack([runs[(d, s)]["initial"] for s in seeds])
        trained = np.stack([runs[(d, s)]["trained"] for s in seeds])
        mats[d] = (init, trained)
        lines.append(f"| {d} | {fmt_interval(init[:1])} | {fmt_interval(trained)} |")
    lines += ["", "## Paired differences (same states; between dtypes also the same seeds)", "",
              "| comparison | a - b | 95% interval | mde80 | seed-level 95% t-interval | seed-level p |",
              "|---|---|---|---|---|---|"]
    for d in dtypes:
        init, trained = mats[d]
        lines.append(f"| {d}: trained - initial | {comparison(trained - init)} |")
    for i, a in enumerate(dtypes):
        for b in dtypes[i + 1:]:
            lines.append(f"| trained {a} - trained {b} | {comparison(mats[a][1] - mats[b][1])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=DTYPES,
                    help="policy.dtype values (base weights)")
    ap.add_argument("--runs-dir", default=str(ROOT / "outputs" / "demo_seeds"),
                    help="one run directory per dtype and seed (<dtype>_seed<seed>); finished runs are read")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. iterations=2)")
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds has a repeated seed: {args.seeds}")
    runs_dir = Path(args.runs_dir)
    runs = {}
    for d in args.dtypes:
        for s in args.seeds:
            directory = run_dir(runs_dir, d, s)
            if not finished(directory):
                t0 = time.time()
                run_demo(directory, d, s, args.overrides)
                wall = time.time() - t0
                (directory / WALL_FILE).write_text(json.dumps({"wall_s": wall}))
                print(f"{d} seed {s}: {wall / 60:.1f} min", flush=True)
            runs[(d, s)] = read_run(directory)
    command = "python -m benchmarks.demo_seeds " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(runs, args.seeds, args.dtypes, command.strip())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
