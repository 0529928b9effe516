"""Simulated users: the LLM user (REFUEL prompt format), a scripted user for tests, a replay user for datasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dialogue_gym.conversation import DialogueError
from dialogue_gym.users.base import UserSimulator, UserTurn
from dialogue_gym.users.llm import LLMUser, parse_question
from dialogue_gym.users.scripted import ReplayUser, ScriptedUser

__all__ = ["LLMUser", "ReplayUser", "ScriptedUser", "UserSimulator", "UserTurn", "build_user", "parse_question"]

USER_SPECS = ("llm", "replay", "scripted")


def build_user(spec: Any, task: Any, engine: Callable[[], Any], config: Any) -> UserSimulator:
    """A user simulator from a spec: an instance (used as is), ``"llm"``, ``"replay"``, ``"scripted"``, or a
    name the task itself provides (e.g. arithmetic's ``"critic"``)."""
    if isinstance(spec, UserSimulator):
        return spec
    if not isinstance(spec, str):
        raise DialogueError(f"user must be a name or a UserSimulator instance, got {type(spec).__name__}")
    made = task.make_user(spec, engine)
    if made is not None:
        return made
    if spec == "llm":
        return LLMUser(engine, temperature=config.user_temperature, top_p=config.user_top_p,
                       max_new_tokens=config.user_max_new_tokens)
    if spec == "replay":
        return ReplayUser()
    if spec == "scripted":
        return ScriptedUser()
    raise DialogueError(f"user is {spec!r}; allowed: {', '.join(USER_SPECS)}, a task-specific user of task "
                        f"{task.name!r}, or a UserSimulator instance")
