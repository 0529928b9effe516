"""The leaderboard: every agent trained from the same policy on the same task with the same budget, judged alike.

Run:
    python -m benchmarks.leaderboard +leaderboard=cpu     # arithmetic, SmolLM2-135M, 2-core CPU (< 90 minutes)
    python -m benchmarks.leaderboard +leaderboard=smoke   # tiny model, two agents, one seed (a minute)
    python -m benchmarks.leaderboard +leaderboard=paper   # the REFUEL protocol on GPUs (documented; not run on CPU)
    python -m benchmarks.leaderboard agents=[refuel,rebel] seeds=[0,1] budget.policy_samples=400
    python -m benchmarks.leaderboard +leaderboard=cpu jobs=8 threads=2   # 8 runs side by side on a 16-core machine

Protocol:
  1. Evaluation states: the first ``eval.states`` test rows, each with its user seed stream and a policy seed, are
     made once and stored in ``<run_dir>/eval_states.jsonl`` (a :class:`~dialogue_gym.rollouts.RolloutStore`);
     every policy is evaluated from these records.
  2. The initial policy (``policy``) plays every stored state: the baseline of every win rate.
  3. Budget to iterations (``budget.calibrate``): each agent runs one iteration with nothing capped; its cost as
     counted by the env (policy samples, scored conversations in training envs) sets its iteration count,
     ``floor(limit / (cost * (1 + margin)))``, so its learning-rate schedule spans the whole budget.
  4. Training: each agent and seed starts from the initial policy on the same env under the same budget, counted
     by the env (:mod:`dialogue_gym.budget`). A step that would exceed it raises ``BudgetExhausted``; the run's
     last checkpoint (its last whole iteration) is then its result.
  5. Evaluation: each trained policy (``<run>/policy``, loaded with ``load_model``) plays every stored state with
     the same user seeds, policy seeds and judge (the eval env scores every turn); the dialogues are appended to
     ``<run_dir>/eval_dialogues.jsonl``.
  Steps 2-5 are jobs: with ``jobs > 1`` they run side by side in spawned processes (a calibration before its
  agent's runs; the longest expected run first), each with ``threads`` torch threads. Every job seeds itself, so with
  the same threads per process the results are those of ``jobs: 1``.
  6. Report (``results_dir``: leaderboard.md, .csv, .png): the win rate against the initial policy at each turn h
     (the turn-h score, carried forward after a dialogue ended, compared state by state: 1 win, 0.5 tie, 0 loss),
     pooled over seeds with percentile-bootstrap 95% intervals over (seed, state) pairs; the mean turn-h score;
     task success by turn h where the task has a verifier; cost (policy samples and tokens, scored
     conversations, reward calls, wall time).
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import importlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_type_hints

import gymnasium as gym
import hydra
import numpy as np
from omegaconf import DictConfig

import dialogue_gym  # noqa: F401  (registers MultiTurnDialogue-v0)
from agents.common.config import ConfigError, EnvSettings, check, env_kwargs, merge_schema
from agents.common.evaluation import bootstrap_ci, carry_forward, win_outcomes
from agents.common.run import setup_logging
from dialogue_gym.budget import LIMITS, Budget, BudgetExhausted, Usage, use_budget
from dialogue_gym.generation import SamplingParams
from dialogue_gym.generation.hf import HFEngine
from dialogue_gym.models import load_model
from dialogue_gym.rollouts import DialogueRecord, RolloutStore, StateRecord, config_hashes, stored_states

log = logging.getLogger("benchmarks.leaderboard")
ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")


@dataclass
class BudgetSettings:
    """The training budget every agent gets, counted by the env in its training (``train`` split) envs."""

    policy_samples: int | None = 256  # assistant turns an agent may step while training (null: no limit)
    scored_conversations: int | None = None  # conversations the reward model may score while training (null: none)
    calibrate: bool = True  # set each agent's iterations from one measured iteration; false: the agent's own
    margin: float = 0.1  # calibration headroom: iterations = floor(limit / (cost per iteration * (1 + margin)))
    max_iterations: int = 100  # upper bound on calibrated iterations


@dataclass
class EvalProtocol:
    """The evaluation every trained policy gets."""

    states: int = 64  # stored evaluation states (the first rows of the test split)
    seed: int = 1234  # seeds the user seed streams and policy seeds of the stored states
    temperature: float = 0.0  # policy temperature at evaluation (0 = greedy)
    reward: str | None = None  # the judge: a reward spec for the eval env; null = the env's own reward
    n_boot: int = 2000  # bootstrap resamples for the 95% intervals


@dataclass
class LeaderboardConfig:
    """Leaderboard settings (``conf/leaderboard.yaml`` is merged over them)."""

    agents: list[str] = field(default_factory=lambda: ["refuel", "rebel", "dpo", "ppo"])  # agents.<name> packages
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds per agent
    policy: str = "embedded"  # the initial policy of every agent, and the baseline of the win rates
    env: EnvSettings = field(default_factory=EnvSettings)  # task, user, reward of training and evaluation
    max_new_tokens: int = 64  # policy reply cap, in training and evaluation, for every agent
    temperature: float | None = None  # policy sampling temperature in training for every agent; null: each agent's
    budget: BudgetSettings = field(default_factory=BudgetSettings)  # equal training budget
    eval: EvalProtocol = field(default_factory=EvalProtocol)  # fixed evaluation protocol
    agent_eval_dialogues: int = 1  # size of each agent's own in-run evaluation (the leaderboard evaluates anyway)
    overrides: dict[str, list[str]] = field(default_factory=dict)  # Hydra overrides per agent, e.g. {dpo: [n=4]}
    results_dir: str = "benchmarks/results"  # where leaderboard.md, .csv and .png are written
    threads: int | None = None  # torch CPU threads per process (null: the cores shared out among the jobs)
    jobs: int = 1  # calibrations and agent runs side by side in this many processes (1: one after another, inline)
    title: str = "Leaderboard"  # heading of leaderboard.md
    notes: str = ""  # free text added to leaderboard.md (e.g. how the run went)
    run_dir: str = "."  # working directory: stores, agent runs (Hydra's run dir)


@dataclass
class AgentRun:
    """One agent trained with one seed, and its evaluation dialogues (one per stored state, in state order)."""

    agent: str
    seed: int
    iterations: int  # iterations asked for
    completed: int  # whole iterations done (from the run's checkpoint)
    stop: str  # "completed" or "budget"
    usage: Usage  # training spend counted by the env
    train_s: float  # wall time of the agent's run (model loading and its own small evaluation included)
    eval_s: float  # wall time of the leaderboard's evaluation of the trained policy
    records: list[DialogueRecord] = field(default_factory=list, repr=False)

    @property
    def policy(self) -> str:
        """The name its evaluation dialogues carry in the rollout store."""
        return f"{self.agent}/seed-{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "seed": self.seed, "iterations": self.iterations, "completed": self.completed,
                "stop": self.stop, "usage": self.usage.as_dict(), "train_s": self.train_s, "eval_s": self.eval_s}

    @classmethod
    def from_json(cls, data: dict[str, Any], records: list[DialogueRecord]) -> AgentRun:
        return cls(**{**data, "usage": Usage(**data["usage"])}, records=records)


def validate(cfg: LeaderboardConfig) -> None:
    """Range checks before any model loads."""
    check(len(cfg.agents) >= 1, "agents must name at least one agent (refuel, rebel, dpo, ppo)")
    check(len(set(cfg.agents)) == len(cfg.agents), f"agents has duplicates: {cfg.agents}")
    for name in cfg.agents:
        agent_module(name)
    unknown = sorted(set(cfg.overrides) - set(available_agents()))
    check(not unknown, f"overrides name agent(s) {unknown} that do not exist; agents: {', '.join(available_agents())}")
    check(len(cfg.seeds) >= 1 and len(set(cfg.seeds)) == len(cfg.seeds),
          f"seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    b = cfg.budget
    for name in LIMITS:
        v = getattr(b, name)
        check(v is None or v >= 1, f"budget.{name} must be >= 1 or null (no limit), got {v}")
    check(any(getattr(b, n) is not None for n in LIMITS),
          f"budget: set at least one of {', '.join('budget.' + n for n in LIMITS)}; an unlimited budget is no budget")
    check(b.margin >= 0, f"budget.margin must be >= 0, got {b.margin}")
    check(b.max_iterations >= 1, f"budget.max_iterations must be >= 1, got {b.max_iterations}")
    check(cfg.eval.states >= 1, f"eval.states must be >= 1, got {cfg.eval.states}")
    check(cfg.eval.temperature >= 0, f"eval.temperature must be >= 0 (0 = greedy), got {cfg.eval.temperature}")
    check(cfg.eval.n_boot >= 100, f"eval.n_boot must be >= 100, got {cfg.eval.n_boot}")
    check(cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    check(cfg.temperature is None or cfg.temperature > 0,
          f"temperature must be > 0 (on-policy sampling) or null (each agent's own), got {cfg.temperature}")
    check(cfg.agent_eval_dialogues >= 1, f"agent_eval_dialogues must be >= 1, got {cfg.agent_eval_dialogues}")
    check(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1 or null (torch's default), got {cfg.threads}")
    check(cfg.jobs >= 1, f"jobs must be >= 1 (processes running agent runs side by side), got {cfg.jobs}")


# ---- agents --------------------------------------------------------------------------------------------------

def available_agents() -> list[str]:
    """The agent packages with an entry point (``agents/<name>/__main__.py``)."""
    return sorted(p.name for p in (ROOT / "agents").iterdir() if (p / "__main__.py").is_file())


def agent_module(name: str) -> Any:
    """``agents.<name>.__main__``, which must define ``run(cfg)``.

    Raises:
        ConfigError: no such agent, naming the ones that exist.
    """
    try:
        module = importlib.import_module(f"agents.{name}.__main__")
    except ModuleNotFoundError as e:
        if e.name not in (f"agents.{name}", f"agents.{name}.__main__"):
            raise
        raise ConfigError(f"agents lists {name!r}, but there is no agents/{name}/__main__.py; available: "
                          f"{', '.join(available_agents())}") from None
    if not callable(getattr(module, "run", None)):
        raise ConfigError(f"agents/{name}/__main__.py has no run(cfg) function")
    return module


def compose_agent_config(name: str, overrides: list[str]) -> DictConfig:
    """The agent's Hydra config (``conf/<name>.yaml`` with ``overrides``), composed as its own entry point would.

    A plain ``key=value`` override may also set a key the YAML file leaves to the agent's schema default (it is
    applied as ``++key=value``); the schema still rejects unknown keys.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o if o.startswith(("+", "~")) else "++" + o for o in overrides]

    if GlobalHydra.instance().is_initialized():  # inside the leaderboard's own Hydra app: same conf/ directory
        return compose(config_name=name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=overrides)


