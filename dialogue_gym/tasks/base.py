"""The task interface: where conversations start, what the user secretly knows, and how they pair by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dialogue_gym.conversation import Conversation

# "validation" holds rows for choices made by looking at results (learning rates, temperatures); only tasks that
# generate or hold such rows have any (arithmetic, clarify). Its index (2) keeps the seeds of the older two splits.
SPLITS = ("train", "test", "validation")


@dataclass(frozen=True)
class TaskRow:
    """One starting state of a task.

    Attributes:
        id: stable row id within the task (survives reloading the data).
        messages: the opening messages; they end with a user message.
        profile: the simulated user's hidden profile: persona, goal, reference answer, replay turns, ...
            (JSON-able). Verifiable tasks put their answer here under ``"answer"``.
    """

    id: str
    messages: Conversation
    profile: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A source of starting states with deterministic train/test splits.

    Attributes:
        name: short name used in configs (``"embedded"``, ``"arithmetic"``, ...).
        default_user: the user simulator spec the env uses when none is given (``"llm"``, ``"replay"``,
            or a task-specific name that :meth:`make_user` understands).
        default_reward: the reward spec used when none is given (``"judge"``, ``"verifier"``, a path, ...).
    """

    name: str
    default_user: str
    default_reward: str

    def rows(self, split: str = "train") -> Sequence[TaskRow]:
        """All rows of a split (``"train"``, ``"test"`` or ``"validation"``), in a fixed order."""
        ...

    def make_user(self, spec: str, engine: Any) -> Any | None:
        """A task-specific user simulator for ``spec``, or None when ``spec`` is not task-specific.

        ``engine`` is a zero-argument callable returning the shared generation engine, for users that need an
        LLM (call it only when needed: it may load a model).
        """
        ...

    def make_reward(self, spec: str) -> Any | None:
        """A task-specific reward model for ``spec`` (e.g. ``"verifier"``), or None."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the task's configuration (enters the env's fingerprint)."""
        ...
