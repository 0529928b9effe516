"""A Stable-Baselines3 ``VecEnv`` over one native batched dialogue env (not N copies of a single env).

``DummyVecEnv([make_env] * N)`` would step N single envs one after another: N user calls and N reward calls per
step. :class:`DialogueSB3VecEnv` drives a :class:`~dialogue_gym.wrappers.base.BatchedWrapper` of N rows instead,
so every step makes at most one batched user call and one batched reward call for all sub-envs (exactly one
each when a turn ends somewhere, as every step of the candidate-choice wrapper does), with SB3's autoreset
convention: a finished row is reset at once and ``infos[i]["terminal_observation"]`` holds its final
observation; ``infos[i]["TimeLimit.truncated"]`` marks a truncation.

Needs the ``sb3`` extra (``pip install 'dialogue-gym[sb3]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as e:  # pragma: no cover - the extra is installed by `make test`
    raise ImportError("dialogue_gym.wrappers.sb3 needs stable-baselines3: pip install 'dialogue-gym[sb3]'") from e

from dialogue_gym.wrappers.base import BatchedWrapper


class DialogueSB3VecEnv(VecEnv):
    """Stable-Baselines3's vectorised-env interface over a batched dialogue wrapper.

    Args:
        batched: a :class:`~dialogue_gym.wrappers.token.TokenLevel` or
            :class:`~dialogue_gym.wrappers.choice.CandidateChoice` of N rows.
        seed: seed of the first reset (row i gets seed + i); ``seed()`` sets it for the next reset as usual.
    """

    def __init__(self, batched: BatchedWrapper, seed: int | None = None):
        self.batched = batched  # first: VecEnv.__init__ reads attributes through get_attr
        super().__init__(batched.num_envs, batched.observation_space, batched.action_space)
        self._first_seed = seed
        self._actions: np.ndarray | None = None

    def reset(self) -> Any:
        seed = self._seeds[0] if self._seeds[0] is not None else self._first_seed
        self._first_seed = None
        obs, infos = self.batched.reset(seed=seed)
        self.reset_infos = infos
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        assert self._actions is not None, "step_async must come first"
        obs, rewards, terminated, truncated, infos = self.batched.step(self._actions, autoreset=True)
        for i, info in enumerate(infos):
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, rewards.astype(np.float32), terminated | truncated, infos

    def close(self) -> None:
        self.batched.close()

    # ---- attribute access: the rows share one wrapper, so they share its attributes ---------------------------

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.batched, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.batched, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list:
        return [getattr(self.batched, method_name)(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs
