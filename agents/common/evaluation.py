"""In-run evaluation: stored held-out states with fixed user and policy seeds, per-turn reward, win rate vs the
initial policy.

One evaluation protocol for the agents and the leaderboard. The states are
:func:`dialogue_gym.rollout_store.make_states` of the test split (the first ``n`` rows, user and policy seeds
spawned from one seed), the leaderboard's stored states: an agent evaluated with ``eval.seed`` = the leaderboard's
``eval.seed`` plays the first ``eval.dialogues`` of the leaderboard's states, with the same seeds, and scores them
the same (:func:`play_states`, :func:`score_matrix`). A policy's turn-h outcome is the score of its conversation
at turn h (counted from the stored state), carried forward after a dialogue ended (a solved arithmetic problem
stays solved). The win rate at turn h compares, dialogue by dialogue, the policy's turn-h outcome with the initial
policy's: 1 for higher, 0.5 for a tie, 0 for lower. Intervals are percentile bootstrap 95% over dialogues.

Play goes through the agents' branching primitive (:func:`agents.common.branching.grow` with k = 1): :func:`play`
plays task rows or stored states to their end, every turn scored, with the same seeding rules as training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from agents.common.batching import Reply
from agents.common.branching import Branch, Plan, Start, grow
from dialogue_gym.generation.base import GenerationEngine, SamplingParams
from dialogue_gym.rollout_store import DialogueRecord, StateRecord, config_hashes
from dialogue_gym.vector import DialogueVectorEnv


def play(venv: DialogueVectorEnv, engine: GenerationEngine, params: SamplingParams,
         starts: list[Start]) -> list[Branch]:
    """Play each start (a task row or a stored state) to the env's horizon or the user's end: one branch each.

    ``venv`` is a DISABLED vector env with at least ``len(starts)`` sub-envs (the chunk size); give it
    ``reward_mode="per_turn"`` to have every turn scored (``Branch.scores``). The policy's reply at absolute turn
    ``t`` is sampled with ``policy_turn_seed(start.policy_seed, t)``.
    """
    horizon = venv.max_turns
    turns = [s.state.turn + 1 if s.state is not None else 1 for s in starts]
    plan = Plan(list(starts), turns, [horizon] * len(starts), k=1, complete=True)
    return [t.branches[0] for t in grow(venv, venv, engine, params, plan)]


def stored_logprobs(replies: list[Reply]) -> list[list[float]] | None:
    """A rollout-store record's ``logprobs``: one list per reply, or None when the engine gave none for a reply."""
    if any(r.logprobs is None for r in replies):
        return None
    return [list(r.logprobs or []) for r in replies]


def play_states(venv: DialogueVectorEnv, engine: GenerationEngine, params: SamplingParams,
                states: list[StateRecord], policy: str, tags: dict[str, Any] | None = None) -> list[DialogueRecord]:
    """Play every stored state to its end with the policy: one rollout-store record per state, in state order.

    The dialogues come from the branching primitive (:func:`play`: one branch per state, k = 1, completed to the
    horizon), so the evaluation plays exactly as the agents roll out. ``venv`` needs at least ``len(states)``
    sub-envs (the chunk size) and autoreset DISABLED; with ``reward_mode="per_turn"`` every turn is scored (a turn
    the env did not score is stored as None).
    """
    branches = play(venv, engine, params, [Start(policy_seed=s.policy_seed, state=s.state) for s in states])
    hashes = config_hashes(venv)
    return [DialogueRecord(id=f"{policy}/{s.id}", policy=policy, messages=b.final.messages,
                           rewards=[None if np.isnan(x) else float(x) for x in b.scores],
                           token_ids=[list(r.token_ids) for r in b.replies],
                           logprobs=stored_logprobs(b.replies), terminated=b.final.terminated,
                           truncated=b.final.truncated, start=s.id, start_hash=s.state_hash,
                           state_fingerprint=b.final.config_fingerprint, config=hashes,
                           seeds={"policy": s.policy_seed}, tags=dict(tags or {}))
            for s, b in zip(states, branches)]


