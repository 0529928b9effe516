"""The testbed's clarify-shaped task (``task=testbed``): its scripted user, its reward and its rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.testbed.policy import ANSWER, GUESS, GUESS_CREDIT, OPENING, REPLIES, REVEAL
from dialogue_gym.tasks import TASKS
from dialogue_gym.tasks.base import TaskRow
from dialogue_gym.users.base import UserTurn


# ----------------------------------------------------------------------------------------------- the task
def is_known(conversation: Sequence[dict[str, str]]) -> bool:
    return any(m["role"] == "user" and m["content"] == REVEAL for m in conversation)


class TestbedUser:
    """The scripted user of the testbed task (module docstring); deterministic."""

    def describe(self) -> dict[str, Any]:
        return {"user": "testbed"}

    def respond(self, conversations: Sequence[Sequence[dict[str, str]]], profiles: Sequence[Any],
                seeds: Sequence[int]) -> list[UserTurn]:
        out = []
        for conv in conversations:
            reply, known = conv[-1]["content"], is_known(conv[:-1])
            if reply not in REPLIES:
                raise ValueError(f"the testbed user got the reply {reply!r}; allowed: {', '.join(REPLIES)}")
            if reply == "ask":
                out.append(UserTurn("i told you" if known else REVEAL))
            elif reply == "guess":
                out.append(UserTurn("no"))
            else:
                out.append(UserTurn("right", done=True) if known else UserTurn("you do not know it"))
        return out


class TestbedReward:
    """The score of a conversation: its last reply's (1 for a known answer, GUESS_CREDIT for a guess, else 0).

    Args:
        verifier: score only whether the task is solved (1 for a known answer, else 0): the env's verifier, which
            ends a dialogue solved at its last turn as ``terminated``.
    """

    def __init__(self, verifier: bool = False):
        self.verifier = verifier

    def describe(self) -> dict[str, Any]:
        return {"reward": "testbed", "guess_credit": 0.0 if self.verifier else GUESS_CREDIT}

    def score(self, conversations: Sequence[Sequence[dict[str, str]]], profiles: Any = None) -> np.ndarray:
        scores = [reward(REPLIES.index(c[-1]["content"]), is_known(c[:-1])) for c in conversations]
        return np.array([float(x == 1.0) for x in scores] if self.verifier else scores)


def reward(reply: int, known: bool) -> float:
    return 1.0 if reply == ANSWER and known else GUESS_CREDIT if reply == GUESS else 0.0


class TestbedTask:
    """``task=testbed``: the same opening in every row (``rows`` per split), the testbed user and reward."""

    __test__ = False  # not a pytest class
    name = "testbed"
    default_user = "testbed"
    default_reward = "testbed"

    def __init__(self, rows: int = 8):
        self.n = int(rows)

    def rows(self, split: str = "train") -> list[TaskRow]:
        return [TaskRow(id=f"testbed-{split}-{i}", messages=[{"role": "user", "content": OPENING}])
                for i in range(self.n)]

    def make_user(self, spec: str, engine: Any) -> Any:
        return TestbedUser() if spec == "testbed" else None

    def make_reward(self, spec: str) -> Any:
        return TestbedReward() if spec == "testbed" else TestbedReward(verifier=True) if spec == "verifier" else None

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "rows": self.n}


TestbedUser.__test__ = False  # type: ignore[attr-defined]
TestbedReward.__test__ = False  # type: ignore[attr-defined]
TASKS.setdefault("testbed", TestbedTask)  # so an agent's EnvSettings can name it (task=testbed)


