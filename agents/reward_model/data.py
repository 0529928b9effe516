"""Preference pairs for reward-model training: played in the env and labelled by its reward, or read.

``source=task`` (the default): each task row is one dialogue of the agents' branching primitive
(:func:`agents.common.branching.grow`): the row is reset with its own env seed, the generator model answers its
last user turn ``n`` times (k = n branches of turn h = the row's own turn + 1, each with its seeded policy
stream, blank replies sent as ``"..."``), and the env scores each branch right after that reply (``terminal``
reward mode, every branch ending at turn h: for the arithmetic task its verifier, 1 for a correct final answer and
0 otherwise; for the embedded task the LLM judge). The env counts every reply and reward call (its ``usage``).
Replies whose scores differ by at least ``min_gap`` are paired (higher score = chosen), at most ``pairs_per_row``
pairs per row, drawn at random. A row whose samples all lose can pair its reference reply
(``profile["reference"]``, or ``"The answer is <answer>."`` for a profile with an ``"answer"``), scored by the env
from the same state and kept only if the reward prefers it, against them (``reference_chosen``); such pairs are
marked ``kind="reference"`` and evaluation reports them apart. Every branch played can be kept in a rollout store
(the trainer writes ``<run_dir>/pairs_rollouts.jsonl``).

``source=file`` / ``source=hub``: (context, chosen, rejected) records in the JSON-lines layout of the DPO agent
(``agents.dpo.data``, whose reader is used as is), held out by ``eval_path`` or the last ``test_fraction``.

Every pair is the one preference type, :class:`agents.common.preferences.Preference` (``PreferencePair`` is its
old name here).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.common.branching import Plan, Start, Tree, grow
from agents.common.evaluation import stored_logprobs
from agents.common.preferences import REFERENCE, SAMPLED, Preference
from dialogue_gym.conversation import DialogueState
from dialogue_gym.generation.base import GenerationEngine, SamplingParams
from dialogue_gym.rollout_store import DialogueRecord, RolloutStore, config_hashes
from dialogue_gym.vector import DialogueVectorEnv

PreferencePair = Preference  # the name this module used before the preference types were one


def reference_reply(profile: dict[str, Any]) -> str | None:
    """A task row's reference reply: ``profile["reference"]``, or a stated answer for verifiable tasks, or None."""
    ref = profile.get("reference")
    if isinstance(ref, str) and ref.strip():
        return ref
    answer = profile.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        return None
    value = float(answer)
    text = str(int(value)) if value.is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")
    return f"The answer is {text}."


