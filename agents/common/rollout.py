"""Rollout primitives every agent composes, all through the env's public vector API.

- :func:`roll_in`: play dialogues with the policy until each reaches its own turn ``h`` and return the
  mid-conversation states ``s_h`` (all turns before ``h`` plus the user message of turn ``h``);
- :func:`fork`: reset a vector env so each state appears ``k`` times (the env forks the user's random stream per
  branch), sample the policy's turn-``h`` replies, and complete each branch to its horizon with the policy and the
  simulated user; the env scores each branch at its horizon (terminal reward);
- :func:`play`: full dialogues from given task rows (evaluation).

The vector envs run in ``DISABLED`` autoreset mode; a sub-env that should not act gets a ``None`` action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agents.common.batching import Reply
from agents.common.pairs import sample_turn
from dialogue_gym.conversation import DialogueState
from dialogue_gym.generation.base import SamplingParams


@dataclass
class Branch:
    """One continuation from a forked state.

    Attributes:
        reply: the policy's first reply on this branch (the turn-h action), token-exact.
        reward: the env's terminal reward at the branch's end (horizon reached or the user ended).
        messages: the whole conversation at the end of the branch.
        turns: assistant turns taken on this branch.
        replies: every policy reply on the branch, in order (PPO trains on all of them).
        rewards: the env reward after each of those replies.
    """

    reply: Reply
    reward: float
    messages: list[dict[str, str]]
    turns: int
    replies: list[Reply] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


def seeds_from(rng: np.random.Generator, n: int) -> list[int]:
    return [int(s) for s in rng.integers(0, 2**63 - 1, size=n)]


def act(engine: Any, observations: Sequence[Sequence[dict[str, str]]], active: Sequence[bool],
        params: SamplingParams, rng: np.random.Generator) -> list[Any]:
    """One batched policy call for the active sub-envs; None (sit out) for the others."""
    idx = [i for i, a in enumerate(active) if a]
    seeds = seeds_from(rng, len(active))
    gens = engine.generate([observations[i] for i in idx], params, seeds=[seeds[i] for i in idx]) if idx else []
    out: list[Any] = [None] * len(active)
    for i, g in zip(idx, gens):
        out[i] = g
    return out


def _text(g: Any) -> str:
    """The env action for a generation (a policy that emits only whitespace still speaks)."""
    return g.text if g.text.strip() else "..."


def roll_in(venv: Any, engine: Any, params: SamplingParams, turns: Sequence[int], rng: np.random.Generator,
            reset_options: dict[str, Any] | None = None, seed: int | None = None) -> list[tuple[DialogueState, int]]:
    """Roll in with the policy until dialogue ``i`` reaches turn ``turns[i]``; return ``(s_h, h)`` per dialogue.

    A dialogue whose user ends it before turn ``turns[i]`` is branched at the last turn it reached, so ``h`` may
    be smaller than asked.

    Args:
        venv: a DialogueVectorEnv in DISABLED autoreset mode with ``len(turns)`` sub-envs.
        turns: the turn ``h >= 1`` at which each dialogue is to be branched.
        reset_options: passed to ``venv.reset`` (e.g. ``{"task_indices": ...}``).
    """
    if len(turns) != venv.num_envs:
        raise ValueError(f"turns has {len(turns)} entries for a vector env of {venv.num_envs}")
    obs, _ = venv.reset(seed=seed, options=reset_options)
    states = venv.get_states()
    reached = list(states)
    while True:
        active = [not states[i].done and states[i].turn < turns[i] - 1 for i in range(venv.num_envs)]
        if not any(active):
            break
        gens = act(engine, obs, active, params, rng)
        obs, *_ = venv.step([_text(g) if g is not None else None for g in gens])
        states = venv.get_states()
        for i in range(venv.num_envs):
            if not states[i].done:
                reached[i] = states[i]
    return [(s, s.turn + 1) for s in reached]


def fork(venv: Any, engine: Any, params: SamplingParams, states: Sequence[DialogueState], k: int,
         horizons: Sequence[int], rng: np.random.Generator) -> list[list[Branch]]:
    """Branch each state ``k`` times and complete every branch to its horizon (its own ``max_turns``).

    Args:
        venv: a DialogueVectorEnv in DISABLED mode with at least ``len(states) * k`` sub-envs and
            ``reward_mode="terminal"``.
        states: the mid-conversation states ``s_h``.
        k: branches per state.
        horizons: the horizon H' (an absolute turn count, ``> s.turn``) of each state's branches.

    Returns:
        ``branches[i][j]``: branch ``j`` of state ``i``.
    """
    n = len(states) * k
    if n > venv.num_envs:
        raise ValueError(f"{len(states)} states x {k} branches need {n} sub-envs; the vector env has {venv.num_envs}")
    starts: list[Any] = [None] * venv.num_envs
    for i, s in enumerate(states):
        s = s.copy()
        s.max_turns = int(horizons[i])
        for j in range(k):
            starts[i * k + j] = s
    mask = np.array([x is not None for x in starts])
    obs, _ = venv.reset(options={"states": starts, "reset_mask": mask})
    replies: list[list[Reply]] = [[] for _ in range(n)]
    rewards: list[list[float]] = [[] for _ in range(n)]
    final = [0.0] * n
    done = [False] * n
    while not all(done):
        active = [i < n and not done[i] for i in range(venv.num_envs)]
        gens = act(engine, obs, active, params, rng)
        obs, r, term, trunc, _ = venv.step([_text(g) if g is not None else None for g in gens])
        for i in range(n):
            if gens[i] is None:
                continue
            replies[i].append(Reply.from_generation(gens[i]))
            rewards[i].append(float(r[i]))
            if term[i] or trunc[i]:
                done[i], final[i] = True, float(r[i])
    end_states = venv.get_states()
    out = []
    for i in range(len(states)):
        row = []
        for j in range(k):
            b = i * k + j
            row.append(Branch(reply=replies[b][0], reward=final[b], messages=end_states[b].messages,
                              turns=len(replies[b]), replies=replies[b], rewards=rewards[b]))
        out.append(row)
    return out


def play(venv: Any, engine: Any, params: SamplingParams, task_indices: Sequence[int], seed: int,
         rng: np.random.Generator) -> dict[str, Any]:
    """Full dialogues from the given task rows with fixed user seeds; per-turn scores for evaluation.

    The vector env should use ``reward_mode="per_turn"`` so every turn is scored.

    Returns:
        ``{"scores": (n, H) array (NaN after the dialogue ended), "ended_at": (n,) turns played,
        "terminated": (n,) bool, "tokens": policy tokens generated, "conversations": final messages}``.
    """
    n, horizon = len(task_indices), venv.core.config.max_turns
    if n != venv.num_envs:
        raise ValueError(f"{n} task indices for a vector env of {venv.num_envs}")
    obs, _ = venv.reset(seed=seed, options={"task_indices": list(task_indices)})
    scores = np.full((n, horizon), np.nan)
    terminated = np.zeros(n, dtype=bool)
    ended_at = np.zeros(n, dtype=int)
    tokens = 0
    done = np.zeros(n, dtype=bool)
    while not done.all():
        gens = act(engine, obs, ~done, params, rng)
        obs, _, term, trunc, info = venv.step([_text(g) if g is not None else None for g in gens])
        for i in np.flatnonzero(info["active"]):
            t = int(info["turn"][i])
            scores[i, t - 1] = float(info["score"][i])
            tokens += len(gens[i].token_ids)
            if term[i] or trunc[i]:
                done[i], terminated[i], ended_at[i] = True, bool(term[i]), t
    return {"scores": scores, "ended_at": ended_at, "terminated": terminated, "tokens": tokens,
            "conversations": [s.messages for s in venv.get_states()]}


def collect_pairs(rollin: Any, branches: Any, engine: Any, params: SamplingParams, rng: np.random.Generator,
                  dialogues: int, turn_sampling: str, n_rows: int, future: bool, prefix: str
                  ) -> tuple[list[Any], dict[str, float]]:
    """Two replies at turn h of each dialogue, each scored by the env: the pairs REFUEL and REBEL regress on.

    1. draw (H', h) per dialogue (``turn_sampling``) and task rows (the rollout cursor), all from ``rng``;
    2. ``prefix="on_policy"``: roll in with the policy to s_h; ``prefix="dataset"``: s_h is the task row as
       stored (its own prefix, REFUEL's "last-turn offline" baseline setting), so h = the row's turn + 1;
    3. fork each s_h twice; ``future=True`` completes both branches to H' with the policy and the user and
       takes the env's terminal score there (REFUEL's Q estimate); ``future=False`` ends each branch right
       after the turn-h reply (REBEL's immediate reward);
    4. drop pairs whose two replies are token-identical.
    """
    from agents.common.train import Pair

    horizon = rollin.core.config.max_turns
    drawn = [sample_turn(rng, horizon, turn_sampling) for _ in range(dialogues)]
    rows = [int(r) for r in rng.integers(0, n_rows, size=dialogues)]
    if prefix not in ("on_policy", "dataset"):
        raise ValueError(f"prefix is {prefix!r}; allowed: on_policy, dataset")
    turns = [h for _, h in drawn] if prefix == "on_policy" else [1] * dialogues
    states = roll_in(rollin, engine, params, turns, rng, {"task_indices": rows}, seed=int(rng.integers(2**31)))
    horizons = [max(hp, h) if future else h for (hp, _), (_, h) in zip(drawn, states)]
    tree = fork(branches, engine, params, [s for s, _ in states], 2, horizons, rng)
    pairs, identical = [], 0
    for (_, h), (a, b) in zip(states, tree):
        if a.reply.token_ids == b.reply.token_ids:
            identical += 1
            continue
        pairs.append(Pair(a.reply, b.reply, a.reward, b.reward, h))
    returns = np.array([[p.reward_a, p.reward_b] for p in pairs]) if pairs else np.zeros((0, 2))
    stats = {"env/pairs": float(len(pairs)), "env/identical_pairs_dropped": float(identical),
             "env/mean_return": float(returns.mean()) if len(returns) else 0.0,
             "env/mean_turn_h": float(np.mean([h for _, h in states])),
             "env/mean_reply_tokens": float(np.mean([len(p.a.token_ids) for p in pairs])) if pairs else 0.0,
             "env/cut_replies": float(np.mean([not p.a.finished for p in pairs])) if pairs else 0.0}
    return pairs, stats