def agent_config(cfg: LeaderboardConfig, name: str, seed: int, run_dir: Path, iterations: int | None) -> Any:
    """The agent's typed config with the leaderboard's shared settings imposed.

    Shared by every agent: the env, the initial policy, the reply length cap, the sampling temperature (when
    set), the seed; the agent's own in-run evaluation is shrunk to ``agent_eval_dialogues`` (the leaderboard
    evaluates every policy itself).
    """
    module = agent_module(name)
    schema = get_type_hints(module.run)["cfg"]
    typed = merge_schema(compose_agent_config(name, list(cfg.overrides.get(name, []))), schema)
    for key in ("env", "policy", "sampling", "eval", "seed", "iterations", "run_dir", "export"):
        if not hasattr(typed, key):
            raise ConfigError(f"agent {name!r} has no {key!r} setting; the leaderboard needs it ({schema.__name__})")
    typed.env = dataclasses.replace(cfg.env, task_kwargs=dict(cfg.env.task_kwargs), split="train")
    typed.policy.model = cfg.policy
    typed.sampling.max_new_tokens = cfg.max_new_tokens
    if cfg.temperature is not None:
        typed.sampling.temperature = cfg.temperature
    typed.eval.dialogues = cfg.agent_eval_dialogues
    typed.seed, typed.run_dir, typed.export = seed, str(run_dir), True
    if iterations is not None:
        typed.iterations = iterations
    if hasattr(typed, "resume"):
        typed.resume = False
    return typed


