"""Spaces for dialogue: a conversation (the observation) and an utterance (the action).

Gymnasium's ``Text`` space only admits a fixed character set and rejects ordinary punctuation, so dialogue needs
its own spaces. Both batch to ``Tuple`` spaces through Gymnasium's generic ``batch_space``, so ``SyncVectorEnv``
works with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.spaces import Space

from dialogue_gym.conversation import DialogueError, count_assistant_turns, validate_messages
from dialogue_gym.shared_memory import register as register_shared_memory

_WORDS = ("the", "a", "model", "answer", "question", "why", "how", "explain", "example", "code", "sum", "please",
          "short", "detail", "step", "result", "is", "not", "clear", "thanks", "more", "two", "three", "?", "!", ",")


def _random_text(rng: np.random.Generator, max_chars: int, min_words: int = 1, max_words: int = 12) -> str:
    words = rng.choice(_WORDS, size=int(rng.integers(min_words, max_words + 1)))
    text = " ".join(str(w) for w in words).strip()
    text = text if any(c.isalnum() for c in text) else "hello"
    return text[:max_chars]


class Utterance(Space[str]):
    """One message: a non-blank string of at most ``max_chars`` characters (any Unicode, any punctuation)."""

    def __init__(self, max_chars: int = 8000, seed: int | np.random.Generator | None = None):
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        if mask is not None or probability is not None:
            raise NotImplementedError("Utterance.sample does not support masks")
        return _random_text(self.np_random, self.max_chars)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and bool(x.strip()) and len(x) <= self.max_chars

    def __repr__(self) -> str:
        return f"Utterance(max_chars={self.max_chars})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Utterance) and other.max_chars == self.max_chars


class Conversation(Space[list]):
    """A conversation: valid messages with at most ``max_turns`` assistant turns.

    While an episode runs the observation ends with a user message (the assistant speaks next); the final
    observation of an episode ends with the assistant's last message.
    """

    def __init__(self, max_turns: int = 5, seed: int | np.random.Generator | None = None):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> list[dict[str, str]]:
        if mask is not None or probability is not None:
            raise NotImplementedError("Conversation.sample does not support masks")
        turns = int(self.np_random.integers(0, self.max_turns))
        msgs = []
        for _ in range(turns):
            msgs.append({"role": "user", "content": _random_text(self.np_random, 200)})
            msgs.append({"role": "assistant", "content": _random_text(self.np_random, 200)})
        msgs.append({"role": "user", "content": _random_text(self.np_random, 200)})
        return msgs

    def contains(self, x: Any) -> bool:
        try:
            msgs = validate_messages(x)
        except DialogueError:
            return False
        return count_assistant_turns(msgs) <= self.max_turns

    def __repr__(self) -> str:
        return f"Conversation(max_turns={self.max_turns})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Conversation) and other.max_turns == self.max_turns


register_shared_memory(Conversation)  # gym.make_vec(..., vectorization_mode="async") needs these hooks
