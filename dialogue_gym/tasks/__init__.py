"""Tasks: where conversations start and what the simulated user secretly knows."""

from __future__ import annotations

from typing import Any

from dialogue_gym.conversation import DialogueError
from dialogue_gym.tasks.anthropic_hh import AnthropicHHTask
from dialogue_gym.tasks.arithmetic import ArithmeticTask, CriticUser, VerifierReward, extract_answer, is_correct
from dialogue_gym.tasks.base import SPLITS, Task, TaskRow
from dialogue_gym.tasks.clarify import ClarifyTask, ClarifyUser
from dialogue_gym.tasks.embedded import EmbeddedTask
from dialogue_gym.tasks.ultrainteract import UltraInteractTask

__all__ = ["SPLITS", "AnthropicHHTask", "ArithmeticTask", "ClarifyTask", "ClarifyUser", "CriticUser", "EmbeddedTask",
           "Task", "TaskRow",
           "UltraInteractTask", "VerifierReward", "build_task", "extract_answer", "is_correct", "TASKS"]

TASKS: dict[str, Any] = {"embedded": EmbeddedTask, "arithmetic": ArithmeticTask, "clarify": ClarifyTask,
                         "ultrainteract": UltraInteractTask, "anthropic_hh": AnthropicHHTask}


def build_task(spec: Any, **kwargs: Any) -> Task:
    """A task from a name in :data:`TASKS` (with keyword arguments) or an instance (used as is)."""
    if isinstance(spec, Task):
        if kwargs:
            raise DialogueError(f"task_kwargs {sorted(kwargs)} given with a task instance; configure the instance")
        return spec
    if spec not in TASKS:
        raise DialogueError(f"task is {spec!r}; allowed: {', '.join(sorted(TASKS))}, or a Task instance")
    try:
        return TASKS[spec](**kwargs)
    except TypeError as e:
        raise DialogueError(f"bad task_kwargs for task {spec!r}: {e}") from None