def train(cfg: LeaderboardConfig, name: str, seed: int, run_dir: Path, iterations: int | None,
          budget: Budget) -> tuple[Any, str, float]:
    """Run one agent under ``budget``; returns its typed config, how it stopped and the wall time in seconds."""
    typed = agent_config(cfg, name, seed, run_dir, iterations)
    t0 = time.time()
    stop = "completed"
    with use_budget(budget):
        try:
            agent_module(name).run(typed)
        except BudgetExhausted as e:
            stop = "budget"
            log.info("%s seed %d stopped by the budget: %s", name, seed, e)
    return typed, stop, time.time() - t0


def completed_iterations(run_dir: Path) -> int:
    """Whole iterations a run finished, from its last checkpoint (0 when it has none)."""
    path = run_dir / "checkpoints" / "last" / "state.json"
    return int(json.loads(path.read_text()).get("iteration", 0)) if path.is_file() else 0


def export_checkpoint(typed: Any, run_dir: Path) -> Path:
    """Export the policy of a run's last checkpoint to ``<run_dir>/policy`` (the initial policy when it has none).

    Agents keep the policy's trainable tensors in ``checkpoints/last/trainable.safetensors`` under the policy's own
    parameter names, or under ``policy.<name>`` when they train the policy inside a larger module (PPO's value head).
    """
    import torch
    from safetensors.torch import load_file

    from agents.common.policy import export_policy, load_policy, trainable_parameters

    model, tokenizer = load_policy(typed.policy, seed=typed.seed)
    path = run_dir / "checkpoints" / "last" / "trainable.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        params = trainable_parameters(model)
        with torch.no_grad():
            for n, p in params.items():
                tensor = saved.get(n, saved.get(f"policy.{n}"))
                if tensor is None:
                    raise RuntimeError(f"{path} has no tensor {n!r} (nor 'policy.{n}'); cannot rebuild the policy")
                p.copy_(tensor)
    return export_policy(model, tokenizer, run_dir / "policy")


def calibration_saved(out: Path, name: str) -> bool:
    """The agent's calibration has been measured in this run directory (``calibrate`` only reads it)."""
    return (out / "calibration" / name / "cost.json").is_file()


def calibrate(cfg: LeaderboardConfig, name: str, out: Path, count_tokens: Any
              ) -> tuple[int, dict[str, int], float]:
    """Iterations that fit the budget, from one measured iteration of the agent (first seed, nothing capped).

    Returns:
        ``(iterations, cost of one iteration, wall seconds of the measured iteration)``; the cost and the wall time
        are saved in ``<out>/calibration/<name>/cost.json`` and reused when present.

    Raises:
        ConfigError: the agent spent nothing the budget limits, or one iteration already exceeds the budget.
    """
    run_dir = out / "calibration" / name
    saved = run_dir / "cost.json"
    if saved.is_file():
        data = json.loads(saved.read_text())
        wall = float(data.pop("wall_s", 0.0))
        cost = Usage(**data)
    else:
        budget = Budget(count_tokens=count_tokens)
        typed = agent_config(cfg, name, cfg.seeds[0], run_dir, 1)
        typed.export = False
        t0 = time.time()
        with use_budget(budget):
            agent_module(name).run(typed)
        cost, wall = budget.usage("train"), time.time() - t0
        saved.write_text(json.dumps({**cost.as_dict(), "wall_s": wall}))
    fits = [getattr(cfg.budget, n) / (getattr(cost, n) * (1 + cfg.budget.margin))
            for n in LIMITS if getattr(cfg.budget, n) is not None and getattr(cost, n) > 0]
    if not fits:
        raise ConfigError(f"agent {name!r} spent none of the limited budget ({', '.join(LIMITS)}) in one iteration: "
                          "the budget cannot bound it (does it train through the env?)")
    iterations = min(cfg.budget.max_iterations, math.floor(min(fits)))
    if iterations < 1:
        limits = ", ".join(f"{n} {_limit(getattr(cfg.budget, n))}" for n in LIMITS)
        raise ConfigError(f"one iteration of {name!r} costs {cost.as_dict()}, more than the budget ({limits}) "
                          f"allows with margin {cfg.budget.margin}: raise budget.policy_samples or shrink the "
                          f"agent's iterations (overrides.{name})")
    log.info("calibration: one iteration of %s costs %s -> %d iteration(s)", name, cost.as_dict(), iterations)
    return iterations, cost.as_dict(), wall


