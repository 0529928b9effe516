"""Messages, their validation, and the JSON snapshot of a conversation (`DialogueState`).

A message is a plain ``{"role": "system" | "user" | "assistant", "content": str}`` dict: the chat format of
transformers, vLLM and OpenAI clients. Every validation error names the offending field, says what was wrong
and what is allowed, and never changes the object it was given.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant")
STATE_VERSION = 1


class DialogueError(ValueError):
    """Bad input to the environment: the message says which field, what was wrong and what is allowed."""


def check_profile(component: object, profile: Mapping[str, Any]) -> None:
    """Let a user or reward model check a new state's hidden profile before the episode starts, through its optional
    ``check_profile(profile)`` method (raising DialogueError): a profile sent with ``options['messages']`` is then
    refused at reset, where the caller sent it, and not at the first step."""
    check = getattr(component, "check_profile", None)
    if check is not None:
        check(profile)


def validate_message(msg: Any, where: str = "message") -> Message:
    """Check one message and return a clean copy (only ``role`` and ``content``).

    Args:
        msg: the candidate message.
        where: how to name it in an error (e.g. ``"messages[3]"``).

    Raises:
        DialogueError: not a dict, unknown role, non-string or empty content.
    """
    if not isinstance(msg, Mapping):
        raise DialogueError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
    if "role" not in msg or "content" not in msg:
        raise DialogueError(f"{where} must have keys 'role' and 'content', got keys {sorted(msg)}")
    role, content = msg["role"], msg["content"]
    if role not in ROLES:
        raise DialogueError(f"{where}.role is {role!r}; allowed roles are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DialogueError(f"{where}.content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise DialogueError(f"{where}.content is empty; every message needs non-blank text")
    return {"role": role, "content": content}


def validate_messages(messages: Any, field_name: str = "messages") -> Conversation:
    """Check a conversation prefix and return a clean copy.

    Allowed shape: an optional leading system message, then user and assistant turns strictly alternating,
    starting with a user turn. At least one user message.

    Raises:
        DialogueError: with the index of the first offending message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DialogueError(f"{field_name} must be a list of message dicts, got {type(messages).__name__}")
    out = [validate_message(m, f"{field_name}[{i}]") for i, m in enumerate(messages)]
    body = out[1:] if out and out[0]["role"] == "system" else out
    if not body:
        raise DialogueError(f"{field_name} needs at least one user message (got {len(out)} message(s))")
    offset = len(out) - len(body)
    for j, m in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            i = j + offset
            detail = "a system message is only allowed first" if m["role"] == "system" else "turns must alternate"
            raise DialogueError(
                f"{field_name}[{i}].role is {m['role']!r} but {expected!r} was expected: the conversation must be "
                f"[system], user, assistant, user, ... ({detail})"
            )
    return out


def count_assistant_turns(messages: Sequence[Message]) -> int:
    """Number of assistant messages in a conversation."""
    return sum(1 for m in messages if m["role"] == "assistant")


