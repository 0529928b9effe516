"""Users without a model: a scripted user for tests and a replay user for datasets with fixed user turns."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from dialogue_gym.conversation import DialogueError, Message, count_assistant_turns
from dialogue_gym.users.base import UserTurn


class ScriptedUser:
    """A deterministic user for tests: answers ``replies[seed % len(replies)]``.

    The choice depends on the per-conversation seed, so RNG streams (same seed → same reply, forked branches →
    different replies) are testable without a model.

    Args:
        replies: the candidate user turns.
        end_phrase: when the assistant's latest message contains it, the user ends the conversation.
    """

    def __init__(self, replies: Sequence[str] = ("Tell me more.", "Why?", "Give an example.", "And then?"),
                 end_phrase: str | None = None):
        if not replies or not all(isinstance(r, str) and r.strip() for r in replies):
            raise ValueError("replies must be a non-empty list of non-blank strings")
        self.replies = list(replies)
        self.end_phrase = end_phrase

    def describe(self) -> dict[str, Any]:
        return {"user": "scripted", "replies": self.replies, "end_phrase": self.end_phrase}

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        out = []
        for conv, seed in zip(conversations, seeds):
            if self.end_phrase is not None and self.end_phrase in conv[-1]["content"]:
                out.append(UserTurn("Thanks, that is all.", done=True))
            else:
                out.append(UserTurn(self.replies[int(seed) % len(self.replies)]))
        return out


class ReplayUser:
    """Serves a dataset's own later user turns (REFUEL's setting two).

    The profile holds ``"user_turns"``: the user messages that follow the opening, in order. After assistant
    turn k (counted over the whole conversation, opening included) the user says ``user_turns[k - opening]``;
    when they run out the user ends the conversation.
    """

    def describe(self) -> dict[str, Any]:
        return {"user": "replay"}

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        turns = profile.get("user_turns", [])
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DialogueError(f"the replay user needs profile['user_turns'] to be a list of strings, got "
                                f"{turns!r:.80}")
        opening = profile.get("opening_assistant_turns", 0)
        if isinstance(opening, bool) or not isinstance(opening, numbers.Integral) or opening < 0:
            raise DialogueError("the replay user needs profile['opening_assistant_turns'] to be an integer >= 0, got "
                                f"{opening!r:.60}")

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        out = []
        for conv, profile in zip(conversations, profiles):
            self.check_profile(profile)
            turns = list(profile.get("user_turns", []))
            index = count_assistant_turns(conv) - int(profile.get("opening_assistant_turns", 0)) - 1
            if 0 <= index < len(turns):
                out.append(UserTurn(turns[index]))
            else:
                out.append(UserTurn("", done=True))
        return out
