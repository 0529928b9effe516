"""The simulated-user interface: given conversations that end with an assistant turn, say the next user turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from dialogue_gym.conversation import Message


@dataclass(frozen=True)
class UserTurn:
    """The simulated user's answer to one conversation.

    Attributes:
        text: the next user message (never empty when ``done`` is False).
        done: the user ends the conversation (the env reports ``terminated``); ``text`` is then informational.
    """

    text: str
    done: bool = False


@runtime_checkable
class UserSimulator(Protocol):
    """A batched simulated user.

    ``respond`` is called once per env step for all active conversations together. Each conversation ends
    with the assistant's latest message; ``profiles`` carries each conversation's hidden user profile (persona,
    goal, reference answer, replay turns); ``seeds`` gives each conversation its own random stream.
    """

    def respond(
        self,
        conversations: Sequence[Sequence[Message]],
        profiles: Sequence[Mapping[str, Any]],
        seeds: Sequence[int],
    ) -> list[UserTurn]: ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the user's configuration (enters the env's fingerprint)."""
        ...