# ---- evaluation ----------------------------------------------------------------------------------------------

def eval_env(cfg: LeaderboardConfig, n: int) -> Any:
    """The evaluation vector env: the test split, every turn scored by the judge."""
    over: dict[str, Any] = {"split": "test", "reward_mode": "per_turn"}
    if cfg.eval.reward is not None:
        over["reward"] = cfg.eval.reward
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", **env_kwargs(cfg.env, **over))


def turn_seed(policy_seed: int, turn: int) -> int:
    """The policy's sampling seed at ``turn`` of a dialogue from a stored state (independent of batching)."""
    return int(np.random.default_rng([policy_seed, turn]).integers(0, 2**63 - 1))


def play_states(venv: Any, engine: Any, params: SamplingParams, states: list[StateRecord], policy: str,
                tags: dict[str, Any] | None = None) -> list[DialogueRecord]:
    """Play every stored state to its end with the policy: one record per state, every turn scored.

    ``venv`` needs ``len(states)`` sub-envs, autoreset DISABLED and ``reward_mode="per_turn"``.
    """
    n = len(states)
    if venv.num_envs != n:
        raise ValueError(f"{n} states for a vector env of {venv.num_envs} sub-envs")
    obs, _ = venv.reset(options={"states": [s.state for s in states]})
    gens: list[list[Any]] = [[] for _ in range(n)]
    rewards: list[list[float]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    while not done.all():
        idx = [int(i) for i in np.flatnonzero(~done)]
        turns = [s.turn for s in venv.get_states()]
        out = engine.generate([obs[i] for i in idx], params, return_logprobs=True,
                              seeds=[turn_seed(states[i].policy_seed, turns[i]) for i in idx])
        actions: list[str | None] = [None] * n
        for i, g in zip(idx, out):
            actions[i] = g.text if g.text.strip() else "..."  # a blank reply still takes its turn
            gens[i].append(g)
        obs, _, term, trunc, info = venv.step(actions)
        for i in idx:
            rewards[i].append(float(info["score"][i]))
            done[i] = bool(term[i] or trunc[i])
    final = venv.get_states()
    hashes = config_hashes(venv.core)
    return [DialogueRecord(id=f"{policy}/{s.id}", policy=policy, messages=f.messages, rewards=rewards[i],
                           token_ids=[list(g.token_ids) for g in gens[i]],
                           logprobs=[list(g.logprobs) for g in gens[i]], terminated=f.terminated,
                           truncated=f.truncated, start=s.id, start_hash=s.state_hash,
                           state_fingerprint=f.config_fingerprint, config=hashes,
                           seeds={"policy": s.policy_seed}, tags=dict(tags or {}))
            for i, (s, f) in enumerate(zip(states, final))]


def score_matrix(records: list[DialogueRecord], horizon: int) -> np.ndarray:
    """(n, horizon) per-turn scores (turns counted from the stored state), NaN after a dialogue ended."""
    out = np.full((len(records), horizon), np.nan)
    for i, r in enumerate(records):
        out[i, :len(r.rewards)] = [np.nan if x is None else x for x in r.rewards]
    return out


def success_matrix(records: list[DialogueRecord], states: list[StateRecord], verifier: Any, horizon: int
                   ) -> np.ndarray:
    """(n, horizon) 1.0 when the verifier accepted a reply at or before turn h (turns from the stored state)."""
    out = np.zeros((len(records), horizon))
    for i, (r, s) in enumerate(zip(records, states)):
        start = s.state.turn
        for k in range(len(r.rewards)):
            cut = _after_assistant_turn(r.messages, start + k + 1)
            if verifier.score([cut], [s.state.profile])[0] > 0:
                out[i, k:] = 1.0
                break
    return out


def _after_assistant_turn(messages: list[dict[str, str]], turn: int) -> list[dict[str, str]]:
    seen = 0
    for j, m in enumerate(messages):
        seen += m["role"] == "assistant"
        if seen == turn:
            return messages[:j + 1]
    return list(messages)


def evaluate(cfg: LeaderboardConfig, venv: Any, model_name: str, states: list[StateRecord], store: RolloutStore,
             policy: str, tags: dict[str, Any]) -> tuple[list[DialogueRecord], float]:
    """Load ``model_name`` with ``load_model``, play the stored states, append the dialogues to ``store``."""
    t0 = time.time()
    model, tokenizer = load_model(model_name, shared=False)
    engine = HFEngine((model, tokenizer), seed=cfg.eval.seed)
    params = SamplingParams(temperature=cfg.eval.temperature, max_new_tokens=cfg.max_new_tokens)
    records = play_states(venv, engine, params, states, policy, tags)
    store.append(records)
    return records, time.time() - t0


# ---- the whole benchmark -------------------------------------------------------------------------------------

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
class Context:
    """What every job needs besides its config: the eval env, the stored states, the dialogue store, a token counter."""

    venv: Any
    states: list[StateRecord]
    store: RolloutStore
    count_tokens: Any

    @classmethod
    def build(cls, cfg: LeaderboardConfig) -> Context:
        out = Path(cfg.run_dir)
        venv = eval_env(cfg, cfg.eval.states)
        states = stored_states(RolloutStore(out / "eval_states.jsonl"), venv.core, cfg.eval.states, cfg.eval.seed)
        return cls(venv, states, RolloutStore(out / "eval_dialogues.jsonl"), token_counter(cfg.policy))


def train_and_evaluate(cfg: LeaderboardConfig, ctx: Context, name: str, seed: int, iterations: int | None
                       ) -> dict[str, Any]:
    """One agent run under the budget, its policy exported and evaluated; returns its ``AgentRun.to_json()``
    (also written to ``<run>/leaderboard_result.json``; the dialogues go to the store)."""
    run_dir = Path(cfg.run_dir) / "runs" / f"{name}-seed{seed}"
    budget = Budget(policy_samples=cfg.budget.policy_samples, scored_conversations=cfg.budget.scored_conversations,
                    count_tokens=ctx.count_tokens)
    typed, stop, train_s = train(cfg, name, seed, run_dir, iterations, budget)
    if stop == "budget" or not (run_dir / "policy").is_dir():
        export_checkpoint(typed, run_dir)
    _, eval_s = evaluate(cfg, ctx.venv, str(run_dir / "policy"), ctx.states, ctx.store, f"{name}/seed-{seed}",
                         {"agent": name, "seed": seed})
    result = AgentRun(name, seed, typed.iterations, completed_iterations(run_dir), stop, budget.usage("train"),
                      train_s, eval_s).to_json()
    (run_dir / "leaderboard_result.json").write_text(json.dumps(result, indent=1))
    gc.collect()  # the run's models and optimizer go before the next run loads its own
    log.info("%s seed %d: %s, %d/%d iterations, spent %s, %.0f s training", name, seed, stop, result["completed"],
             typed.iterations, result["usage"], train_s)
    return result


def do_job(cfg: LeaderboardConfig, ctx: Context, kind: str, args: tuple[Any, ...]) -> Any:
    """Run one job: ``("baseline", ())``, ``("calibrate", (agent,))`` or ``("train", (agent, seed, iterations))``."""
    if kind == "baseline":
        return evaluate(cfg, ctx.venv, cfg.policy, ctx.states, ctx.store, "initial", {"agent": "initial"})[1]
    if kind == "calibrate":
        return calibrate(cfg, args[0], Path(cfg.run_dir), ctx.count_tokens)
    return train_and_evaluate(cfg, ctx, *args)


_WORKER: dict[str, Context] = {}  # a pool worker's context, built by its first job


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


class Scheduler:
    """Runs jobs inline (``jobs: 1``) or in a pool of ``jobs`` spawned processes, the longest expected job first.

    Only as many jobs as there are workers are handed to the pool at a time, so the choice of the next job is made
    when a worker frees up, with what is known then (calibrations finish and give each agent's run its estimate).
    """

    def __init__(self, cfg: LeaderboardConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        self.pending: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self.added = itertools.count()  # ties: the job added first runs first
        self.started = 0  # jobs started so far
        self.running: dict[Future, tuple[str, tuple[Any, ...]]] = {}
        self.pool: ProcessPoolExecutor | None = None
        if cfg.jobs > 1:
            self.pool = ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(job_threads(cfg),))

    def add(self, kind: str, args: tuple[Any, ...], estimate: float) -> None:
        self.pending.append((estimate, -next(self.added), kind, args))

    def next_done(self) -> tuple[str, tuple[Any, ...], Any] | None:
        """Start jobs while workers are free; wait for one to finish and return ``(kind, args, result)``.

        Returns None when nothing is pending or running. A job's exception is raised here.
        """
        while self.pending and len(self.running) < self.cfg.jobs:
            self.pending.sort()
            _, _, kind, args = self.pending.pop()
            self.started += 1
            if self.pool is None:
                fut: Future = Future()
                try:
                    fut.set_result(do_job(self.cfg, self.ctx, kind, args))
                except Exception as e:  # noqa: BLE001  (re-raised by result() below)
                    fut.set_exception(e)
            else:
                fut = self.pool.submit(_worker_job, self.cfg, kind, args)
            self.running[fut] = (kind, args)
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

    def close(self, failed: bool) -> None:
        """Shut the pool down. After an error nothing new starts; jobs already running finish (a finished agent run
        is kept for a resumed leaderboard) and their outcome is logged."""
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


def run(cfg: LeaderboardConfig, command: str = "") -> dict[str, Any]:
    """Train and evaluate every agent and seed, then write the report.

    With ``jobs > 1`` the calibrations, agent runs and the baseline's evaluation run side by side in that many
    processes (each with ``job_threads`` torch threads). With the same torch threads per process (``threads``
    set), results do not depend on ``jobs``; a different thread count can change floating-point sums, hence
    sampled tokens. Wall times are then measured with other jobs running beside.

    Work already done in ``run_dir`` (the stored states, the baseline's dialogues, calibrations, finished agent
    runs) is reused, so an interrupted leaderboard continues where it stopped (``hydra.run.dir=<its dir>``).

    Returns:
        ``{"rows": summary rows (as in the CSV), "runs": [AgentRun], "meta": {...}}``.
    """
    validate(cfg)
    threads = job_threads(cfg)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = out / "started_at.txt"  # the first start, kept across resumed runs
    resumed = first.is_file()
    if not resumed:
        first.write_text(datetime.now(UTC).isoformat(timespec="seconds"))
    started, load_start = datetime.fromisoformat(first.read_text().strip()), os.getloadavg()
    last = out / "finished_at.txt"  # when the last job of the whole leaderboard finished
    ended: datetime | None = None  # set once every job is done
    ctx = Context.build(cfg)
    states, store = ctx.states, ctx.store
    done = played(store, states)
    baseline: list[DialogueRecord] | None = done.get("initial")
    baseline_s = 0.0
    runs: list[AgentRun] = []
    calibration: dict[str, dict[str, int]] = {}
    verifier = ctx.venv.core.task.make_reward("verifier")
    order = {(a, s): k for k, (a, s) in enumerate((a, s) for a in cfg.agents for s in cfg.seeds)}

    def report() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Write the report for the runs finished so far (a partial report names the runs still to come)."""
        runs.sort(key=lambda r: order[(r.agent, r.seed)])
        finished = {(r.agent, r.seed) for r in runs}
        rows = summarize(cfg, runs, baseline, states, verifier)
        meta = {"started": started.isoformat(timespec="seconds"), "resumed": resumed,
                "wall_s": ((ended or datetime.now(UTC)) - started).total_seconds(), "load_start": load_start,
                "load_end": os.getloadavg(), "baseline_eval_s": baseline_s, "command": command,
                "calibration": {a: calibration[a] for a in cfg.agents if a in calibration},
                "states": len(states), "jobs": cfg.jobs, "threads": threads,
                "pending": [f"{a}/seed-{s}" for a in cfg.agents for s in cfg.seeds if (a, s) not in finished]}
        write_report(cfg, rows, runs, meta)
        return rows, meta

    def add_runs(sched: Scheduler, name: str, iterations: int | None, estimate: float) -> None:
        for seed in cfg.seeds:
            result = out / "runs" / f"{name}-seed{seed}" / "leaderboard_result.json"
            if result.is_file() and f"{name}/seed-{seed}" in done:
                runs.append(AgentRun.from_json(json.loads(result.read_text()), done[f"{name}/seed-{seed}"]))
            else:
                sched.add("train", (name, seed, iterations), estimate)

    sched = Scheduler(cfg, ctx)
    failed = True
    try:
        if baseline is None:
            sched.add("baseline", (), math.inf)  # first: partial reports need it
        for name in cfg.agents:
            if not cfg.budget.calibrate:
                add_runs(sched, name, None, 0.0)
            elif calibration_saved(out, name):  # measured before this (resumed) run: only read
                iterations, calibration[name], wall = calibrate(cfg, name, out, ctx.count_tokens)
                add_runs(sched, name, iterations, wall * iterations)
            else:
                sched.add("calibrate", (name,), math.inf)  # first: each unblocks an agent's runs
        while (finished := sched.next_done()) is not None:
            kind, args, result = finished
            if kind == "baseline":
                baseline_s = result
                baseline = played(store, states)["initial"]
            elif kind == "calibrate":
                iterations, calibration[args[0]], wall = result
                add_runs(sched, args[0], iterations, wall * iterations)
            else:
                name, seed = args[0], args[1]
                records = played(store, states)[f"{name}/seed-{seed}"]
                runs.append(AgentRun.from_json(result, records))
            if baseline is not None and kind != "calibrate":
                report()  # so an interrupted leaderboard still leaves the results it has
        failed = False
    finally:
        sched.close(failed)
    if sched.started == 0 and last.is_file():  # nothing left to do: only the report is rewritten, its time kept
        ended = datetime.fromisoformat(last.read_text().strip())
    else:
        ended = datetime.now(UTC)
        last.write_text(ended.isoformat(timespec="seconds"))
    rows, meta = report()
    return {"rows": rows, "runs": runs, "meta": meta}


def played(store: RolloutStore, states: list[StateRecord]) -> dict[str, list[DialogueRecord]]:
    """The store's dialogues per policy, in state order, for policies that played every state (last one wins)."""
    latest: dict[str, dict[str, DialogueRecord]] = {}
    for r in store.dialogues():
        latest.setdefault(r.policy, {})[r.start] = r
    return {p: [by_start[s.id] for s in states] for p, by_start in latest.items()
            if all(s.id in by_start for s in states)}


def _pooled(mats: list[np.ndarray], h: int, n_boot: int, seed: int) -> tuple[float, float, float]:
    v = np.concatenate([m[:, h] for m in mats])
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return float(v.mean()), lo, hi


def summarize(cfg: LeaderboardConfig, runs: list[AgentRun], baseline: list[DialogueRecord],
              states: list[StateRecord], verifier: Any | None) -> list[dict[str, Any]]:
    """One row per (policy, seed or "all", turn h): win rate, score and (with a verifier) success, each with its
    95% interval, and the mean cost per seed. The initial policy's row has a win rate of 0.5 by definition."""
    horizon = max(cfg.env.max_turns - s.state.turn for s in states)
    base = score_matrix(baseline, horizon)

    def success(records: list[DialogueRecord]) -> np.ndarray:
        return success_matrix(records, states, verifier, horizon)

    rows: list[dict[str, Any]] = []
    groups: list[tuple[str, str, list[AgentRun] | None]] = [("initial", "all", None)]  # None: the baseline itself
    for name in cfg.agents:
        mine = [r for r in runs if r.agent == name]
        if mine:
            groups += [(name, "all", mine)] + [(name, str(r.seed), [r]) for r in mine]
    for name, seed, group in groups:
        if group is None:
            scores, wins, cost = [carry_forward(base)], [np.full_like(base, 0.5)], {}
            succ = [success(baseline)] if verifier else None
        else:
            played = [score_matrix(r.records, horizon) for r in group]
            scores, wins = [carry_forward(m) for m in played], [win_outcomes(m, base) for m in played]
            succ = [success(r.records) for r in group] if verifier else None
            cost = _mean_cost(group)
        for h in range(horizon):
            row: dict[str, Any] = {"policy": name, "seed": seed, "turn": h + 1}
            row["win"], row["win_lo"], row["win_hi"] = _pooled(wins, h, cfg.eval.n_boot, 100 + h)
            row["score"], row["score_lo"], row["score_hi"] = _pooled(scores, h, cfg.eval.n_boot, h)
            if succ is not None:
                row["success"], row["success_lo"], row["success_hi"] = _pooled(succ, h, cfg.eval.n_boot, 200 + h)
            rows.append({**row, **cost})
    return rows


def _mean_cost(group: list[AgentRun]) -> dict[str, Any]:
    mean = lambda f: float(np.mean([f(r) for r in group]))  # noqa: E731
    return {"iterations": mean(lambda r: r.iterations), "completed": mean(lambda r: r.completed),
            "runs": len(group), "stopped_by_budget": sum(r.stop == "budget" for r in group),
            "policy_samples": mean(lambda r: r.usage.policy_samples),
            "policy_tokens": mean(lambda r: r.usage.policy_tokens),
            "scored_conversations": mean(lambda r: r.usage.scored_conversations),
            "reward_calls": mean(lambda r: r.usage.reward_calls), "train_s": mean(lambda r: r.train_s),
            "eval_s": mean(lambda r: r.eval_s)}


# ---- report --------------------------------------------------------------------------------------------------

def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, Python and torch versions, torch's CPU threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": ram, "python": platform.python_version(),
            "torch": torch.__version__, "threads": str(torch.get_num_threads()), "platform": platform.platform()}


