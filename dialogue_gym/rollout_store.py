"""Rollout records and the append-only rollout store shared by every agent and the leaderboard.

A store is one JSON-lines file; every line is one whole record with a ``"schema"`` version and a ``"kind"``:

- :class:`StateRecord` (``"state"``): a starting state (a :class:`DialogueState`, whose ``rng`` is the simulated
  user's seed stream) plus the policy's sampling seed. The leaderboard stores its evaluation states once and
  every agent is evaluated from the same records.
- :class:`DialogueRecord` (``"dialogue"``): one played dialogue: messages, per-turn rewards, the policy's token
  ids and log-probs when known, the state it started from and the hashes of the env, task, user and judge
  configuration.

Writing: each :meth:`RolloutStore.append` is one ``write`` of whole lines to a file opened with ``O_APPEND``,
under an exclusive ``flock``, then ``fsync``: concurrent writers (threads or processes) never interleave. If an
earlier writer crashed mid-line, the next append first ends that line, so the damage stays on its own line.
Reading takes a shared lock and parses only newline-terminated lines: readers see whole records only, a
truncated last line is skipped (``partial_tail``), and a crash remnant sealed by a later append is skipped and
reported (``skipped_lines``) without losing any other record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dialogue_gym.conversation import (
    DialogueError,
    DialogueState,
    count_assistant_turns,
    fingerprint,
    validate_messages,
)

if TYPE_CHECKING:
    from dialogue_gym.core import DialogueCore
    from dialogue_gym.env import EnvContract

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("state", "dialogue")


class RolloutError(ValueError):
    """A malformed rollout record; the message names the record and the field."""


# ---- field checks (each names the field) ---------------------------------------------------------------------

def _fail(where: str, what: str) -> RolloutError:
    return RolloutError(f"{where} {what}")


def _str(data: Mapping[str, Any], key: str, where: str, empty: bool = True) -> str:
    v = data[key]
    if not isinstance(v, str) or (not empty and not v):
        raise _fail(f"{where}.{key}", f"must be a {'non-empty ' if not empty else ''}string, got {v!r}")
    return v


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise _fail(where, f"must be an integer, got {v!r}")
    return int(v)


def _float_or_none(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise _fail(where, f"must be a finite number or null, got {v!r}")
    return float(v)


def _bool(data: Mapping[str, Any], key: str, where: str) -> bool:
    v = data[key]
    if not isinstance(v, (bool, np.bool_)):
        raise _fail(f"{where}.{key}", f"must be true or false, got {v!r}")
    return bool(v)


def _dict(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    v = data[key]
    if not isinstance(v, Mapping):
        raise _fail(f"{where}.{key}", f"must be an object, got {type(v).__name__}")
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _fail(f"{where}.{key}", f"must be JSON-serialisable ({e})") from None
    return dict(v)


def _hashes(data: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    v = _dict(data, key, where)
    for k, h in v.items():
        if not isinstance(h, str):
            raise _fail(f"{where}.{key}.{k}", f"must be a hash string, got {h!r}")
    return v


def _check_keys(data: Any, required: Sequence[str], optional: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise RolloutError(f"{where} must be a JSON object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise RolloutError(f"{where} is missing field(s) {missing}; a record needs {list(required)}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise RolloutError(f"{where} has unknown field(s) {unknown}; allowed: {sorted([*required, *optional])}")


# ---- records -------------------------------------------------------------------------------------------------

@dataclass
class StateRecord:
    """A stored starting state.

    Attributes:
        id: unique id within the store (e.g. ``"eval-0003"``).
        state: the conversation state; its ``rng`` is the simulated user's seed stream and its
            ``config_fingerprint`` the env configuration it belongs to.
        policy_seed: seed of the policy's sampling stream for dialogues played from this state.
        config: hashes of the configuration that made it (see :func:`config_hashes`).
        tags: free-form JSON-able labels (benchmark, split, ...).
    """

    id: str
    state: DialogueState
    policy_seed: int
    config: dict[str, str] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    kind: str = "state"

    def __post_init__(self) -> None:
        record_from_dict(self.to_dict())  # validate on construction, with the same messages as reading

    @property
    def state_hash(self) -> str:
        """A hash of the whole state (messages, profile, user RNG, ...): equal hashes mean identical states."""
        return fingerprint(self.state.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "state", "id": self.id, "state": self.state.to_dict(),
                "policy_seed": self.policy_seed, "config": dict(self.config), "tags": dict(self.tags)}


@dataclass
class DialogueRecord:
    """One played dialogue.

    Attributes:
        id: unique id within the store.
        policy: who played the assistant (e.g. ``"initial"``, ``"refuel/seed-0"``).
        messages: the whole conversation (including any turns the starting state already had).
        rewards: the env's score after each assistant turn played from the start (None where a turn was not
            scored): the last ``len(rewards)`` assistant turns of ``messages``.
        token_ids: the policy's sampled token ids, one list per played turn (empty lists when unknown).
        logprobs: per-token log-probs of ``token_ids`` (None when not recorded).
        terminated: the user (or the task) ended the conversation.
        truncated: the horizon was reached.
        start: id of the :class:`StateRecord` it was played from ("" when none).
        start_hash: :attr:`StateRecord.state_hash` of that state ("" when none).
        state_fingerprint: the env configuration fingerprint of its states.
        config: hashes of the env, task, user and reward configuration (see :func:`config_hashes`).
        seeds: the seeds used, e.g. ``{"policy": 12}``.
        tags: free-form JSON-able labels (agent, training seed, ...).
    """

    id: str
    policy: str
    messages: list[dict[str, str]]
    rewards: list[float | None]
    token_ids: list[list[int]]
    logprobs: list[list[float]] | None = None
    terminated: bool = False
    truncated: bool = False
    start: str = ""
    start_hash: str = ""
    state_fingerprint: str = ""
    config: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    kind: str = "dialogue"

    def __post_init__(self) -> None:
        record_from_dict(self.to_dict())

    @property
    def turns(self) -> int:
        """Assistant turns played from the start."""
        return len(self.rewards)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "dialogue", "id": self.id, "policy": self.policy,
                "messages": [dict(m) for m in self.messages], "rewards": list(self.rewards),
                "token_ids": [list(t) for t in self.token_ids],
                "logprobs": None if self.logprobs is None else [list(x) for x in self.logprobs],
                "terminated": self.terminated, "truncated": self.truncated, "start": self.start,
                "start_hash": self.start_hash, "state_fingerprint": self.state_fingerprint,
                "config": dict(self.config), "seeds": dict(self.seeds), "tags": dict(self.tags)}


Record = StateRecord | DialogueRecord

_STATE_FIELDS = ("schema", "kind", "id", "state", "policy_seed", "config", "tags")
_DIALOGUE_REQUIRED = ("schema", "kind", "id", "policy", "messages", "rewards", "token_ids")
_DIALOGUE_OPTIONAL = ("logprobs", "terminated", "truncated", "start", "start_hash", "state_fingerprint", "config",
                      "seeds", "tags")


def record_from_dict(data: Any, where: str = "record") -> Record:
    """Validate a plain dict (as read from JSON) and build its record.

    Raises:
        RolloutError: naming the first bad field (``where`` prefixes the message, e.g. ``"line 7"``).
    """
    if not isinstance(data, Mapping):
        raise RolloutError(f"{where} must be a JSON object, got {type(data).__name__}")
    if "schema" not in data:
        raise RolloutError(f"{where} has no 'schema' field; every rollout record carries schema {SCHEMA_VERSION}")
    if data["schema"] != SCHEMA_VERSION:
        raise RolloutError(f"{where}.schema is {data['schema']!r}; this dialogue-gym reads schema {SCHEMA_VERSION}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise RolloutError(f"{where}.kind is {kind!r}; allowed: {', '.join(KINDS)}")
    if kind == "state":
        _check_keys(data, _STATE_FIELDS, (), where)
        try:
            state = DialogueState.from_dict(data["state"])
        except DialogueError as e:
            raise RolloutError(f"{where}.state: {e}") from None
        # the fields are checked and converted here, so build the record without __post_init__ checking them again
        state_record = object.__new__(StateRecord)
        state_record.__dict__.update(id=_str(data, "id", where, empty=False), state=state,
                                     policy_seed=_int(data["policy_seed"], f"{where}.policy_seed"),
                                     config=_hashes(data, "config", where), tags=_dict(data, "tags", where),
                                     kind="state")
        return state_record
    _check_keys(data, _DIALOGUE_REQUIRED, _DIALOGUE_OPTIONAL, where)
    full = {"logprobs": None, "terminated": False, "truncated": False, "start": "", "start_hash": "",
            "state_fingerprint": "", "config": {}, "seeds": {}, "tags": {}, **data}
    try:
        messages = validate_messages(full["messages"], f"{where}.messages")
    except DialogueError as e:
        raise RolloutError(str(e)) from None
    rewards = full["rewards"]
    if not isinstance(rewards, list):
        raise _fail(f"{where}.rewards", f"must be a list (one entry per assistant turn), got {type(rewards).__name__}")
    rewards = [_float_or_none(r, f"{where}.rewards[{i}]") for i, r in enumerate(rewards)]
    assistant_turns = count_assistant_turns(messages)
    if len(rewards) > assistant_turns:
        raise _fail(f"{where}.rewards", f"has {len(rewards)} entries but messages hold only {assistant_turns} "
                                        "assistant turn(s)")
    turns = len(rewards)
    token_ids = full["token_ids"]
    if not isinstance(token_ids, list) or len(token_ids) != turns:
        raise _fail(f"{where}.token_ids", f"must be a list of {turns} lists (one per played turn, as rewards)")
    token_ids = [[_int(t, f"{where}.token_ids[{i}][{j}]") for j, t in enumerate(_list(x, f"{where}.token_ids[{i}]"))]
                 for i, x in enumerate(token_ids)]
    logprobs = full["logprobs"]
    if logprobs is not None:
        if not isinstance(logprobs, list) or len(logprobs) != turns:
            raise _fail(f"{where}.logprobs", f"must be null or a list of {turns} lists (one per played turn)")
        clean = []
        for i, x in enumerate(logprobs):
            row = [_float_or_none(v, f"{where}.logprobs[{i}][{j}]")
                   for j, v in enumerate(_list(x, f"{where}.logprobs[{i}]"))]
            if len(row) != len(token_ids[i]) or any(v is None for v in row):
                raise _fail(f"{where}.logprobs[{i}]", f"must hold {len(token_ids[i])} numbers (one per token id)")
            clean.append(row)
        logprobs = clean
    seeds = _dict(full, "seeds", where)
    for k, s in seeds.items():
        _int(s, f"{where}.seeds.{k}")
    record = object.__new__(DialogueRecord)
    record.__dict__.update(
        id=_str(full, "id", where, empty=False), policy=_str(full, "policy", where, empty=False), messages=messages,
        rewards=rewards, token_ids=token_ids, logprobs=logprobs, terminated=_bool(full, "terminated", where),
        truncated=_bool(full, "truncated", where), start=_str(full, "start", where),
        start_hash=_str(full, "start_hash", where), state_fingerprint=_str(full, "state_fingerprint", where),
        config=_hashes(full, "config", where), seeds={k: int(v) for k, v in seeds.items()},
        tags=_dict(full, "tags", where), kind="dialogue")
    return record


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(where, f"must be a list, got {type(v).__name__}")
    return v


def env_core(env: EnvContract | DialogueCore) -> DialogueCore:
    """The episode mechanics behind an env (a :class:`DialogueEnv` or :class:`DialogueVectorEnv`; a core as is).

    Raises:
        TypeError: ``env`` is neither, naming its type.
    """
    from dialogue_gym.core import DialogueCore
    from dialogue_gym.env import EnvContract

    if isinstance(env, EnvContract):
        return env.core
    if isinstance(env, DialogueCore):
        return env
    raise TypeError(f"env must be a DialogueEnv, a DialogueVectorEnv (unwrapped) or a DialogueCore, got "
                    f"{type(env).__name__}")


def config_hashes(env: EnvContract | DialogueCore) -> dict[str, str]:
    """Hashes of an env's whole configuration and of its task, user and reward (judge) parts."""
    core = env_core(env)
    return {"env": core.fingerprint, "task": fingerprint(core.task.describe()),
            "user": fingerprint(core.user.describe()), "reward": fingerprint(core.reward.describe())}


