"""Preference pairs for reward-model training: sampled from a task and labelled by the env's reward, or read.

``source=task`` (the default): for each task row, sample ``n`` replies from the generator model (one batched HF
generate call, seeded per reply), score every distinct reply with the env's reward (for the arithmetic task: its
verifier, 1 for a correct final answer and 0 otherwise; for the embedded task: the LLM judge), and pair replies
whose scores differ by at least ``min_gap`` (higher score = chosen), at most ``pairs_per_row`` pairs per row, drawn
at random. A row whose samples all lose can pair its reference reply (``profile["reference"]``, or
``"The answer is <answer>."`` for a profile with an ``"answer"``, kept only if the reward prefers it) against them
(``reference_chosen``); such pairs are marked ``kind="reference"`` and evaluation reports them apart.

``source=file`` / ``source=hub``: (context, chosen, rejected) records in the JSON-lines layout of the DPO agent
(``agents.dpo.data``, whose reader is used as is), held out by ``eval_path`` or the last ``test_fraction``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dialogue_gym.conversation import Message

SAMPLED = "sampled"
REFERENCE = "reference"


@dataclass
class PreferencePair:
    """One preference: a context ending with a user turn, two replies to it (``chosen`` preferred).

    ``kind`` says where the chosen reply came from: ``"sampled"`` (both replies sampled), ``"reference"`` (the
    task's reference reply) or ``"data"`` (a file or hub record).
    """

    context: list[Message]
    chosen: str
    rejected: str
    kind: str = SAMPLED
    row: str = ""


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


def sample_task_pairs(rows: Sequence[Any], engine: Any, reward: Any, params: Any, n: int, k: int, min_gap: float,
                      reference_chosen: bool, seed: int, batch_size: int = 64,
                      progress: bool = True) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Sample ``n`` replies per row, score them with ``reward``, and pair winners against losers.

    Args:
        rows: task rows (``messages`` ending with a user turn, ``profile``).
        engine: a generation engine (``generate(prompts, params, seeds)``).
        reward: a RewardModel scoring whole conversations (``score(conversations, profiles)``).
        params: sampling parameters.
        n: replies per row.
        k: at most this many pairs per row.
        min_gap: smallest score difference that makes a preference.
        reference_chosen: pair the row's reference reply against its samples when none of them wins.
        seed: seeds every reply's sampling stream and the pair draw.
        batch_size: rows' prompts per generate call (the engine batches within it).
        progress: show a tqdm bar.

    Returns:
        The pairs and statistics (rows, replies, mean reward, rows with a pair, pairs by kind, tokens, ...).
    """
    from dialogue_gym.progress import Progress

    rng = np.random.default_rng(seed)
    prompts = [list(r.messages) for r in rows for _ in range(n)]
    seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=len(prompts))]
    gens: list[Any] = []
    bar = Progress(total=len(prompts), desc="sampling replies", unit="reply", mode=None if progress else "off")
    for start in range(0, len(prompts), batch_size):
        gens += engine.generate(prompts[start:start + batch_size], params, seeds=seeds[start:start + batch_size])
        bar.update(len(prompts[start:start + batch_size]))
    bar.close()
    texts = [g.text.strip() for g in gens]
    conversations = [p + [{"role": "assistant", "content": t if t else "..."}] for p, t in zip(prompts, texts)]
    profiles = [dict(r.profile) for r in rows for _ in range(n)]
    scores = np.asarray(reward.score(conversations, profiles), dtype=np.float64)
    pairs: list[PreferencePair] = []
    kinds: Counter[str] = Counter()
    rows_with_pair = 0
    for i, row in enumerate(rows):
        replies, s = texts[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]
        keep = [j for j, t in enumerate(replies) if t]
        replies, s = [replies[j] for j in keep], [float(s[j]) for j in keep]
        chosen = pair_replies(replies, s, min_gap, k, rng)
        made = [PreferencePair(list(row.messages), replies[a], replies[b], SAMPLED, row.id) for a, b in chosen]
        if not made and reference_chosen and replies:
            ref = reference_reply(dict(row.profile))
            if ref is not None:
                ref_score = float(reward.score([list(row.messages) + [{"role": "assistant", "content": ref}]],
                                               [dict(row.profile)])[0])
                distinct = {r.strip(): j for j, r in reversed(list(enumerate(replies)))}  # first index of each
                losers = [j for j in sorted(distinct.values()) if ref_score - s[j] >= min_gap]
                made = [PreferencePair(list(row.messages), ref, replies[j], REFERENCE, row.id)
                        for j in rng.permutation(losers)[:k]] if losers else []
        rows_with_pair += bool(made)
        kinds.update(p.kind for p in made)
        pairs += made
    stats = {"rows": len(rows), "replies": len(texts), "reward_mean": float(scores.mean()) if len(scores) else 0.0,
             "rows_with_pair": rows_with_pair, "pairs": len(pairs), "pairs_by_kind": dict(kinds),
             "tokens_sampled": int(sum(len(g.token_ids) for g in gens)),
             "replies_unfinished": int(sum(not g.finished for g in gens))}
    return pairs, stats


def read_pairs(source: str, path: str | None, hub_id: str | None, split: str = "train",
               max_pairs: int = 0) -> tuple[list[PreferencePair], dict[str, int]]:
    """Pairs from a JSON-lines file or a hub data set (the DPO agent's reader and layouts; bad records are errors)."""
    from agents.dpo.data import load_preferences

    prefs, dropped = load_preferences(source, path, hub_id, split, max_pairs, keep=("kind", "row"))
    # files written by write_pairs keep their kind and row
    return [PreferencePair(list(p.context), p.chosen, p.rejected, str(p.meta.get("kind", "data")),
                           str(p.meta.get("row", ""))) for p in prefs], dropped


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> None:
    """Save pairs as JSON lines (``context``, ``chosen``, ``rejected``, ``kind``, ``row``): readable by source=file."""
    with Path(path).open("w") as f:
        for p in pairs:
            f.write(json.dumps(asdict(p)) + "\n")