def score_matrix(records: list[DialogueRecord], horizon: int) -> np.ndarray:
    """(n, horizon) per-turn scores (turns counted from the stored state), NaN after a dialogue ended or where a
    turn was not scored."""
    out = np.full((len(records), horizon), np.nan)
    for i, r in enumerate(records):
        out[i, :len(r.rewards)] = [np.nan if x is None else x for x in r.rewards]
    return out


def states_horizon(states: list[StateRecord], max_turns: int) -> int:
    """The most turns any of the states can still play: ``max_turns`` less the earliest state's turn."""
    return max(max_turns - s.state.turn for s in states)


def records_result(records: list[DialogueRecord], horizon: int) -> dict[str, Any]:
    """What :func:`summarize` reads from one policy's played states.

    Returns:
        ``{"scores": (n, horizon) array (:func:`score_matrix`), "ended_at": (n,) turns played from the state,
        "terminated": (n,) bool, "tokens": policy tokens generated, "conversations": final messages}``.
    """
    return {"scores": score_matrix(records, horizon), "ended_at": np.array([r.turns for r in records], dtype=int),
            "terminated": np.array([r.terminated for r in records], dtype=bool),
            "tokens": sum(len(t) for r in records for t in r.token_ids),
            "conversations": [r.messages for r in records]}


def carry_forward(scores: np.ndarray) -> np.ndarray:
    """(n, H) scores with NaN after a dialogue's end replaced by its last score."""
    out = scores.copy()
    for h in range(1, out.shape[1]):
        gap = np.isnan(out[:, h])
        out[gap, h] = out[gap, h - 1]
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (1-D, NaNs dropped)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def win_outcomes(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """(n, H) per-dialogue outcomes vs the baseline: 1 win, 0.5 tie, 0 loss (on carried-forward scores)."""
    a, b = carry_forward(scores), carry_forward(baseline)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def summarize(result: dict[str, Any], baseline: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Per-turn metrics of one evaluation (see module docstring); JSON-able."""
    scores = np.asarray(result["scores"], dtype=float)
    n, horizon = scores.shape
    out: dict[str, Any] = {"policy": name, "dialogues": n, "turns": list(range(1, horizon + 1)),
                           "tokens": int(result.get("tokens", 0))}
    out["mean_reward"] = [float(np.nanmean(scores[:, h])) if (~np.isnan(scores[:, h])).any() else None
                          for h in range(horizon)]
    cf = carry_forward(scores)
    out["mean_outcome"] = [float(cf[:, h].mean()) for h in range(horizon)]
    out["outcome_ci"] = [list(bootstrap_ci(cf[:, h], seed=h)) for h in range(horizon)]
    if "terminated" in result:
        term = np.asarray(result["terminated"], dtype=bool)
        ended = np.asarray(result["ended_at"])
        # terminal by turn h: the user ended the dialogue or its last allowed turn solved the task (the env's rule)
        out["terminated_by_turn"] = [float((term & (ended <= h + 1)).mean()) for h in range(horizon)]
    if baseline is not None:
        wins = win_outcomes(scores, np.asarray(baseline["scores"], dtype=float))
        out["win_rate"] = [float(wins[:, h].mean()) for h in range(horizon)]
        out["win_rate_ci"] = [list(bootstrap_ci(wins[:, h], seed=100 + h)) for h in range(horizon)]
    out["scores"] = [[None if np.isnan(x) else float(x) for x in row] for row in scores]
    return out


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per evaluated policy, per-turn outcome and win rate with intervals."""
    horizon = len(summaries[0]["turns"])
    head = "| policy | metric | " + " | ".join(f"h={h}" for h in range(1, horizon + 1)) + " |"
    lines = [head, "|" + "---|" * (horizon + 2)]
    for s in summaries:
        cells = [f"{m:.3f} [{lo:.2f}, {hi:.2f}]" for m, (lo, hi) in zip(s["mean_outcome"], s["outcome_ci"])]
        lines.append(f"| {s['policy']} | score at turn h | " + " | ".join(cells) + " |")
        if "win_rate" in s:
            cells = [f"{w:.3f} [{lo:.2f}, {hi:.2f}]" for w, (lo, hi) in zip(s["win_rate"], s["win_rate_ci"])]
            lines.append(f"| {s['policy']} | win rate vs initial | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
