"""Reward models served inside the env: LLM judge (embedded default), task verifiers, trained reward models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dialogue_gym.conversation import DialogueError
from dialogue_gym.rewards.base import RewardModel
from dialogue_gym.rewards.classifier import SequenceClassifierReward, is_classifier_dir
from dialogue_gym.rewards.compose import Clip, LengthPenalty, RunningNorm, WeightedSum
from dialogue_gym.rewards.judge import LLMJudge, make_judge
from dialogue_gym.rewards.pairwise import PairwisePreferenceReward

__all__ = ["Clip", "LLMJudge", "LengthPenalty", "PairwisePreferenceReward", "RewardModel", "RunningNorm",
           "SequenceClassifierReward", "WeightedSum", "build_reward"]

PAIRWISE_PREFIX = "pairwise:"
CLASSIFIER_PREFIX = "classifier:"


def build_reward(spec: Any, task: Any, config: Any) -> RewardModel:
    """A reward model from a spec.

    Allowed specs, tried in this order:

    - a :class:`RewardModel` instance: used as is;
    - a task-specific name (e.g. arithmetic's ``"verifier"``);
    - ``"judge"``: the LLM judge on ``config.judge_model`` (default ``config.model``) with the judge's engine
      (HF in process, vLLM in process, or an OpenAI-compatible server; see :func:`make_judge`);
    - ``"pairwise:<model>"``: a pairwise preference model (a causal LM: ``embedded``, ``tiny``, a directory, a
      hub id), scoring the last reply against ``profile["reference"]``;
    - ``"classifier:<path or hub id>"``, or a local directory holding a sequence-classification model (as
      written by ``python -m agents.reward_model``): a Bradley-Terry reward model.
    """
    if isinstance(spec, RewardModel):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise DialogueError(f"reward must be a name, a path or a RewardModel instance, got {spec!r}")
    made = task.make_reward(spec)
    if made is not None:
        return made
    placement = {"device": getattr(config, "device", "auto"), "dtype": getattr(config, "dtype", "auto")}
    if spec == "judge":
        return make_judge(config)
    if spec.startswith(PAIRWISE_PREFIX):
        model = spec[len(PAIRWISE_PREFIX):].strip()
        if not model:
            raise DialogueError(f"reward is {spec!r}; 'pairwise:' needs a model after the colon, e.g. "
                                "'pairwise:embedded' or 'pairwise:/path/to/model'")
        return PairwisePreferenceReward(model, **placement)
    if spec.startswith(CLASSIFIER_PREFIX):
        model = spec[len(CLASSIFIER_PREFIX):].strip()
        if not model:
            raise DialogueError(f"reward is {spec!r}; 'classifier:' needs a directory or hub id after the colon")
        return SequenceClassifierReward(model, **placement)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_classifier_dir(path):
            return SequenceClassifierReward(str(path), **placement)
        raise DialogueError(
            f"reward directory {spec!r} does not hold a sequence-classification model (its config.json names no "
            "...ForSequenceClassification architecture); for a causal LM used as a pairwise judge write "
            f"'pairwise:{spec}'"
        )
    raise DialogueError(f"reward is {spec!r}; allowed: 'judge', a task-specific reward of task {task.name!r}, "
                        "'pairwise:<model>', 'classifier:<path or hub id>', a reward-model directory, or a "
                        "RewardModel instance")
