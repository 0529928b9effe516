"""The whole benchmark: stored states, the baseline, calibrations, the learning-rate sweep, the agent runs, the report.

Work already done in ``run_dir`` (stored states, the baseline's dialogues, calibrations, sweep runs, finished agent
runs) is reused, so an interrupted leaderboard continues where it stopped (``hydra.run.dir=<its dir>``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agents.common.config import ConfigError
from agents.common.evaluation import carry_forward
from benchmarks.leaderboard.agents import calibrate, calibration_saved, check_agents
from benchmarks.leaderboard.config import LeaderboardConfig, seeds_of, validate
from benchmarks.leaderboard.jobs import PROBE_FILE, STOP_FILE, Context, Scheduler, job_threads, run_dir_of
from benchmarks.leaderboard.probe import (
    check_states,
    has_probe,
    probe_from_logprobs,
    replies_digest,
    sample_probe_replies,
)
from benchmarks.leaderboard.protocol import AgentRun, played, score_matrix, success_matrix, summarize
from benchmarks.leaderboard.report import write_report
from benchmarks.leaderboard.stats import crossed_interval
from dialogue_gym.progress import Progress
from dialogue_gym.rollout_store import DialogueRecord

log = logging.getLogger("benchmarks.leaderboard")


def check_sweep(cfg: LeaderboardConfig) -> None:
    """A sweep needs validation rows in the task (checked before any model loads)."""
    if not cfg.sweep.lrs:
        return
    from dialogue_gym.tasks import build_task

    task = build_task(cfg.env.task, **dict(cfg.env.task_kwargs))
    if len(task.rows("validation")) < cfg.sweep.states:
        raise ConfigError(f"sweep.lrs chooses learning rates on the validation split, but task {task.name!r} has "
                          f"{len(task.rows('validation'))} validation rows (sweep.states is {cfg.sweep.states}); "
                          "arithmetic and clarify have one (task_kwargs.n_validation), or set sweep.lrs=[]")


def sweep_values(cfg: LeaderboardConfig, records: list[DialogueRecord], ctx: Context, verifier: Any | None
                 ) -> np.ndarray:
    """(states,) the sweep's metric of one run on each validation state: success (with a verifier) or the
    carried-forward score, at the last turn."""
    states = ctx.validation.states
    horizon = max(cfg.env.max_turns - s.state.turn for s in states)
    use_success = cfg.sweep.metric == "success" or (cfg.sweep.metric == "auto" and verifier is not None)
    if use_success:
        return success_matrix(records, states, verifier, horizon)[:, -1]
    return carry_forward(score_matrix(records, horizon))[:, -1]


def choose_rates(lrs: list[float], values: dict[str, dict[float, np.ndarray]], n_boot: int
                 ) -> tuple[dict[str, float], dict[str, bool], float]:
    """Each agent's learning rate from its sweep on the validation states.

    An agent's sweep is *decisive* when its best rate beats every other rate by a paired difference on the same
    validation states whose 95% crossed interval excludes 0 (:mod:`.stats`). When every agent's sweep is decisive,
    each trains at its best rate. Otherwise the sweep cannot tell the rates apart for some agent, and giving agents
    different rates would compare rates, not algorithms: every agent trains at one shared rate, the best pooled
    over the agents (ties: the rate listed first).

    Returns:
        ``(rate per agent, decisive per agent, the shared rate)``.
    """
    def best(means: dict[float, float]) -> float:
        return max(lrs, key=lambda lr: (means[lr], -lrs.index(lr)))

    decisive, own = {}, {}
    for name, by_lr in values.items():
        own[name] = best({lr: float(v.mean()) for lr, v in by_lr.items()})
        decisive[name] = all(crossed_interval((by_lr[own[name]] - by_lr[lr])[None, :], n_boot=n_boot).lo > 0
                             for lr in lrs if lr != own[name])
    shared = best({lr: float(np.mean([by_lr[lr].mean() for by_lr in values.values()])) for lr in lrs})
    chosen = own if all(decisive.values()) else {name: shared for name in values}
    return chosen, decisive, shared


def run_priority(cfg: LeaderboardConfig, k: int, estimate: float) -> float:
    """The scheduler's priority of an agent's run at its ``k``-th seed, expected to take ``estimate`` seconds (the
    highest starts first; ties: the run added first, and the agents are added in their listed order).

    ``schedule: longest`` gives the estimate (the shortest total time); ``schedule: seeds`` gives ``-k``, so every
    agent runs seed k before any agent runs seed k + 1 (calibrations, at infinity, still come first).
    """
    return estimate if cfg.schedule == "longest" else -float(k)


def run(cfg: LeaderboardConfig, command: str = "") -> dict[str, Any]:
    """Train and evaluate every agent and seed (after the sweep, when ``sweep.lrs`` is set), then write the report.

    With ``jobs > 1`` or ``backend: submitit`` the jobs run side by side (each with ``job_threads`` torch threads).
    With the same torch threads per process, results do not depend on ``jobs`` or the backend.

    Returns:
        ``{"rows": summary rows (as in the CSV), "paired": paired differences, "runs": [AgentRun], "meta": {...}}``.
    """
    validate(cfg)
    check_agents(cfg)
    check_sweep(cfg)
    threads = job_threads(cfg)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    stop_file = out / STOP_FILE
    if stop_file.is_file():  # left by the stop that ended the previous start: this start is the resume
        stop_file.unlink()
        log.info("removed %s (left by an earlier stop); resuming", stop_file)
    first = out / "started_at.txt"  # the first start, kept across resumed runs
    resumed = first.is_file()
    if not resumed:
        first.write_text(datetime.now(UTC).isoformat(timespec="seconds"))
    started, load_start = datetime.fromisoformat(first.read_text().strip()), os.getloadavg()
    last = out / "finished_at.txt"  # when the last job of the whole leaderboard finished
    ended: datetime | None = None  # set once every job is done
    ctx = Context.build(cfg)
    states, store = ctx.eval.states, ctx.eval.store
    verifier = ctx.eval.venv.task.make_reward("verifier")
    asks = getattr(ctx.eval.venv.task, "asks", None)  # the task's behaviour of interest (clarify), if any
    if cfg.sweep.metric == "success" and verifier is None:
        raise ConfigError(f"sweep.metric is success, but task {cfg.env.task!r} has no verifier; use score or auto")
    probe_file = out / PROBE_FILE
    if has_probe(ctx.eval.venv.task) and not probe_file.is_file():  # before any job: every run's probe reads it
        probe_file.write_text(json.dumps(sample_probe_replies(
            cfg.policy, states, ctx.eval.venv.task.asks, cfg.temperature or 1.0, cfg.max_new_tokens, cfg.eval.seed,
            cfg.eval.probe_samples, cfg.eval.probe_keep)))
    if probe_file.is_file():
        check_states(json.loads(probe_file.read_text()), states)  # a reused run directory: the same states
    done = played(store, states)
    baseline: list[DialogueRecord] | None = done.get("initial")
    baseline_s = 0.0
    runs: list[AgentRun] = []
    calibration: dict[str, dict[str, int]] = {}
    plan: dict[str, tuple[int | None, float]] = {}  # agent -> (iterations, expected seconds per run)
    sweep: dict[str, dict[str, Any]] = {}  # agent -> {"values": {lr: (states,)}, "results": {lr: mean}, "chosen": lr}
    sweep_rule: dict[str, Any] = {}  # the shared rate and whether every agent's sweep was decisive
    sweep_metric = "success" if cfg.sweep.metric == "success" or (cfg.sweep.metric == "auto" and verifier) \
        else "score"
    order = {(a, s): k for k, (a, s) in enumerate((a, s) for a in cfg.agents for s in seeds_of(cfg, a))}

    def report() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Write the report for the runs finished so far (a partial report names the runs still to come)."""
        runs.sort(key=lambda r: order[(r.agent, r.seed)])
        finished = {(r.agent, r.seed) for r in runs}
        probe = json.loads(probe_file.read_text()) if probe_file.is_file() else None
        base_probe = None if probe is None else probe_from_logprobs(  # pi_0 itself: 0 where covered, else None
            probe, [[y["logp0"] for y in st["ask"] + st["guess"]] for st in probe["states"]])
        rows, paired, mats = summarize(cfg, runs, baseline, states, verifier, asks, base_probe,
                                       None if probe is None else replies_digest(probe))
        meta = {"started": started.isoformat(timespec="seconds"), "resumed": resumed,
                "wall_s": ((ended or datetime.now(UTC)) - started).total_seconds(), "load_start": load_start,
                "load_end": os.getloadavg(), "baseline_eval_s": baseline_s, "command": command,
                "calibration": {a: calibration[a] for a in cfg.agents if a in calibration},
                "sweep": {a: {k: v for k, v in sweep[a].items() if k != "values"} for a in cfg.agents if a in sweep},
                "sweep_rule": dict(sweep_rule), "sweep_metric": sweep_metric,
                "sweep_lrs": list(cfg.sweep.lrs),
                "states": len(states), "jobs": cfg.jobs, "threads": threads,
                "probe": None if probe is None else {
                    "states": sum(v is not None for v in base_probe or []), "samples": probe["samples"],
                    "keep": probe["keep"], "temperature": probe["temperature"],
                    "asked": float(np.mean([st["asked"] / st["sampled"] for st in probe["states"]]))},
                "pending": [f"{a}/seed-{s}" for a in cfg.agents for s in seeds_of(cfg, a) if (a, s) not in finished]}
        write_report(cfg, rows, paired, runs, meta, mats)
        return rows, paired, meta

    def add_runs(sched: Scheduler, name: str, lr: float | None) -> None:
        iterations, estimate = plan[name]
        for k, seed in enumerate(seeds_of(cfg, name)):
            result = run_dir_of(cfg, name, seed, lr, False) / "leaderboard_result.json"
            if result.is_file() and f"{name}/seed-{seed}" in done:
                runs.append(AgentRun.from_json(json.loads(result.read_text()), done[f"{name}/seed-{seed}"]))
            else:
                sched.add("train", (name, seed, iterations, lr), run_priority(cfg, k, estimate))

    def sweep_finished(sched: Scheduler, name: str) -> None:
        """Once every agent has a validation result at every learning rate, choose the rates (:func:`choose_rates`)
        and start the agents' runs."""
        if sweep_rule or any(len(sweep.get(a, {}).get("values", {})) < len(cfg.sweep.lrs) for a in cfg.agents):
            return  # chosen already, or results still to come
        values = {a: sweep[a]["values"] for a in cfg.agents}
        chosen, decisive, shared = choose_rates(list(cfg.sweep.lrs), values, cfg.eval.n_boot)
        sweep_rule.update(shared=shared, all_decisive=all(decisive.values()))
        for a in cfg.agents:
            sweep[a].update(chosen=chosen[a], decisive=decisive[a],
                            results={lr: float(v.mean()) for lr, v in values[a].items()})
            log.info("sweep: %s -> lr %g (%s at the last turn: %s; decisive: %s)", a, chosen[a], sweep_metric,
                     sweep[a]["results"], decisive[a])
            add_runs(sched, a, chosen[a])

    def start(sched: Scheduler, name: str, iterations: int | None, estimate: float) -> None:
        plan[name] = (iterations, estimate)
        if not cfg.sweep.lrs:
            add_runs(sched, name, None)
            return
        sweep[name] = {"results": {}, "values": {}, "chosen": None}
        val = played(ctx.validation.store, ctx.validation.states)
        for lr in cfg.sweep.lrs:
            if (run_dir_of(cfg, name, 0, lr, True) / "leaderboard_result.json").is_file() and \
                    f"{name}/lr-{lr:g}" in val:
                sweep[name]["values"][lr] = sweep_values(cfg, val[f"{name}/lr-{lr:g}"], ctx, verifier)
            else:
                sched.add("sweep", (name, lr, iterations), estimate)
        sweep_finished(sched, name)

    sched = Scheduler(cfg, ctx)
    bar = Progress(desc="leaderboard jobs", unit="job")
    failed = True
    try:
        if baseline is None:
            sched.add("baseline", (), math.inf)  # first: partial reports need it
        for name in cfg.agents:
            if not cfg.budget.calibrate:
                start(sched, name, None, 0.0)
            elif calibration_saved(out, name):  # measured before this (resumed) run: only read
                iterations, calibration[name], wall = calibrate(cfg, name, out, ctx.count_tokens)
                start(sched, name, iterations, wall * iterations)
            else:
                sched.add("calibrate", (name,), math.inf)  # first: each unblocks an agent's runs
        while (finished := sched.next_done()) is not None:
            kind, args, result = finished
            bar.update(1)
            bar.set_postfix(done=f"{kind} {'/'.join(map(str, args))}", pending=len(sched.pending))
            if kind == "baseline":
                baseline_s = result
                baseline = played(store, states)["initial"]
            elif kind == "calibrate":
                iterations, calibration[args[0]], wall = result
                start(sched, args[0], iterations, wall * iterations)
            elif kind == "sweep":
                name, lr = args[0], args[1]
                records = played(ctx.validation.store, ctx.validation.states)[f"{name}/lr-{lr:g}"]
                sweep[name]["values"][lr] = sweep_values(cfg, records, ctx, verifier)
                sweep_finished(sched, name)
            else:
                name, seed = args[0], args[1]
                runs.append(AgentRun.from_json(result, played(store, states)[f"{name}/seed-{seed}"]))
            if baseline is not None and kind in ("baseline", "train"):
                report()  # so an interrupted leaderboard still leaves the results it has
        failed = False
    finally:
        bar.close()
        sched.close(failed)
    if sched.pending:
        log.info("stopped by %s with %d job(s) still to come; resume with the same command and hydra.run.dir",
                 stop_file, len(sched.pending))
    if sched.started == 0 and last.is_file():  # nothing left to do: only the report is rewritten, its time kept
        ended = datetime.fromisoformat(last.read_text().strip())
    else:
        ended = datetime.now(UTC)
        if not sched.pending:  # stopped with jobs to come: not finished
            last.write_text(ended.isoformat(timespec="seconds"))
    rows, paired, meta = report()
    return {"rows": rows, "paired": paired, "runs": runs, "meta": meta}