def fingerprint(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_rng_state(seed: int | Sequence[int]) -> dict[str, Any]:
    """The JSON-able state of a fresh PCG64 generator seeded from ``seed``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).bit_generator.state


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A numpy Generator positioned exactly at a saved PCG64 state."""
    bit = np.random.PCG64()
    bit.state = copy.deepcopy(dict(state))
    return np.random.Generator(bit)


def fork_rng_state(state: Mapping[str, Any], branch: int) -> dict[str, Any]:
    """A new RNG state for branch ``branch`` of a fork, derived from the parent state and the branch index.

    Branches of one parent differ from each other; the same parent and branch always give the same stream.
    """
    s = state["state"]
    entropy = [int(s["state"]) & (2**64 - 1), int(s["state"]) >> 64, int(s["inc"]) & (2**64 - 1)]
    seq = np.random.SeedSequence(entropy, spawn_key=(int(branch),))
    return np.random.Generator(np.random.PCG64(seq)).bit_generator.state


@dataclass
class DialogueState:
    """Everything needed to continue a conversation exactly: a JSON-serialisable snapshot.

    Attributes:
        messages: the conversation so far (ends with a user message while the episode runs).
        turn: number of assistant turns taken so far.
        max_turns: the episode is truncated after this many assistant turns.
        task_row: id of the task row the conversation came from ("" for a free-form start).
        profile: the simulated user's hidden profile (persona, goal, reference answer, replay turns, ...).
        rng: PCG64 state of the episode RNG (draws the user's and the judge's per-turn seeds).
        config_fingerprint: hash of the env configuration this state belongs to.
        last_score: reward-model score of the previous turn (for the ``delta`` reward mode).
        terminated: the user or the task ended the conversation (a last allowed turn that solves the task
            included).
        truncated: ``max_turns`` was reached without that.
        version: schema version of the snapshot.
    """

    messages: Conversation
    turn: int
    max_turns: int
    task_row: str
    profile: dict[str, Any]
    rng: dict[str, Any]
    config_fingerprint: str
    last_score: float = 0.0
    terminated: bool = False
    truncated: bool = False
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """The episode has ended (terminated or truncated)."""
        return self.terminated or self.truncated

    def to_dict(self) -> dict[str, Any]:
        """A deep-copied plain dict (JSON-serialisable)."""
        return copy.deepcopy(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def copy(self) -> DialogueState:
        return DialogueState.from_dict(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> DialogueState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DialogueError(f"state is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> DialogueState:
        """Validate and build a state from a plain dict (or return a copy of a DialogueState).

        Raises:
            DialogueError: naming the first missing or malformed field.
        """
        if isinstance(data, DialogueState):
            data = data.to_dict()
        if not isinstance(data, Mapping):
            raise DialogueError(f"state must be a DialogueState or a dict, got {type(data).__name__}")
        required = ("messages", "turn", "max_turns", "task_row", "profile", "rng", "config_fingerprint")
        missing = [k for k in required if k not in data]
        if missing:
            raise DialogueError(f"state is missing field(s) {missing}; a state needs {list(required)}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DialogueError(f"state has unknown field(s) {unknown}; allowed fields are {sorted(known)}")
        version = data.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise DialogueError(f"state.version is {version!r}; this dialogue-gym reads version {STATE_VERSION}")
        messages = validate_messages(data["messages"], "state.messages")
        for name in ("turn", "max_turns"):
            v = data[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DialogueError(f"state.{name} must be a non-negative integer, got {v!r}")
        if data["max_turns"] < 1:
            raise DialogueError(f"state.max_turns must be >= 1, got {data['max_turns']}")
        if data["turn"] != count_assistant_turns(messages):
            raise DialogueError(
                f"state.turn is {data['turn']} but state.messages holds {count_assistant_turns(messages)} "
                "assistant turn(s); they must agree"
            )
        if not isinstance(data["profile"], Mapping):
            raise DialogueError(f"state.profile must be a dict, got {type(data['profile']).__name__}")
        rng = data["rng"]
        if not isinstance(rng, Mapping) or rng.get("bit_generator") != "PCG64" or "state" not in rng:
            raise DialogueError("state.rng must be a PCG64 bit-generator state dict (as from new_rng_state)")
        try:  # what stepping (rng_from_state) and forking (fork_rng_state) will read, checked now, not mid-batch
            rng_from_state(rng)
            fork_rng_state(rng, 0)
        except (TypeError, KeyError, ValueError, OverflowError) as e:
            raise DialogueError(f"state.rng is not a usable PCG64 bit-generator state dict (as from new_rng_state): "
                                f"{type(e).__name__}: {e!s:.120}") from None
        if not isinstance(data["config_fingerprint"], str):
            raise DialogueError("state.config_fingerprint must be a string")
        if not isinstance(data["task_row"], str):
            raise DialogueError(f"state.task_row must be a string (a task row id, or \"\" for a free-form start), "
                                f"got {type(data['task_row']).__name__}")
        last_score = data.get("last_score", 0.0)
        if isinstance(last_score, bool) or not isinstance(last_score, (int, float)):
            raise DialogueError(f"state.last_score must be a number (the previous turn's score), got "
                                f"{type(last_score).__name__} {last_score!r:.60}")
        for flag in ("terminated", "truncated"):
            if not isinstance(data.get(flag, False), bool):
                raise DialogueError(f"state.{flag} must be true or false, got {data[flag]!r:.60}")
        if not isinstance(data.get("extra", {}), Mapping):
            raise DialogueError(f"state.extra must be a dict, got {type(data['extra']).__name__}")
        return cls(
            messages=messages,
            turn=int(data["turn"]),
            max_turns=int(data["max_turns"]),
            task_row=data["task_row"],
            profile=copy.deepcopy(dict(data["profile"])),
            rng=copy.deepcopy(dict(rng)),
            config_fingerprint=data["config_fingerprint"],
            last_score=float(last_score),
            terminated=data.get("terminated", False),
            truncated=data.get("truncated", False),
            version=STATE_VERSION,
            extra=copy.deepcopy(dict(data.get("extra", {}))),
        )
