"""The evaluation protocol: stored states, every policy playing them with the same seeds, the per-turn matrices.

Every policy plays the same stored states (a :class:`~dialogue_gym.rollout_store.RolloutStore` of
:class:`~dialogue_gym.rollout_store.StateRecord`) with the same user seed streams and the same per-turn policy seeds
(:func:`turn_seed`), in an eval env that scores every turn with the judge. The dialogues are stored, and the
summary is computed from the store: per-turn scores (carried forward after a dialogue ended) and, where the task
has a verifier, success by turn h. Playing and scoring the states (:func:`play_states`, :func:`score_matrix`) is
the agents' in-run evaluation (:mod:`agents.common.evaluation`), so an agent's ``eval.json`` and the leaderboard
report the same per-state scores for the same policy on the same states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from agents.common.branching import policy_turn_seed
from agents.common.config import env_kwargs
from agents.common.evaluation import play_states, score_matrix, states_horizon
from benchmarks.leaderboard.config import LeaderboardConfig
from benchmarks.leaderboard.stats import metric_rows, paired_rows, policy_matrices
from dialogue_gym.budget import Usage
from dialogue_gym.generation import SamplingParams
from dialogue_gym.generation.hf import HFEngine
from dialogue_gym.models import load_model
from dialogue_gym.rollout_store import DialogueRecord, RolloutStore, StateRecord


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
    lr: float | None = None  # the learning rate the sweep chose (None: the agent's own)
    probe: list[float | None] | None = None  # (states,) turn-1 probe on the test states (.probe; None: a state the
    # probe leaves out), if the task has one
    records: list[DialogueRecord] = field(default_factory=list, repr=False)

    @property
    def policy(self) -> str:
        """The name its evaluation dialogues carry in the rollout store."""
        return f"{self.agent}/seed-{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "seed": self.seed, "iterations": self.iterations, "completed": self.completed,
                "stop": self.stop, "usage": self.usage.as_dict(), "train_s": self.train_s, "eval_s": self.eval_s,
                "lr": self.lr, "probe": self.probe}

    @classmethod
    def from_json(cls, data: dict[str, Any], records: list[DialogueRecord]) -> AgentRun:
        return cls(**{**data, "usage": Usage(**data["usage"])}, records=records)


def eval_env(cfg: LeaderboardConfig, n: int, split: str = "test") -> Any:
    """An evaluation vector env of ``n`` sub-envs on ``split`` (``test``; ``validation`` for the sweep), every turn
    scored by the judge."""
    over: dict[str, Any] = {"split": split, "reward_mode": "per_turn"}
    if cfg.eval.reward is not None:
        over["reward"] = cfg.eval.reward
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", **env_kwargs(cfg.env, **over))


def turn_seed(policy_seed: int, turn: int) -> int:
    """The policy's sampling seed at ``turn`` of a dialogue from a stored state (independent of batching): the
    branching primitive's seed of branch 0, :func:`agents.common.branching.policy_turn_seed`."""
    return policy_turn_seed(policy_seed, turn)


def evaluate(cfg: LeaderboardConfig, venv: Any, model_name: str, states: list[StateRecord], store: RolloutStore,
             policy: str, tags: dict[str, Any]) -> tuple[list[DialogueRecord], float]:
    """Play the stored states with the policy ``model_name`` (a name ``load_model`` knows, or an exported policy's
    directory) on ``cfg.policy_engine`` (HF, or a private vLLM engine closed afterwards); append the dialogues to
    ``store``."""
    t0 = time.time()
    params = SamplingParams(temperature=cfg.eval.temperature, max_new_tokens=cfg.max_new_tokens)
    if cfg.policy_engine == "vllm":
        from dialogue_gym.generation.vllm import VLLMEngine

        engine: Any = VLLMEngine(model_name, seed=cfg.eval.seed, shared=False,
                                 gpu_memory_utilization=cfg.policy_engine_memory)
        try:
            records = play_states(venv, engine, params, states, policy, tags)
        finally:
            engine.close()
    else:
        engine = HFEngine(load_model(model_name, shared=False), seed=cfg.eval.seed)
        records = play_states(venv, engine, params, states, policy, tags)
    store.append(records)
    return records, time.time() - t0


def played(store: RolloutStore, states: list[StateRecord]) -> dict[str, list[DialogueRecord]]:
    """The store's dialogues per policy, in state order, for policies that played every state (last one wins)."""
    latest: dict[str, dict[str, DialogueRecord]] = {}
    for r in store.dialogues():
        latest.setdefault(r.policy, {})[r.start] = r
    return {p: [by_start[s.id] for s in states] for p, by_start in latest.items()
            if all(s.id in by_start for s in states)}


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


def behaviour_matrix(records: list[DialogueRecord], states: list[StateRecord], asks: Any, horizon: int
                     ) -> np.ndarray:
    """(n, horizon) 1.0 where the reply at turn h (from the stored state) shows the task's behaviour of interest
    (``task.asks(reply)``: clarify's "asks or holds back its answer"), 0.0 otherwise and after the dialogue ended."""
    out = np.zeros((len(records), horizon))
    for i, (r, s) in enumerate(zip(records, states)):
        replies = [m["content"] for m in r.messages[len(s.state.messages):] if m["role"] == "assistant"]
        for k, reply in enumerate(replies[:horizon]):
            out[i, k] = float(asks(reply))
    return out


