"""dialogue-gym: a Gymnasium environment for multi-turn dialogue RLHF.

``import dialogue_gym`` registers ``MultiTurnDialogue-v0`` (5 turns by default); ``gym.make`` gives a
:class:`DialogueEnv` and ``gym.make_vec`` the natively batched :class:`DialogueVectorEnv`.
"""

from __future__ import annotations

import gymnasium as gym

from dialogue_gym.conversation import DialogueError, DialogueState
from dialogue_gym.core import EnvConfig

__version__ = "0.1.0"
__all__ = ["DialogueEnv", "DialogueError", "DialogueState", "DialogueVectorEnv", "EnvConfig"]

ENV_ID = "MultiTurnDialogue-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="dialogue_gym.env:DialogueEnv",
        vector_entry_point="dialogue_gym.vector:DialogueVectorEnv",
        kwargs={"max_turns": 5},
    )


def __getattr__(name: str):  # lazy: importing the package should not import torch-heavy modules
    if name == "DialogueEnv":
        from dialogue_gym.env import DialogueEnv

        return DialogueEnv
    if name == "DialogueVectorEnv":
        from dialogue_gym.vector import DialogueVectorEnv

        return DialogueVectorEnv
    raise AttributeError(name)
