"""The leaderboard's jobs and where they run.

A job is one of ``("baseline", ())`` (the initial policy plays the stored states), ``("calibrate", (agent,))``,
``("sweep", (agent, lr, iterations))`` (a run at the full budget with one learning rate, evaluated on the validation
states) or ``("train", (agent, seed, iterations, lr))`` (a reported run, evaluated on the test states). Every job
seeds itself and writes its result into the run directory, so the results do not depend on where it ran:

- ``backend: local`` (default): inline with ``jobs: 1``, else a pool of ``jobs`` spawned processes on this machine;
- ``backend: submitit``: submitit's executor - SLURM on a cluster, or its local executor (``submitit.cluster:
  local``: one subprocess per job), with at most ``jobs`` jobs in flight.
The :class:`Scheduler` hands out the longest expected job first, as workers free up.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import multiprocessing
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.common.checkpoint import completed_iterations, export_checkpoint_policy
from agents.common.run import setup_logging
from benchmarks.leaderboard.agents import calibrate, train
from benchmarks.leaderboard.config import LeaderboardConfig
from benchmarks.leaderboard.probe import probe_values
from benchmarks.leaderboard.protocol import AgentRun, eval_env, evaluate
from dialogue_gym.budget import Budget
from dialogue_gym.rollout_store import RolloutStore, StateRecord, stored_states

log = logging.getLogger("benchmarks.leaderboard")
PROBE_FILE = "probe_replies.json"  # the turn-1 probe's replies sampled by the initial policy (.probe), one per run
STOP_FILE = "STOP"  # in the run directory: finish the jobs running, start none, write the report, exit (resumable)


def token_counter(model_name: str) -> Any:
    """Counts the tokens of an assistant message with the initial policy's tokenizer (for the cost columns)."""
    from dialogue_gym.models import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def job_threads(cfg: LeaderboardConfig) -> int | None:
    """torch CPU threads per process: ``threads``, else the cores this process may use shared out among ``jobs``
    (null with one job: torch's own default)."""
    if cfg.threads is not None:
        return cfg.threads
    return max(1, len(os.sched_getaffinity(0)) // cfg.jobs) if cfg.jobs > 1 else None


@dataclass
class Split:
    """The stored states of one split with their eval env and the store of the dialogues played from them."""

    venv: Any
    states: list[StateRecord]
    store: RolloutStore

    @classmethod
    def build(cls, cfg: LeaderboardConfig, split: str, n: int, prefix: str) -> Split:
        out = Path(cfg.run_dir)
        venv = eval_env(cfg, n, split)
        states = stored_states(RolloutStore(out / f"{prefix}_states.jsonl"), venv, n, cfg.eval.seed, prefix)
        return cls(venv, states, RolloutStore(out / f"{prefix}_dialogues.jsonl"))


@dataclass
class Context:
    """What every job needs besides its config: the test states (``eval``), the validation states of the sweep
    (``validation``, None without a sweep) and a token counter."""

    eval: Split
    validation: Split | None
    count_tokens: Any

    @classmethod
    def build(cls, cfg: LeaderboardConfig) -> Context:
        validation = Split.build(cfg, "validation", cfg.sweep.states, "sweep") if cfg.sweep.lrs else None
        return cls(Split.build(cfg, "test", cfg.eval.states, "eval"), validation, token_counter(cfg.policy))


def run_dir_of(cfg: LeaderboardConfig, name: str, seed: int, lr: float | None, sweep: bool) -> Path:
    base = Path(cfg.run_dir) / "runs"
    return base / "sweep" / f"{name}-lr{lr:g}" if sweep else base / f"{name}-seed{seed}"


def train_and_evaluate(cfg: LeaderboardConfig, ctx: Context, name: str, seed: int, iterations: int | None,
                       lr: float | None = None, sweep: bool = False) -> dict[str, Any]:
    """One agent run under the budget, its policy exported and evaluated (on the validation states for a sweep run,
    else the test states); returns its ``AgentRun.to_json()`` (also written to ``<run>/leaderboard_result.json``;
    the dialogues go to the split's store)."""
    run_dir = run_dir_of(cfg, name, seed, lr, sweep)
    budget = Budget(policy_samples=cfg.budget.policy_samples, scored_conversations=cfg.budget.scored_conversations,
                    optimizer_steps=cfg.budget.optimizer_steps,
                    count_tokens=ctx.count_tokens)
    typed, stop, train_s = train(cfg, name, seed, run_dir, iterations, budget, lr)
    if stop == "budget" or not (run_dir / "policy").is_dir():
        export_checkpoint_policy(run_dir, typed.policy, typed.seed)
    split = ctx.validation if sweep else ctx.eval
    assert split is not None, "a sweep job needs the validation states (sweep.lrs set)"
    policy = f"{name}/lr-{lr:g}" if sweep else f"{name}/seed-{seed}"
    _, eval_s = evaluate(cfg, split.venv, str(run_dir / "policy"), split.states, split.store, policy,
                         {"agent": name, "seed": seed, "lr": lr})
    probe_file = Path(cfg.run_dir) / PROBE_FILE  # written before any job starts (runner.py), where the task has one
    probe = None if sweep or not probe_file.is_file() else \
        probe_values(str(run_dir / "policy"), json.loads(probe_file.read_text()))
    result = AgentRun(name, seed, typed.iterations, completed_iterations(run_dir), stop, budget.usage("train"),
                      train_s, eval_s, lr, probe).to_json()
    (run_dir / "leaderboard_result.json").write_text(json.dumps(result, indent=1))
    gc.collect()  # the run's models and optimizer go before the next run loads its own
    log.info("%s %s: %s, %d/%d iterations, spent %s, %.0f s training", name,
             f"lr {lr:g} (sweep)" if sweep else f"seed {seed}", stop, result["completed"], typed.iterations,
             result["usage"], train_s)
    return result


def do_job(cfg: LeaderboardConfig, ctx: Context, kind: str, args: tuple[Any, ...]) -> Any:
    """Run one job (see the module docstring) and return its result."""
    if kind == "baseline":
        return evaluate(cfg, ctx.eval.venv, cfg.policy, ctx.eval.states, ctx.eval.store, "initial",
                        {"agent": "initial"})[1]
    if kind == "calibrate":
        return calibrate(cfg, args[0], Path(cfg.run_dir), ctx.count_tokens)
    if kind == "sweep":
        name, lr, iterations = args
        return train_and_evaluate(cfg, ctx, name, cfg.sweep.seed, iterations, lr, sweep=True)
    return train_and_evaluate(cfg, ctx, *args)


_WORKER: dict[str, Context] = {}  # a worker process's context, built by its first job


def _worker_init(threads: int | None) -> None:
    setup_logging()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _worker_job(cfg: LeaderboardConfig, kind: str, args: tuple[Any, ...]) -> Any:
    if cfg.run_dir not in _WORKER:
        _WORKER[cfg.run_dir] = Context.build(cfg)
    log.info("job %s %s started in process %d", kind, list(args), os.getpid())
    return do_job(cfg, _WORKER[cfg.run_dir], kind, args)


def job_gpus(settings: Any) -> int:
    """GPUs per submitit job: ``submitit.gpus_per_node``, or when null, 1 if this machine's device is CUDA
    (``DIALOGUE_GYM_DEVICE`` / auto) and 0 otherwise: a job given no GPU cannot see one (submitit hides them)."""
    if settings.gpus_per_node is not None:
        return int(settings.gpus_per_node)
    from dialogue_gym.models import resolve_device

    return 1 if resolve_device("auto").type == "cuda" else 0


def _submitit_job(cfg: LeaderboardConfig, kind: str, args: tuple[Any, ...], threads: int | None) -> Any:
    _worker_init(threads)
    return _worker_job(cfg, kind, args)


class SubmititBackend:
    """Jobs through submitit's ``AutoExecutor`` (SLURM, or its local executor); each job's result comes back as a
    ``Future`` completed by a thread that waits on it."""

    def __init__(self, cfg: LeaderboardConfig, threads: int | None):
        import submitit

        s = cfg.submitit
        self.executor = submitit.AutoExecutor(folder=str(Path(cfg.run_dir) / s.folder), cluster=s.cluster)
        params: dict[str, Any] = {"timeout_min": s.timeout_min, "gpus_per_node": job_gpus(s),
                                  "cpus_per_task": s.cpus_per_task, "mem_gb": s.mem_gb, "name": "leaderboard"}
        if s.partition is not None:
            params["slurm_partition"] = s.partition
        self.executor.update_parameters(**params)
        self.threads, self.jobs = threads, []

    def submit(self, cfg: LeaderboardConfig, kind: str, args: tuple[Any, ...]) -> Future:
        job = self.executor.submit(_submitit_job, cfg, kind, args, self.threads)
        self.jobs.append(job)
        log.info("leaderboard job %s %s submitted to submitit as %s", kind, list(args), job.job_id)
        fut: Future = Future()

        def collect() -> None:
            try:
                fut.set_result(job.result())
            except Exception as e:  # noqa: BLE001  (re-raised by the scheduler)
                fut.set_exception(e)

        threading.Thread(target=collect, daemon=True).start()
        return fut

    def shutdown(self, cancel: bool) -> None:
        if cancel:
            for job in self.jobs:
                if not job.done():
                    job.cancel(check=False)


class Scheduler:
    """Runs jobs inline (``jobs: 1``, backend local), in a pool of ``jobs`` spawned processes, or through submitit,
    the longest expected job first.

    Only as many jobs as there are workers are handed out at a time, so the choice of the next job is made when a
    worker frees up, with what is known then (calibrations finish and give each agent's run its estimate).
    """

    def __init__(self, cfg: LeaderboardConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.pending: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self.added = itertools.count()  # ties: the job added first runs first
        self.started = 0  # jobs started so far
        self.running: dict[Future, tuple[str, tuple[Any, ...]]] = {}
        self.pool: ProcessPoolExecutor | None = None
        self.submitit: SubmititBackend | None = None
        if cfg.backend == "submitit":
            self.submitit = SubmititBackend(cfg, job_threads(cfg))
        elif cfg.jobs > 1:
            self.pool = ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(job_threads(cfg),))

    def add(self, kind: str, args: tuple[Any, ...], estimate: float) -> None:
        self.pending.append((estimate, -next(self.added), kind, args))

    def _start(self, kind: str, args: tuple[Any, ...]) -> Future:
        if self.submitit is not None:
            return self.submitit.submit(self.cfg, kind, args)
        if self.pool is not None:
            return self.pool.submit(_worker_job, self.cfg, kind, args)
        fut: Future = Future()
        try:
            fut.set_result(do_job(self.cfg, self.ctx, kind, args))
        except Exception as e:  # noqa: BLE001  (re-raised by next_done)
            fut.set_exception(e)
        return fut

    def next_done(self) -> tuple[str, tuple[Any, ...], Any] | None:
        """Start jobs while workers are free; wait for one to finish and return ``(kind, args, result)``.

        Returns None when nothing is pending or running, or when nothing is running and the run directory holds
        ``STOP_FILE`` (then nothing new starts: see :meth:`stopping`). A job's exception is raised here.
        """
        while self.pending and len(self.running) < self.cfg.jobs and not self.stopping():
            self.pending.sort()
            _, _, kind, args = self.pending.pop()
            self.started += 1
            self.running[self._start(kind, args)] = (kind, args)
        if not self.running:
            return None
        fut = next(iter(wait(self.running, return_when=FIRST_COMPLETED)[0]))
        kind, args = self.running.pop(fut)
        try:
            return kind, args, fut.result()
        except Exception as e:
            e.add_note(f"in leaderboard job {kind} {list(args)}")
            log.error("leaderboard job %s %s failed: %s: %s", kind, list(args), type(e).__name__, e)
            raise

    def stopping(self) -> bool:
        """The run directory holds ``STOP_FILE`` (``touch <run_dir>/STOP``): the jobs running finish, none starts,
        so a leaderboard that spans sessions stops between runs instead of losing the ones in progress."""
        return (Path(self.cfg.run_dir) / STOP_FILE).is_file()

    def close(self, failed: bool) -> None:
        """Shut the workers down. After an error nothing new starts; local jobs already running finish (a finished
        agent run is kept for a resumed leaderboard) and their outcome is logged; submitit jobs are cancelled."""
        if self.submitit is not None:
            self.submitit.shutdown(cancel=failed)
            return
        if self.pool is None:
            return
        if failed and self.running:
            log.error("stopping after an error: waiting for %d running job(s) (%s) to finish; nothing new starts",
                      len(self.running), ", ".join(f"{k} {list(a)}" for k, a in self.running.values()))
        self.pool.shutdown(wait=True, cancel_futures=True)
        for fut, (kind, args) in self.running.items():
            if fut.cancelled():
                continue
            error = fut.exception()
            log.log(logging.ERROR if error else logging.INFO, "leaderboard job %s %s %s", kind, list(args),
                    f"failed too: {type(error).__name__}: {error}" if error else "finished (kept for a resumed run)")
