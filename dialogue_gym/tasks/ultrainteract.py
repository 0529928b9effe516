"""UltraInteract: reasoning and coding instructions from ``openbmb/UltraInteract_pair`` as opening user turns.

Each row of UltraInteract_pair (split ``train``) has the columns ``task`` (``Coding``, ``Math_CoT``, ``Math_PoT``,
``Logic``), ``dataset``, ``trajectory`` (a list of ``{"from": "user" | "assistant", "value": str}`` turns: the
instruction, then for deeper rows earlier attempts and the environment's critiques), ``chosen`` and ``rejected``
(the preferred and dispreferred next assistant turn), ``id`` and ``parent_id``. REFUEL's simulated-user setting
opens each conversation with the first user message of a row, deduplicated by its text; that is what this task
does. The train/test split is by a hash of that text, so it is the same on every machine and for every copy of
the data. The simulated user is the LLM user and the reward is the LLM judge by default.

No data ships with the package: point ``path`` at a local copy (file or directory), or set ``hub_id`` to load
from the hub. Without either, constructing the task raises an error that says how to get the data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from dialogue_gym.conversation import DialogueError, Message
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

DATASET = "openbmb/UltraInteract_pair"
TASK_TYPES = ("Coding", "Math_CoT", "Math_PoT", "Logic")
REQUIRED_COLUMNS = ("trajectory", "id")


def opening_and_depth(record: dict[str, Any], index: int) -> tuple[str, int]:
    """The first user message of a row and the number of user turns in its trajectory.

    Raises:
        DialogueError: the row does not follow the UltraInteract_pair schema (names the row and the field).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
        raise DialogueError(
            f"row {index} has no column(s) {missing} (columns: {sorted(record)}); UltraInteract_pair rows have "
            "task, dataset, trajectory [{from, value}, ...], chosen, rejected, id, parent_id"
        )
    traj = record["trajectory"]
    if not isinstance(traj, Sequence) or isinstance(traj, str) or not traj:
        raise DialogueError(f"row {index} (id {record['id']!r}): trajectory must be a non-empty list of "
                            f"{{'from', 'value'}} turns, got {type(traj).__name__}")
    for j, turn in enumerate(traj):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DialogueError(f"row {index} (id {record['id']!r}): trajectory[{j}] must be a dict with keys "
                                f"'from' and 'value', got {turn!r:.120}")
    first = traj[0]
    if first["from"] != "user":
        raise DialogueError(f"row {index} (id {record['id']!r}): trajectory[0].from is {first['from']!r}; the "
                            "first turn must come from 'user'")
    if not isinstance(first["value"], str):
        raise DialogueError(f"row {index} (id {record['id']!r}): trajectory[0].value must be a string")
    return first["value"].strip(), sum(1 for t in traj if t["from"] == "user")