CSV_FIELDS = ("policy", "seed", "turn", "win", "win_lo", "win_hi", "score", "score_lo", "score_hi", "success",
              "success_lo", "success_hi", "runs", "iterations", "completed", "stopped_by_budget", "policy_samples",
              "policy_tokens", "scored_conversations", "reward_calls", "train_s", "eval_s")


def results_path(cfg: LeaderboardConfig) -> Path:
    """``results_dir``; a relative path is taken from the repository root."""
    path = Path(cfg.results_dir).expanduser()
    return path if path.is_absolute() else ROOT / path


def write_report(cfg: LeaderboardConfig, rows: list[dict[str, Any]], runs: list[AgentRun], meta: dict[str, Any]
                 ) -> None:
    """``leaderboard.csv`` (every row), ``leaderboard.png`` (win rate vs turn) and ``leaderboard.md``."""
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    plot(rows, out / "leaderboard.png", cfg.title)
    (out / "leaderboard.md").write_text(markdown(cfg, rows, runs, meta))


def reported_agents(rows: list[dict[str, Any]]) -> list[str]:
    """The agents with results in ``rows``, in their order."""
    return list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "initial"))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Win rate vs turn, one line per agent with its 95% interval, and the initial policy's 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = reported_agents(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, name in enumerate(agents):
        mine = [r for r in rows if r["policy"] == name and r["seed"] == "all"]
        h = np.array([r["turn"] for r in mine]) + 0.06 * (k - (len(agents) - 1) / 2)  # side by side, not on top
        w = np.array([r["win"] for r in mine])
        err = np.array([[x - r["win_lo"] for x, r in zip(w, mine)], [r["win_hi"] - x for x, r in zip(w, mine)]])
        ax.errorbar(h, w, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="initial policy")
    ax.set_xlabel("turn h")
    ax.set_ylabel("win rate vs initial policy")
    ax.set_ylim(0, 1)
    ax.set_xticks(sorted({r["turn"] for r in rows}))
    ax.set_title(f"{title}: win rate at turn h (95% bootstrap CI)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _partial_note(meta: dict[str, Any]) -> list[str]:
    if not meta.get("pending"):
        return []
    return [f"**Partial results**: {len(meta['pending'])} agent run(s) still to come when this was written: "
            f"{', '.join(meta['pending'])}.", ""]


def _limit(v: int | None) -> str:
    return "no limit" if v is None else str(v)


def _cell(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.3f} [{r[key + '_lo']:.2f}, {r[key + '_hi']:.2f}]"


def markdown(cfg: LeaderboardConfig, rows: list[dict[str, Any]], runs: list[AgentRun], meta: dict[str, Any]) -> str:
    info = machine_info()
    agents = reported_agents(rows)
    horizon = max(r["turn"] for r in rows)
    hs = " | ".join(f"h={h}" for h in range(1, horizon + 1))
    sep = "|---" * (horizon + 1) + "|"
    pooled = lambda p: [r for r in rows if r["policy"] == p and r["seed"] == "all"]  # noqa: E731
    temperature_note = "each agent's own" if cfg.temperature is None else f"{cfg.temperature} for every agent"
    iterations_note = (f"each agent's, set from one measured iteration (margin {cfg.budget.margin})"
                       if cfg.budget.calibrate else "each agent's own setting")
    lines = [f"# {cfg.title}", "",
             f"Written by `python -m benchmarks.leaderboard`, started {meta['started']} (UTC); "
             f"{meta['wall_s'] / 60:.1f} min of wall-clock time since"
             f"{' (the run was interrupted and resumed in its directory)' if meta.get('resumed') else ''}.", "",
             "Command:", "", "```", meta["command"] or "(called from Python)",
             "```", "", *_partial_note(meta),
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, Python {info['python']}, "
             f"torch {info['torch']} (CPU threads per process: {info['threads']}), {info['platform']}; "
             f"{meta.get('jobs', 1)} job(s) side by side"
             f"{' (wall times include the other jobs running beside each)' if meta.get('jobs', 1) > 1 else ''}. "
             "Load average (1/5/15 min) at the last start "
             f"{'/'.join(f'{x:.1f}' for x in meta['load_start'])}, at the end "
             f"{'/'.join(f'{x:.1f}' for x in meta['load_end'])} (the machine may have been shared: read wall times "
             "with that in mind).", "",
             "## Protocol", "",
             f"- Task: `{cfg.env.task}` {dict(cfg.env.task_kwargs) or ''}, user `{cfg.env.user or 'task default'}`, "
             f"training reward `{cfg.env.reward or 'task default'}` ({cfg.env.reward_mode}), horizon "
             f"{cfg.env.max_turns} turns; replies capped at {cfg.max_new_tokens} tokens; training samples at "
             f"temperature {temperature_note}.",
             f"- Initial policy of every agent and baseline: `{cfg.policy}`. Agents: {', '.join(cfg.agents)}; "
             f"seeds {list(cfg.seeds)}.",
             f"- Budget per agent and seed, counted by the env in its training envs: policy samples "
             f"{_limit(cfg.budget.policy_samples)}, scored conversations "
             f"{_limit(cfg.budget.scored_conversations)}. Iterations: {iterations_note}.",
             f"- Evaluation: {meta['states']} stored test states (user and policy seeds fixed, seed {cfg.eval.seed}), "
             f"policy temperature {cfg.eval.temperature}, judge `{cfg.eval.reward or cfg.env.reward or 'env default'}`"
             f" scoring every turn. Turn-h score carried forward after a dialogue ended; win = higher turn-h score "
             "than the initial policy on the same state (tie 0.5). Pooled over seeds; 95% percentile-bootstrap "
             "intervals over (seed, state) pairs.", ""]
    lines += ["## Win rate vs the initial policy", "", f"| agent | {hs} | mean |", sep + "---|"]
    for name in agents:
        mine = pooled(name)
        lines.append(f"| {name} | " + " | ".join(_cell(r, "win") for r in mine)
                     + f" | {np.mean([r['win'] for r in mine]):.3f} |")
    lines += ["", "![win rate vs turn](leaderboard.png)", "", "## Mean score at turn h (judge)", "",
              f"| policy | {hs} |", sep]
    for name in ["initial", *agents]:
        lines.append(f"| {name} | " + " | ".join(_cell(r, "score") for r in pooled(name)) + " |")
    if "success" in rows[0]:
        lines += ["", "## Task success by turn h (verifier)", "", f"| policy | {hs} |", sep]
        for name in ["initial", *agents]:
            lines.append(f"| {name} | " + " | ".join(_cell(r, "success") for r in pooled(name)) + " |")
    lines += ["", "## Cost (mean per seed; training only)", "",
              "| agent | iterations (done/asked) | stopped by budget | policy samples | policy tokens | "
              "scored conversations | reward calls | training wall s | eval wall s |", "|---" * 9 + "|"]
    for name in agents:
        r = pooled(name)[0]
        lines.append(f"| {name} | {r['completed']:.1f}/{r['iterations']:.1f} | {r['stopped_by_budget']}/"
                     f"{r['runs']} | {r['policy_samples']:.0f} | {r['policy_tokens']:.0f} | "
                     f"{r['scored_conversations']:.0f} | {r['reward_calls']:.0f} | {r['train_s']:.0f} | "
                     f"{r['eval_s']:.0f} |")
    if meta["calibration"]:
        lines += ["", "Calibration (one iteration, first seed): " + "; ".join(
            f"{k}: {v['policy_samples']} samples, {v['scored_conversations']} scored" for k, v in
            meta["calibration"].items()) + "."]
    lines += ["", "## Per seed", "", "Win rate vs the initial policy at turn h, one training seed at a time.", "",
              f"| agent | seed | stop (iterations done/asked) | {hs} |", "|---|---|---|" + "---|" * horizon]
    for r in runs:
        mine = [x for x in rows if x["policy"] == r.agent and x["seed"] == str(r.seed)]
        lines.append(f"| {r.agent} | {r.seed} | {r.stop} ({r.completed}/{r.iterations}) | "
                     + " | ".join(f"{x['win']:.3f}" for x in mine) + " |")
    if cfg.notes:
        lines += ["", "## Notes", "", cfg.notes.strip()]
    return "\n".join(lines) + "\n"


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="leaderboard")
def main(raw: DictConfig) -> None:
    setup_logging()
    from hydra.core.hydra_config import HydraConfig

    cfg = merge_schema(raw, LeaderboardConfig)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    command = "python -m benchmarks.leaderboard " + " ".join(HydraConfig.get().overrides.task)
    run(cfg, command=command.strip())
    print((results_path(cfg) / "leaderboard.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
