"""Anthropic HH: multi-turn helpfulness/harmlessness dialogues whose own user turns can be replayed.

Two layouts of the same data are read:

- ``Anthropic/hh-rlhf``: columns ``chosen`` and ``rejected``, each a whole dialogue as text,
  ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``;
- ``trl-internal-testing/hh-rlhf-trl-style``: columns ``chosen`` and ``rejected`` as message lists
  (``[{"role": "user" | "assistant", "content": str}, ...]``) and ``prompt`` (the first user message).

The two dialogues of a row share every turn but the last assistant reply; this task reads ``chosen``. Rows whose
dialogue has more than ``max_turns`` user turns are dropped (REFUEL's setting two keeps those with at most 5).
Every kept dialogue gives its opening (the first user turn) as a starting state, and with
``prefixes="all"`` also every later prefix that ends with a user turn. The profile holds the dataset's later user
turns (``"user_turns"``) and the number of assistant turns already in the prefix (``"opening_assistant_turns"``),
so ``user="replay"`` (the default) serves the dataset's own user turns and ends when they run out; ``user="llm"``
simulates the user instead. The split is by a hash of the first user turn, so all prefixes of a dialogue land in
the same split.

No data ships with the package: point ``path`` at a local copy, or set ``hub_id`` to load from the hub.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from dialogue_gym.conversation import DialogueError, Message, validate_messages
from dialogue_gym.tasks.base import SPLITS, TaskRow
from dialogue_gym.tasks.datafiles import (
    InvalidRows,
    check_fraction,
    check_optional_positive,
    check_strict,
    in_test_split,
    load_records,
    stable_hash,
)

DATASET = "trl-internal-testing/hh-rlhf-trl-style"
TEXT_DATASET = "Anthropic/hh-rlhf"
PREFIXES = ("first", "all")
_SPEAKER = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_text(text: str) -> list[Message]:
    """Messages of an ``Anthropic/hh-rlhf`` dialogue string (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).

    Contents are stripped; a message may span several paragraphs (only ``"\\n\\nHuman:"`` and
    ``"\\n\\nAssistant:"`` start a new one).

    Raises:
        DialogueError: the text does not start with a Human/Assistant marker.
    """
    body = text if text.startswith("\n\n") else "\n\n" + text
    parts = _SPEAKER.split(body)
    if parts[0].strip() or len(parts) < 3:
        raise DialogueError(f"an hh-rlhf dialogue must start with '\\n\\nHuman:'; got {text[:60]!r}")
    return [{"role": _ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def dialogue_of(record: dict[str, Any], index: int) -> list[Message]:
    """The ``chosen`` dialogue of a row in either layout, as raw messages (not yet cleaned).

    Raises:
        DialogueError: no ``chosen`` column, or a value that is neither a string nor a message list.
    """
    if "chosen" not in record:
        raise DialogueError(
            f"row {index} has no column 'chosen' (columns: {sorted(record)}); expected the Anthropic/hh-rlhf "
            "layout (chosen/rejected strings) or the hh-rlhf-trl-style layout (chosen/rejected message lists, prompt)"
        )
    chosen = record["chosen"]
    if isinstance(chosen, str):
        try:
            return parse_hh_text(chosen)
        except DialogueError as e:
            raise DialogueError(f"row {index}: {e}") from None
    if isinstance(chosen, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in chosen):
        return [{"role": str(m["role"]), "content": str(m["content"] or "").strip()} for m in chosen]
    raise DialogueError(f"row {index}: 'chosen' must be a dialogue string or a list of {{'role', 'content'}} "
                        f"messages, got {type(chosen).__name__}")


def clean_dialogue(messages: list[Message], max_turn_chars: int | None) -> list[Message]:
    """The longest clean head of a dialogue: user/assistant alternating from a user turn, no empty message,
    no message over ``max_turn_chars``. May be empty."""
    out: list[Message] = []
    for m in messages:
        expected = "user" if len(out) % 2 == 0 else "assistant"
        too_long = max_turn_chars is not None and len(m["content"]) > max_turn_chars
        if m["role"] != expected or not m["content"] or too_long:
            break
        out.append(m)
    return out


class AnthropicHHTask:
    """Anthropic HH dialogues: openings (and optionally later prefixes) with the dataset's later user turns.

    Args:
        path: a local copy: a file (``.parquet`` / ``.jsonl`` / ``.json`` / ``.jsonl.gz`` / ``.arrow``), a
            ``save_to_disk`` folder, or a hub snapshot folder.
        hub_id: load from the hub with this id (``trl-internal-testing/hh-rlhf-trl-style`` or
            ``Anthropic/hh-rlhf``) when ``path`` is None. Only used when set: the default never touches the network.
        source_split: the split of the source to read (``train`` or ``test``); this task then splits it again
            into its own train/test by hash.
        test_fraction: share of dialogues (by hash of their first user turn) in the test split.
        max_turns: drop dialogues with more user turns than this (5 in REFUEL's setting two); None keeps all.
        max_turn_chars: a dialogue is cut before its first message longer than this; dialogues whose first user
            turn is longer are dropped. None: no cap.
        prefixes: ``"first"`` (the opening only) or ``"all"`` (every prefix ending with a user turn).
        limit: at most this many rows per split (the first ones in data order); None: all.
        system_prompt: an optional system message opening every conversation.
        strict: stop at the first row off the schema; by default such rows are skipped with one warning that
            counts them and shows the first.

    Raises:
        DialogueError: no data (says how to get it), unreadable data, no valid row (or with ``strict`` any row
            off the schema), bad settings.
    """

    name = "anthropic_hh"
    default_user = "replay"
    default_reward = "judge"

    def __init__(self, path: str | os.PathLike | None = None, hub_id: str | None = None,
                 source_split: str = "train", test_fraction: float = 0.05, max_turns: int | None = 5,
                 max_turn_chars: int | None = 2000, prefixes: str = "first", limit: int | None = None,
                 system_prompt: str | None = None, strict: bool = False):
        self.strict = check_strict(strict)
        self.test_fraction = check_fraction(test_fraction, "test_fraction")
        self.max_turns = check_optional_positive(max_turns, "max_turns")
        self.max_turn_chars = check_optional_positive(max_turn_chars, "max_turn_chars")
        self.limit = check_optional_positive(limit, "limit")
        if prefixes not in PREFIXES:
            raise DialogueError(f"task_kwargs.prefixes is {prefixes!r}; allowed: {', '.join(PREFIXES)}")
        self.prefixes = prefixes
        self.path = None if path is None else os.fspath(path)
        self.hub_id, self.source_split, self.system_prompt = hub_id, source_split, system_prompt
        records = load_records(path, hub_id, dataset=DATASET, env_name=self.name,
                               example_path="/data/hh-rlhf-trl-style", source_split=source_split,
                               columns=("chosen",))
        self._rows, self.skipped = self._build(records)

    def _build(self, records: list[dict[str, Any]]) -> tuple[dict[str, list[TaskRow]], dict[str, int]]:
        rows: dict[str, list[TaskRow]] = {s: [] for s in SPLITS}
        skipped = {"duplicate": 0, "max_turns": 0, "malformed": 0, "limit": 0, "invalid": 0}
        seen: set[str] = set()
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        invalid = InvalidRows(self.name, self.strict)
        for index, rec in enumerate(records):
            try:
                raw = dialogue_of(rec, index)
            except DialogueError as e:
                invalid.add(e)
                continue
            if self.max_turns is not None and sum(1 for m in raw if m["role"] == "user") > self.max_turns:
                skipped["max_turns"] += 1
                continue
            dialogue = clean_dialogue(raw, self.max_turn_chars)
            if not dialogue:
                skipped["malformed"] += 1
                continue
            split = "test" if in_test_split(dialogue[0]["content"], self.test_fraction) else "train"
            user_idx = [i for i, m in enumerate(dialogue) if m["role"] == "user"]
            starts = user_idx if self.prefixes == "all" else user_idx[:1]
            for k, end in enumerate(starts):
                messages = system + dialogue[: end + 1]
                key = json.dumps(messages)
                if key in seen:
                    skipped["duplicate"] += 1
                    continue
                seen.add(key)
                if self.limit is not None and len(rows[split]) >= self.limit:
                    skipped["limit"] += 1
                    continue
                validate_messages(messages)
                profile: dict[str, Any] = {
                    "user_turns": [dialogue[i]["content"] for i in user_idx[k + 1:]],
                    "opening_assistant_turns": k,
                }
                if end + 1 < len(dialogue):
                    profile["reference"] = dialogue[end + 1]["content"]  # the dataset's chosen reply here
                rows[split].append(TaskRow(id=f"hh-{stable_hash(key):016x}", messages=messages, profile=profile))
        skipped["invalid"] = invalid.count
        invalid.finish(len(records))
        return rows, skipped

    def rows(self, split: str = "train") -> list[TaskRow]:
        if split not in SPLITS:
            raise DialogueError(f"split is {split!r}; allowed: {', '.join(SPLITS)}")
        return self._rows[split]

    def make_user(self, spec: str, engine: Any) -> None:
        return None

    def make_reward(self, spec: str) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "dataset": DATASET, "path": self.path, "hub_id": self.hub_id,
                "source_split": self.source_split, "test_fraction": self.test_fraction, "max_turns": self.max_turns,
                "max_turn_chars": self.max_turn_chars, "prefixes": self.prefixes, "limit": self.limit,
                "system_prompt": self.system_prompt, "rows": {s: len(r) for s, r in self._rows.items()}}
