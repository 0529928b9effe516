"""The reward-model interface: score a batch of conversations that end with an assistant turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dialogue_gym.conversation import Message


@runtime_checkable
class RewardModel(Protocol):
    """A batched reward model.

    ``score`` is called once per env step for every conversation that needs a score. Each conversation ends
    with an assistant message; ``profiles`` carries the hidden task data a verifier needs (reference answer,
    ...). Returns a float array of shape (B,). Higher is better.
    """

    def score(
        self,
        conversations: Sequence[Sequence[Message]],
        profiles: Sequence[Mapping[str, Any]] | None = None,
    ) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the reward's configuration (enters the env's fingerprint)."""
        ...