def pair_replies(replies: Sequence[str], scores: Sequence[float], min_gap: float, k: int,
                 rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``k`` (chosen, rejected) index pairs of distinct replies whose scores differ by at least ``min_gap``.

    Duplicated texts count once (their first index). Pairs are drawn uniformly without replacement among all
    qualifying pairs, then returned in the drawn order.
    """
    first: dict[str, int] = {}
    for i, r in enumerate(replies):
        first.setdefault(r.strip(), i)
    idx = sorted(first.values())
    candidates = [(i, j) for i in idx for j in idx if scores[i] - scores[j] >= min_gap]
    if not candidates:
        return []
    pick = rng.permutation(len(candidates))[:k]
    return [candidates[p] for p in pick]


def row_plan(rng: np.random.Generator, rows: Sequence[int], n: int) -> Plan:
    """The plan of the pair data: one dialogue per task row (in the given order) branched ``n`` times at the row's
    own prefix and ended right after that reply. Draws from ``rng``, for all rows at once: one env seed per row,
    then one policy seed per row."""
    env_seeds = [int(s) for s in rng.integers(0, 2**31, size=len(rows))]
    policy_seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=len(rows))]
    starts = [Start(policy_seed=p, row=int(r), env_seed=e) for r, e, p in zip(rows, env_seeds, policy_seeds)]
    return Plan(starts, turns=[1] * len(rows), horizons=[1] * len(rows), k=n, complete=False)


def score_replies(venv: DialogueVectorEnv, states: Sequence[DialogueState], texts: Sequence[str]) -> list[float]:
    """The env's score of reply ``texts[i]`` sent at ``states[i]`` (each ending with a user turn), as a branch of
    the data is scored: the step ends the episode (``max_turns`` = the state's turn + 1) and a ``terminal`` env
    scores it. ``venv`` is a DISABLED vector env; states are sent ``venv.num_envs`` at a time."""
    out: list[float] = []
    for lo in range(0, len(states), venv.num_envs):
        chunk = []
        for s in states[lo:lo + venv.num_envs]:
            s = s.copy()
            s.max_turns = s.turn + 1
            chunk.append(s)
        spare = venv.num_envs - len(chunk)
        venv.reset(options={"states": chunk + [chunk[-1]] * spare})
        _, reward, _, _, _ = venv.step(list(texts[lo:lo + len(chunk)]) + [None] * spare)
        out += [float(r) for r in reward[:len(chunk)]]
    return out


def branch_records(trees: Sequence[Tree], plan: Plan, venv: DialogueVectorEnv, policy: str,
                   tags: dict[str, Any]) -> list[DialogueRecord]:
    """One rollout-store record per branch of the pair data (the reply and its score; seeds and row in ``seeds``
    and ``tags``)."""
    hashes = config_hashes(venv)
    out = []
    for tree, start in zip(trees, plan.starts):
        for j, b in enumerate(tree.branches):
            out.append(DialogueRecord(
                id=f"{policy}/{tags.get('split', '')}/{tree.state.task_row}/{j}", policy=policy, messages=b.messages,
                rewards=[float(b.reward)], token_ids=[list(r.token_ids) for r in b.replies],
                logprobs=stored_logprobs(b.replies),
                terminated=b.final.terminated if b.final else False, truncated=b.final.truncated if b.final else True,
                state_fingerprint=tree.state.config_fingerprint, config=hashes,
                seeds={"env": int(start.env_seed or 0), "policy": start.policy_seed, "branch": j},
                tags={**tags, "row": tree.state.task_row, "turn": tree.turn}))
    return out


def sample_task_pairs(rollin: DialogueVectorEnv, branches: DialogueVectorEnv, engine: GenerationEngine,
                      params: SamplingParams, rows: Sequence[int], n: int, k: int, min_gap: float,
                      reference_chosen: bool, seed: int, store: RolloutStore | None = None,
                      tags: dict[str, Any] | None = None) -> tuple[list[Preference], dict[str, Any]]:
    """Answer each task row ``n`` times in the env, let the env score every reply, and pair winners against losers.

    Args:
        rollin: a DISABLED vector env on the split the rows come from; its ``num_envs`` rows are played at a time.
        branches: a DISABLED vector env of at least ``n * rollin.num_envs`` sub-envs on the same split, in
            ``terminal`` reward mode (every reply is scored as it ends its branch). It scores the reference
            replies too.
        engine: the generator's engine.
        params: sampling parameters.
        rows: task row indices of the split, one dialogue each, in this order.
        n: replies per row (the branches of each dialogue).
        k: at most this many pairs per row.
        min_gap: smallest score difference that makes a preference.
        reference_chosen: pair the row's reference reply against its samples when none of them wins.
        seed: seeds ``default_rng(seed)``: the plan's draws (:func:`row_plan`), then the pair draws.
        store: a rollout store that receives every branch played (policy ``"generator"``, :func:`branch_records`).
        tags: labels of those records (e.g. the split).

    Returns:
        The pairs and statistics (rows, replies, mean reward, rows with a pair, pairs by kind, tokens, the envs'
        usage: replies stepped, conversations scored, reward calls).
    """
    before = [rollin.usage, branches.usage]
    rng = np.random.default_rng(seed)
    plan = row_plan(rng, rows, n)  # the plan's draws first, then the pair draws
    trees = grow(rollin, branches, engine, params, plan)
    if store is not None:
        store.append(branch_records(trees, plan, branches, "generator", dict(tags or {})))
    pairs: list[Preference] = []
    kinds: Counter[str] = Counter()
    rewards: list[float] = []
    without: list[tuple[int, list[str], list[float]]] = []  # rows with no sampled pair (reference candidates)
    by_row: list[list[Preference]] = []
    for i, tree in enumerate(trees):
        # the reply the env received and scored (the shared blank-reply rule: a blank reply is "...")
        replies = [b.messages[len(tree.state.messages)]["content"] for b in tree.branches]
        scores = [b.reward for b in tree.branches]
        rewards += scores
        context = list(tree.state.messages)
        made = [Preference(context, replies[a], replies[b], SAMPLED, tree.state.task_row)
                for a, b in pair_replies(replies, scores, min_gap, k, rng)]
        if not made and reference_chosen and reference_reply(dict(tree.state.profile)) is not None:
            without.append((i, replies, scores))
        by_row.append(made)
    if without:
        refs = [reference_reply(dict(trees[i].state.profile)) or "" for i, _, _ in without]
        ref_scores = score_replies(branches, [trees[i].state for i, _, _ in without], refs)
        for (i, replies, scores), ref, ref_score in zip(without, refs, ref_scores):
            distinct = {r.strip(): j for j, r in reversed(list(enumerate(replies)))}  # first index of each
            losers = [j for j in sorted(distinct.values()) if ref_score - scores[j] >= min_gap]
            by_row[i] = [Preference(list(trees[i].state.messages), ref, replies[j], REFERENCE,
                                    trees[i].state.task_row) for j in rng.permutation(losers)[:k]]
    for made in by_row:
        kinds.update(p.kind for p in made)
        pairs += made
    sampled = [r for t in trees for b in t.branches for r in b.replies]
    spent = [after.as_dict() for after in (rollin.usage, branches.usage)]
    usage = {key: spent[0][key] + spent[1][key] - before[0].as_dict()[key] - before[1].as_dict()[key]
             for key in spent[0]}
    stats = {"rows": len(rows), "replies": len(rewards), "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
             "rows_with_pair": sum(bool(m) for m in by_row), "pairs": len(pairs), "pairs_by_kind": dict(kinds),
             "tokens_sampled": int(sum(len(r.token_ids) for r in sampled)),
             "replies_unfinished": int(sum(not r.finished for r in sampled)), "usage": usage}
    return pairs, stats


def read_pairs(source: str, path: str | None, hub_id: str | None, split: str = "train",
               max_pairs: int = 0) -> tuple[list[Preference], dict[str, int]]:
    """Pairs from a JSON-lines file or a hub data set (the DPO agent's reader and layouts; bad records are errors).
    Files written by :func:`write_pairs` keep their kind and row; other records are ``kind="data"``."""
    from agents.dpo.data import load_preferences

    return load_preferences(source, path, hub_id, split, max_pairs)


def write_pairs(path: str | Path, pairs: Sequence[Preference]) -> None:
    """Save pairs as JSON lines (``context``, ``chosen``, ``rejected``, ``kind``, ``row``): readable by source=file."""
    with Path(path).open("w") as f:
        for p in pairs:
            f.write(json.dumps(p.to_json()) + "\n")
