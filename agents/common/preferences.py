"""The one preference type: a context and two replies to it, the first preferred.

Reward modelling trains on it, offline DPO reads it from files and hub data sets
(:func:`agents.dpo.data.load_preferences`), and the reward model's env data (:mod:`agents.reward_model.data`)
builds it from the env's scores. Its token-level form for the policy losses is
:class:`agents.common.train.Pair` (:func:`agents.dpo.data.tokenize_pair`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dialogue_gym.conversation import Message

SAMPLED = "sampled"  # both replies sampled from a policy and ranked by the env's reward
REFERENCE = "reference"  # the chosen reply is the task row's reference reply
DATA = "data"  # read from a file or a hub data set
KINDS = (SAMPLED, REFERENCE, DATA)


@dataclass
class Preference:
    """One preference: a context ending with a user turn, two replies to it (``chosen`` preferred).

    Attributes:
        context: the conversation the replies answer (optionally opening with a system message).
        chosen: the preferred assistant reply.
        rejected: the other reply.
        kind: where the chosen reply came from: ``"sampled"``, ``"reference"`` or ``"data"`` (a file or hub record;
            files written by the reward-model trainer keep the kind they were made with).
        row: the task row id the pair was made from ("" when unknown).
        meta: extra record fields kept by :func:`agents.dpo.data.load_preferences` (``keep=``); not compared.
    """

    context: list[Message]
    chosen: str
    rejected: str
    kind: str = DATA
    row: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON-lines record (``context``, ``chosen``, ``rejected``, ``kind``, ``row``) that the file reader
        reads back."""
        return {"context": [dict(m) for m in self.context], "chosen": self.chosen, "rejected": self.rejected,
                "kind": self.kind, "row": self.row}


__all__ = ["DATA", "KINDS", "REFERENCE", "SAMPLED", "Preference"]