# ---- the store -----------------------------------------------------------------------------------------------

class RolloutStore:
    """An append-only JSON-lines file of rollout records, safe for concurrent writers and readers.

    Args:
        path: the file (created with its parent directory on the first append).

    Attributes:
        skipped_lines: 1-based numbers of the lines the last :meth:`read` skipped (crash remnants).
        partial_tail: the last :meth:`read` found an unterminated last line (being written, or truncated by a
            crash) and skipped it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped_lines: list[int] = []
        self.partial_tail = False

    def append(self, records: Record | Iterable[Record]) -> int:
        """Append one record or several, as one atomic write; returns how many were written.

        Raises:
            RolloutError: a record is malformed (nothing is written).
        """
        batch = [records] if isinstance(records, (StateRecord, DialogueRecord)) else list(records)
        lines = []
        for i, r in enumerate(batch):
            if not isinstance(r, (StateRecord, DialogueRecord)):
                raise RolloutError(f"records[{i}] must be a StateRecord or DialogueRecord, got {type(r).__name__}")
            data = record_from_dict(r.to_dict(), f"records[{i}] (id {r.id!r})").to_dict()  # plain JSON types
            lines.append(json.dumps(data, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n")
        if not lines:
            return 0
        payload = "".join(lines).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                payload = b"\n" + payload  # a writer crashed mid-line: end its line so it stays a lone remnant
            written = os.write(fd, payload)
            if written != len(payload):  # regular files write whole buffers unless the disk is full
                raise OSError(f"short write to {self.path}: {written} of {len(payload)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        return len(batch)

    def read(self) -> list[Record]:
        """All whole records, in file order (an empty list when the file does not exist yet).

        Raises:
            RolloutError: a complete line holds a JSON object that is not a valid record (naming line and field).
        """
        self.skipped_lines, self.partial_tail = [], False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            with os.fdopen(os.dup(fd), "rb") as f:
                blob = f.read()
        finally:
            os.close(fd)
        *lines, tail = blob.split(b"\n")
        self.partial_tail = bool(tail)
        out: list[Record] = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.skipped_lines.append(n)  # the remnant of a crashed write (any prefix of a record is not JSON)
                continue
            out.append(record_from_dict(data, f"{self.path.name} line {n}"))
        if self.skipped_lines:
            log.warning("%s: skipped %d line(s) left by a crashed writer: %s", self.path, len(self.skipped_lines),
                        self.skipped_lines)
        return out

    def states(self) -> list[StateRecord]:
        return [r for r in self.read() if isinstance(r, StateRecord)]

    def dialogues(self, policy: str | None = None) -> list[DialogueRecord]:
        """Dialogue records, optionally only those played by ``policy``."""
        return [r for r in self.read() if isinstance(r, DialogueRecord) and (policy is None or r.policy == policy)]


# ---- evaluation states ---------------------------------------------------------------------------------------

def make_states(env: EnvContract | DialogueCore, n: int, seed: int, prefix: str = "eval") -> list[StateRecord]:
    """``n`` starting states at the first ``n`` rows of the env's split, with user and policy seeds from ``seed``.

    Raises:
        ValueError: ``n`` is not in ``[1, rows]``.
    """
    core = env_core(env)
    rows = len(core.rows)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= rows:
        raise ValueError(f"the number of states must be an integer in [1, {rows}] (rows in split "
                         f"{core.config.split!r}), got {n!r}")
    seqs = np.random.SeedSequence(seed).spawn(n)
    hashes = config_hashes(core)
    out = []
    for i, seq in enumerate(seqs):
        user_entropy, policy_seed = (int(x) for x in seq.generate_state(2, np.uint64) >> np.uint64(1))
        out.append(StateRecord(id=f"{prefix}-{i:04d}", state=core.state_for_row(i, user_entropy),
                               policy_seed=policy_seed, config=hashes,
                               tags={"split": core.config.split, "row": core.rows[i].id, "seed": seed}))
    return out


def stored_states(store: RolloutStore, env: EnvContract | DialogueCore, n: int, seed: int, prefix: str = "eval"
                  ) -> list[StateRecord]:
    """The store's starting states, made once with :func:`make_states` and appended when the store has none.

    Raises:
        RolloutError: the store's states belong to another env configuration or differ in number or seed (a
            stored benchmark is never silently regenerated).
    """
    core = env_core(env)
    have = store.states()
    if not have:
        store.append(make_states(core, n, seed, prefix))
        return store.states()
    if have[0].state.config_fingerprint != core.fingerprint:
        raise RolloutError(f"{store.path} holds states of env configuration {have[0].state.config_fingerprint}, "
                           f"but this env's configuration is {core.fingerprint}; use another store file")
    if len(have) != n or have[0].tags.get("seed") != seed:
        raise RolloutError(f"{store.path} holds {len(have)} states made with seed {have[0].tags.get('seed')!r}; "
                           f"asked for {n} with seed {seed}: use another store file")
    return have


__all__ = ["KINDS", "SCHEMA_VERSION", "DialogueRecord", "Record", "RolloutError", "RolloutStore", "StateRecord",
           "config_hashes", "env_core", "make_states", "record_from_dict", "stored_states"]
