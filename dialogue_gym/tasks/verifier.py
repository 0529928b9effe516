"""The verifier reward of the numeric-answer tasks: 1.0 for a correct last reply, discounted by the turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dialogue_gym.conversation import DialogueError, Message, count_assistant_turns
from dialogue_gym.tasks.answers import is_correct, last_assistant, profile_answer


class VerifierReward:
    """1.0 when the last assistant reply states the correct answer, else 0.0, times ``discount ** (turns - 1)``.

    Args:
        discount: in (0, 1]; 1.0 makes the turn of success irrelevant, smaller values favour solving earlier.
    """

    def __init__(self, discount: float = 1.0):
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not 0 < discount <= 1:
            raise DialogueError(f"discount must be a number in (0, 1], got {discount!r}")
        self.discount = float(discount)

    def describe(self) -> dict[str, Any]:
        return {"reward": "verifier", "discount": self.discount}

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        profile_answer(profile, "the verifier reward")

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        if profiles is None or len(profiles) != len(conversations):
            raise DialogueError("the verifier reward needs one profile (with 'answer') per conversation")
        scores = np.zeros(len(conversations), dtype=np.float64)
        for i, (conv, profile) in enumerate(zip(conversations, profiles)):
            if is_correct(last_assistant(conv), profile_answer(profile, "the verifier reward")):
                scores[i] = self.discount ** max(0, count_assistant_turns(conv) - 1)
        return scores
