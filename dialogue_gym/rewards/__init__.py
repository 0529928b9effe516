"""Reward models served inside the env: LLM judge (embedded default), task verifiers, trained reward models."""

from __future__ import annotations

from typing import Any

from dialogue_gym.conversation import DialogueError
from dialogue_gym.rewards.base import RewardModel
from dialogue_gym.rewards.judge import LLMJudge

__all__ = ["LLMJudge", "RewardModel", "build_reward"]


def build_reward(spec: Any, task: Any, config: Any) -> RewardModel:
    """A reward model from a spec: an instance (used as is), ``"judge"`` (LLM judge on ``config.model``), a
    task-specific name (e.g. ``"verifier"``), or a path / hub id of a trained reward model."""
    if isinstance(spec, RewardModel):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise DialogueError(f"reward must be a name, a path or a RewardModel instance, got {spec!r}")
    made = task.make_reward(spec)
    if made is not None:
        return made
    if spec == "judge":
        return LLMJudge(config.model)
    raise DialogueError(f"reward is {spec!r}; allowed: 'judge', a task-specific reward of task {task.name!r}, "
                        "a reward-model directory, or a RewardModel instance")