@dataclass
class Matrices:
    """Every policy's per-state results, from which the report's rows and paired differences are computed (and
    which ``<report_name>_states.csv`` stores, so a report can be recomputed or extended without the run
    directory)."""

    groups: dict[str, dict[str, np.ndarray]]  # policy -> metric -> (seeds, states, turns); "initial" has one row;
    # "probe" is (seeds, covered states, 1): the change from the initial policy on the states the probe covers
    seeds: dict[str, list[int]]  # agent -> its training seeds, in the order of its rows
    states: list[str]  # the stored states' ids, in order
    covered: list[bool]  # (states,) the states the probe covers (all False without a probe)
    probe_replies: str | None = None  # the probe's replies_digest (None: no probe, or a states file from before it)


def summarize(cfg: LeaderboardConfig, runs: list[AgentRun], baseline: list[DialogueRecord],
              states: list[StateRecord], verifier: Any | None, asks: Any | None = None,
              base_probe: list[float | None] | None = None, probe_replies: str | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Matrices]:
    """The report's numbers: ``(rows, paired, matrices)``.

    ``rows``: one per (policy, seed "all" or one seed, turn h): win rate vs the initial policy, score and (with a
    verifier) success by turn h, each with its 95% interval (crossed bootstrap of seeds and states; see
    :mod:`benchmarks.leaderboard.stats`), and the mean cost per seed. The initial policy's win rate is 0.5 by
    definition. With ``asks`` (the task's behaviour test, e.g. clarify's), also the share of turn-h replies that show
    it. ``paired``: differences agent - initial and agent - agent on the same states, with intervals, seed-level
    tests and power; with ``base_probe`` (the initial policy's turn-1 probe: 0 at every state it covers, None
    elsewhere) and every run's ``probe``, also the probe's change from the initial policy (metric ``probe``, turn 1)
    on the states it covers. ``matrices``: the per-state results all of them are computed from, with
    ``probe_replies`` (the probe's :func:`~benchmarks.leaderboard.probe.replies_digest`).
    """
    horizon = states_horizon(states, cfg.env.max_turns)
    base = score_matrix(baseline, horizon)
    success = (lambda records: success_matrix(records, states, verifier, horizon)) if verifier else None
    behaviour = (lambda records: behaviour_matrix(records, states, asks, horizon)) if asks else None
    groups = {"initial": policy_matrices([baseline], base, horizon, score_matrix, success, behaviour)}
    seeds: dict[str, list[int]] = {}
    rows = metric_rows("initial", [], groups["initial"], cfg.eval.n_boot)  # the initial policy: "all" only
    initial = np.array(base_probe if base_probe is not None else [np.nan] * len(states), dtype=float)  # None -> nan
    covered = np.isfinite(initial)  # the states the probe covers
    for name in cfg.agents:
        mine = [r for r in runs if r.agent == name]
        if not mine:
            continue
        groups[name] = policy_matrices([r.records for r in mine], base, horizon, score_matrix, success, behaviour)
        if covered.any() and all(r.probe is not None for r in mine):
            change = np.array([r.probe for r in mine], dtype=float)[:, covered] - initial[None, covered]
            groups[name]["probe"] = change[:, :, None]  # (S, N', 1): the change from the initial policy
            groups["initial"]["probe"] = np.zeros((1, int(covered.sum()), 1))
        seeds[name] = [r.seed for r in mine]
        cost = {"all": _mean_cost(mine), **{str(r.seed): _mean_cost([r]) for r in mine}}
        rows += [{**row, **cost[row["seed"]]} for row in
                 metric_rows(name, [str(r.seed) for r in mine], groups[name], cfg.eval.n_boot)]
    mats = Matrices(groups, seeds, [s.id for s in states], [bool(c) for c in covered], probe_replies)
    return rows, paired_rows(groups, seeds, cfg.eval.n_boot), mats


def _mean_cost(group: list[AgentRun]) -> dict[str, Any]:
    mean = lambda f: float(np.mean([f(r) for r in group]))  # noqa: E731
    return {"iterations": mean(lambda r: r.iterations), "completed": mean(lambda r: r.completed),
            "runs": len(group), "stopped_by_budget": sum(r.stop == "budget" for r in group),
            "policy_samples": mean(lambda r: r.usage.policy_samples),
            "policy_tokens": mean(lambda r: r.usage.policy_tokens),
            "scored_conversations": mean(lambda r: r.usage.scored_conversations),
            "reward_calls": mean(lambda r: r.usage.reward_calls),
            "optimizer_steps": mean(lambda r: r.usage.optimizer_steps), "train_s": mean(lambda r: r.train_s),
            "eval_s": mean(lambda r: r.eval_s), "lr": group[0].lr}
