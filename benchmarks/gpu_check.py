"""The GPU check in one command: the test suite on CUDA, a short REFUEL run, env throughput, a toy leaderboard.

    make gpu-check                      # = python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --skip leaderboard --out /tmp/gpu.md

For anyone with a CUDA machine and pip (``pip install -e '.[dev]'`` next to your CUDA torch). Each step runs in
its own subprocess, with its log under ``outputs/gpu_check/``; a failing step is reported and the next one
still runs. Steps:

1. ``tests``: ``pytest -m "not vllm and not embedded" --device cuda`` (the suite on the GPU; vLLM and the
   embedded model's real weights are left to the CPU CI).
2. ``refuel``: ``python -m agents.refuel`` on arithmetic for 2 iterations of 16 dialogues, policy and user on
   CUDA in bf16 (the embedded model when its weights are installed, else its architecture with random weights).
3. ``throughput``: ``python -m benchmarks.env_throughput`` with the HF engine at N = 16 and 256, dynamic and
   static KV cache, raw ``generate`` beside it, the bf16 matmul rate as the ceiling ->
   ``benchmarks/results/env_throughput_gpu.md``.
4. ``leaderboard``: the ``paper`` preset at a toy budget (one agent, one seed, the embedded architecture as
   policy, user and judge, the UltraInteract test fixture as data, HF engine): checks the GPU leaderboard path.

Writes ``benchmarks/results/gpu.md`` (the machine, each step's command, status, wall time and result line).
``--parallel`` runs the throughput step first, alone (it is timed), then the other steps at the same time on
the same GPU, the suite spread over worker processes when pytest-xdist is installed (``-n 8 --dist loadfile``):
the whole check in about half the wall time. ``--timeout S`` caps each step.
``--device cpu --quick`` runs the same steps, smaller, on a CPU: a dry run of this script, not a GPU check.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ("tests", "refuel", "throughput", "leaderboard")


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    status: str = "not run"
    wall_s: float = 0.0
    summary: str = ""


def policy_model(quick: bool) -> str:
    """The embedded model when its real weights are installed, else its architecture with random weights."""
    if quick:
        return "tiny"
    from dialogue_gym.models import ModelNotFoundError, embedded_model_dir, random_weights_dir

    try:
        weights = embedded_model_dir() / "model.safetensors"
        if weights.stat().st_size > 1_000_000:
            return "embedded"
    except (ModelNotFoundError, OSError):
        pass
    return str(random_weights_dir())


def have_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def build_steps(device: str, quick: bool, out_dir: Path, workers: int = 0) -> list[Step]:
    py = sys.executable
    model = policy_model(quick)
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-m", "not vllm and not embedded",
             "--device", device]
    if workers > 1:
        tests += ["-n", str(workers), "--dist", "loadfile"]
    if quick:
        tests += ["tests/dialogue_gym/generation/test_hf.py", "tests/agents/test_checkpoint.py"]
    refuel = [py, "-m", "agents.refuel", "+env=arithmetic", f"policy.model={model}", f"env.model={model}",
              f"policy.device={device}", f"env.device={device}", "iterations=2",
              f"dialogues={4 if quick else 16}", f"eval.dialogues={2 if quick else 16}",
              f"sampling.max_new_tokens={8 if quick else 48}", "env.max_turns=2",
              f"hydra.run.dir={out_dir / 'refuel'}"]
    throughput = [py, "-m", "benchmarks.env_throughput", "--engines", "hf", "--device", device,
                  "--model", "tiny" if quick else "random", "--sizes", "2,4" if quick else "256,16",
                  "--sync-sizes", "2" if quick else "", "--tokens", "8" if quick else "48", "--steps", "1" if quick
                  else "2", "--cache", "dynamic,static" if device.startswith("cuda") else "dynamic", "--raw",
                  "--skip-turns-forks", "--out", str(out_dir / "env_throughput.md" if quick
                                                         else RESULTS / "env_throughput_gpu.md")]
    fixture = ROOT / "tests" / "fixtures" / "ultrainteract_pair.jsonl"
    leaderboard = [py, "-m", "benchmarks.leaderboard", "+leaderboard=paper", "agents=[refuel]", "seeds=[0]",
                   f"policy={model}", f"env.model={model}", "env.engine=hf", "env.reward=judge",
                   f"env.task_kwargs.path={fixture}", "env.max_turns=2", "env.user_max_new_tokens=16",
                   "max_new_tokens=16", "budget.policy_samples=16", "budget.calibrate=false", "eval.states=1",
                   "eval.reward=judge", "eval.n_boot=200",
                   "overrides.refuel=[" + ",".join(f"'{o}'" for o in (
                       "+experiment=refuel_paper", "policy.lora_r=8", "dialogues=4", "rollout_batch=4",
                       "iterations=1", "eval.dialogues=1", "optim.batch_size=4", "optim.max_length=512",
                       "eta=1.0")) + "]",
                   f"hydra.run.dir={out_dir / 'leaderboard'}", f"results_dir={out_dir / 'leaderboard' / 'results'}"]
    return [Step("tests", tests, 1500), Step("refuel", refuel, 900), Step("throughput", throughput, 1500),
            Step("leaderboard", leaderboard, 1200)]


def summarize(name: str, log: str) -> str:
    """One result line from a step's output."""
    lines = [x for x in log.splitlines() if x.strip()]
    if name == "tests":
        found = [x for x in lines if re.search(r"\d+ (passed|failed|error)", x)]
        return found[-1].strip("= ") if found else (lines[-1] if lines else "")
    if name == "throughput":
        verdict = [x for x in lines if x.startswith("- env") and "target" in x]
        keep = verdict or [x for x in lines if x.startswith(("native", "raw generate", "sync", "- "))]
        return "; ".join(keep[-8:])
    keep = [x for x in lines if "win" in x.lower() or "solved" in x.lower() or "written" in x.lower()]
    return (keep[-1] if keep else (lines[-1] if lines else ""))[:300]


