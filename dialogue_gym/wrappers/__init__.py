"""Numeric wrappers for libraries that accept only Box / Discrete / Dict spaces (Stable-Baselines3 and others).

- :class:`TokenEnv` / :class:`TokenLevel`: one step is one token of the assistant's reply; observation the padded
  token ids of the conversation window and its length; action ``Discrete(vocab)``.
- :class:`ChoiceEnv` / :class:`CandidateChoice`: each turn a frozen engine proposes K replies; observation a Box of
  features; action ``Discrete(K)``.
- :class:`dialogue_gym.wrappers.sb3.DialogueSB3VecEnv`: an SB3 ``VecEnv`` over the native batched env (one user
  call and one reward call per step for all sub-envs); needs the ``sb3`` extra.

The ``*Env`` classes are single Gymnasium envs (batches of one); the batched classes take a native vector env
from :func:`make_dialogue_vec`.
"""

from __future__ import annotations

from dialogue_gym.wrappers.base import BatchedWrapper, SingleEnv, make_dialogue_vec
from dialogue_gym.wrappers.choice import CandidateChoice, ChoiceEnv
from dialogue_gym.wrappers.token import TokenEnv, TokenLevel

__all__ = ["BatchedWrapper", "CandidateChoice", "ChoiceEnv", "SingleEnv", "TokenEnv", "TokenLevel",
           "make_dialogue_vec"]