class UltraInteractTask:
    """First user messages of UltraInteract_pair as opening states.

    Args:
        path: a local copy: a ``.parquet`` / ``.jsonl`` / ``.json`` / ``.arrow`` file, a ``save_to_disk``
            folder, or a hub snapshot folder.
        hub_id: load from the hub with this id (e.g. ``"openbmb/UltraInteract_pair"``) when ``path`` is None.
            Only used when set: the default never touches the network.
        source_split: the split of the source to read (UltraInteract_pair has only ``train``).
        test_fraction: share of distinct openings (by hash of their text) in the test split.
        max_turns: keep only rows whose trajectory has at most this many user turns (1: instructions whose row
            is a first attempt); None keeps all.
        max_turn_chars: skip openings longer than this many characters (long problem statements); None: no cap.
        task_types: keep only these values of the ``task`` column (``Coding``, ``Math_CoT``, ``Math_PoT``,
            ``Logic``); None keeps all.
        limit: at most this many rows per split (the first ones in data order); None: all.
        system_prompt: an optional system message opening every conversation.
        strict: stop at the first row off the schema; by default such rows are skipped with one warning that
            counts them and shows the first (the full dataset has 219k rows; one bad row should not block it).

    Raises:
        DialogueError: no data (says how to get it), unreadable data, no valid row (or with ``strict`` any row
            off the schema), bad settings.
    """

    name = "ultrainteract"
    default_user = "llm"
    default_reward = "judge"

    def __init__(self, path: str | os.PathLike | None = None, hub_id: str | None = None,
                 source_split: str = "train", test_fraction: float = 0.05, max_turns: int | None = None,
                 max_turn_chars: int | None = 4000, task_types: Sequence[str] | None = None,
                 limit: int | None = None, system_prompt: str | None = None, strict: bool = False):
        self.strict = check_strict(strict)
        self.test_fraction = check_fraction(test_fraction, "test_fraction")
        self.max_turns = check_optional_positive(max_turns, "max_turns")
        self.max_turn_chars = check_optional_positive(max_turn_chars, "max_turn_chars")
        self.limit = check_optional_positive(limit, "limit")
        if task_types is not None:
            if isinstance(task_types, str) or not all(isinstance(t, str) for t in task_types):
                raise DialogueError(f"task_kwargs.task_types must be a list of strings or null, got {task_types!r}")
            task_types = sorted(set(task_types))
            unknown = [t for t in task_types if t not in TASK_TYPES]
            if unknown:
                raise DialogueError(f"task_kwargs.task_types has unknown value(s) {unknown}; allowed: "
                                    f"{', '.join(TASK_TYPES)}")
        self.task_types = task_types
        self.path = None if path is None else os.fspath(path)
        self.hub_id, self.source_split, self.system_prompt = hub_id, source_split, system_prompt
        records = load_records(path, hub_id, dataset=DATASET, env_name=self.name,
                               example_path="/data/ultrainteract_pair.jsonl", source_split=source_split,
                               columns=("trajectory", "id", "task", "dataset", "chosen"))
        self._rows, self.skipped = self._build(records)

    def _build(self, records: list[dict[str, Any]]) -> tuple[dict[str, list[TaskRow]], dict[str, int]]:
        rows: dict[str, list[TaskRow]] = {s: [] for s in SPLITS}
        skipped = {"duplicate": 0, "max_turns": 0, "max_turn_chars": 0, "task_types": 0, "empty": 0, "limit": 0,
                   "invalid": 0}
        seen: set[str] = set()
        invalid = InvalidRows(self.name, self.strict)
        for index, rec in enumerate(records):
            try:
                opening, depth = opening_and_depth(rec, index)
            except DialogueError as e:
                invalid.add(e)
                continue
            if not opening:
                skipped["empty"] += 1
                continue
            if self.task_types is not None and rec.get("task") not in self.task_types:
                skipped["task_types"] += 1
                continue
            if self.max_turns is not None and depth > self.max_turns:
                skipped["max_turns"] += 1
                continue
            if self.max_turn_chars is not None and len(opening) > self.max_turn_chars:
                skipped["max_turn_chars"] += 1
                continue
            if opening in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(opening)
            split = "test" if in_test_split(opening, self.test_fraction) else "train"
            if self.limit is not None and len(rows[split]) >= self.limit:
                skipped["limit"] += 1
                continue
            messages: list[Message] = [{"role": "user", "content": opening}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            profile: dict[str, Any] = {"source_id": str(rec["id"]), "task": rec.get("task"),
                                       "dataset": rec.get("dataset")}
            if len(rec["trajectory"]) == 1 and isinstance(rec.get("chosen"), str):
                profile["reference"] = rec["chosen"]  # the preferred reply to the opening itself
            rows[split].append(TaskRow(id=f"ui-{stable_hash(opening):016x}", messages=messages, profile=profile))
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
                "max_turn_chars": self.max_turn_chars, "task_types": self.task_types, "limit": self.limit,
                "system_prompt": self.system_prompt, "rows": {s: len(r) for s, r in self._rows.items()}}