def run_step(step: Step, device: str, log_dir: Path) -> None:
    env = {**os.environ, "DIALOGUE_GYM_DEVICE": device, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    log_path = log_dir / f"{step.name}.log"
    print(f"[gpu_check] {step.name}: {' '.join(step.command)}", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=step.timeout_s)
        out, rc = proc.stdout + proc.stderr, proc.returncode
        step.status = "passed" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        step.status = f"timed out after {step.timeout_s} s"
    step.wall_s = time.perf_counter() - t
    log_path.write_text(out)
    step.summary = summarize(step.name, out)
    print(f"[gpu_check] {step.name}: {step.status} in {step.wall_s:.0f} s -- {step.summary}", flush=True)


def write_report(path: Path, steps: list[Step], device: str, log_dir: Path, total_s: float) -> None:
    from benchmarks.machine import machine_info

    info = machine_info()
    lines = ["# GPU check", "", f"Command: `python -m benchmarks.gpu_check {' '.join(sys.argv[1:])}` "
             f"(total {total_s / 60:.1f} min, device {device})", "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             "| step | status | wall | result |", "|---|---|---|---|"]
    for s in steps:
        summary = s.summary.replace("|", "/")
        lines.append(f"| {s.name} | {s.status} | {s.wall_s:.0f} s | {summary} |")
    lines += ["", "Commands:", ""] + [f"- {s.name}: `{' '.join(s.command)}`" for s in steps]
    lines += ["", f"Logs: `{log_dir}` (not committed).",
              "The throughput table is `benchmarks/results/env_throughput_gpu.md`." if device.startswith("cuda")
              else "A CPU dry run: these numbers say nothing about a GPU."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only for a dry run")
    parser.add_argument("--quick", action="store_true", help="small sizes and a test subset (a dry run)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to skip: {', '.join(STEPS)}")
    parser.add_argument("--parallel", action="store_true", help="throughput first, alone; then the other steps "
                        "at the same time (the suite over pytest-xdist workers when installed)")
    parser.add_argument("--timeout", type=int, default=0, help="cap each step at this many seconds (default: "
                                                               "each step's own, 15-25 min)")
    parser.add_argument("--out", default=None, help="report path (default benchmarks/results/gpu.md; with "
                                                    "--quick: outputs/gpu_check/gpu.md)")
    args = parser.parse_args(argv)
    from dialogue_gym.models import DeviceError, resolve_device

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.quick:
        print(f"gpu_check: device is {device}; this check is for CUDA machines (use --device cpu --quick for a dry "
              "run of the script)", file=sys.stderr)
        return 2
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        print(f"gpu_check: --skip has unknown steps {sorted(unknown)}; allowed: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    out_dir = ROOT / "outputs" / "gpu_check"
    for scratch in ("refuel", "leaderboard"):  # this check's own run folders: a rerun starts from nothing
        shutil.rmtree(out_dir / scratch, ignore_errors=True)  # (stored states of another env config are refused)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workers = 8 if args.parallel and have_xdist() else 0
    steps = [s for s in build_steps(str(device), args.quick, out_dir, workers) if s.name not in skip]
    if args.timeout > 0:
        for s in steps:
            s.timeout_s = args.timeout
    if args.parallel:
        from concurrent.futures import ThreadPoolExecutor

        timed = [s for s in steps if s.name == "throughput"]
        for step in timed:
            run_step(step, str(device), out_dir)
        rest = [s for s in steps if s.name != "throughput"]
        with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
            list(pool.map(lambda st: run_step(st, str(device), out_dir), rest))
    else:
        for step in steps:
            run_step(step, str(device), out_dir)
    report = Path(args.out) if args.out else (out_dir / "gpu.md" if args.quick else RESULTS / "gpu.md")
    write_report(report, steps, str(device), out_dir, time.perf_counter() - t0)
    return 0 if all(s.status == "passed" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
