"""The shared machinery of the numeric wrappers: N dialogues behind fixed-size observations and actions.

Stable-Baselines3 (and most RL libraries) accept Box, Discrete, MultiDiscrete, MultiBinary and Dict spaces only;
a dialogue's observation is a list of messages and its action a string. A wrapper here turns one sub-env's
conversation into a numeric observation and a numeric action into (part of) an assistant message.

Every wrapper is written once, for a batch: :class:`BatchedWrapper` drives a native
:class:`~dialogue_gym.vector.DialogueVectorEnv` (autoreset disabled), so a step of N wrapped sub-envs is one
batched user call and one batched reward call (or none, when no sub-env finished a message this step). The
single Gymnasium env (:class:`SingleEnv`) is the batch of one, and the Stable-Baselines3 ``VecEnv``
(:mod:`dialogue_gym.wrappers.sb3`) is the batch of N with autoreset, so both follow identical rules.

Replies that would be blank (an end-of-turn token before any text, a blank sampled candidate) cannot be sent to
the env (it rejects blank messages); they end the episode with ``terminated=True`` and ``blank_reward``, and
``info["blank_reply"]`` is True.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from dialogue_gym.conversation import DialogueError

Conversation = list[dict[str, str]]


def make_dialogue_vec(num_envs: int, **env_kwargs: Any) -> Any:
    """The native vector env the wrappers drive (autoreset disabled: the wrapper decides when rows reset)."""
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=num_envs, autoreset_mode="Disabled", **env_kwargs)


class BatchedWrapper:
    """N dialogues with numeric observations and actions; subclasses define the translation.

    Args:
        venv: a :class:`~dialogue_gym.vector.DialogueVectorEnv` in ``AutoresetMode.DISABLED``.
        blank_reward: the reward of a step whose reply is blank (the episode then ends, terminated).

    Subclasses set ``observation_space`` and ``action_space`` (of one sub-env) and implement
    :meth:`_begin` (rows start a new assistant turn), :meth:`_texts` (actions to finished messages) and
    :meth:`_observe` (observations of all rows, plus terminal observations of rows that just ended).
    """

    observation_space: gym.Space
    action_space: gym.Space
    render_mode: str | None = None

    def __init__(self, venv: Any, blank_reward: float = -1.0):
        if getattr(venv, "autoreset_mode", None) != AutoresetMode.DISABLED:
            raise DialogueError("the wrapped vector env must use autoreset_mode='Disabled' "
                                "(build it with dialogue_gym.wrappers.make_dialogue_vec)")
        self.venv = venv
        self.num_envs: int = venv.num_envs
        self.blank_reward = float(blank_reward)
        self.rngs = [np.random.default_rng() for _ in range(self.num_envs)]  # per-row streams (candidate seeds)
        self.done = np.zeros(self.num_envs, dtype=bool)
        self.conversations: list[Conversation] = [[] for _ in range(self.num_envs)]

    # ---- hooks -----------------------------------------------------------------------------------------------

    def _begin(self, rows: np.ndarray) -> None:
        """Rows ``rows`` (indices) now wait for a new assistant message (after a reset or a user turn)."""
        raise NotImplementedError

    def _texts(self, actions: np.ndarray) -> list[str | None]:
        """Per row: the finished assistant message (``""`` for a blank one), or None when the turn goes on."""
        raise NotImplementedError

    def _observe(self, terminal: dict[int, Conversation]) -> tuple[Any, dict[int, Any]]:
        """Observations of all rows (batched, leading dim N), and of the conversations in ``terminal`` (by row)."""
        raise NotImplementedError

    # ---- the batch API ---------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, list[dict]]:
        """Reset every row. ``seed`` s seeds row i's dialogue and its wrapper stream with s + i."""
        convs, info = self.venv.reset(seed=seed, options=options)
        if seed is not None:
            self.rngs = [np.random.default_rng([int(seed) + i, 1]) for i in range(self.num_envs)]
        self.conversations = [list(c) for c in convs]
        self.done[:] = False
        self._begin(np.arange(self.num_envs))
        obs, _ = self._observe({})
        return obs, [{"turn": int(info["turn"][i]), "task_row": info["task_row"][i]} for i in range(self.num_envs)]

    def reset_rows(self, mask: np.ndarray) -> None:
        """Start new episodes in the rows of ``mask`` (bool, (N,)), each from its own RNG stream."""
        convs, _ = self.venv.reset(options={"reset_mask": np.asarray(mask, dtype=bool)})
        for i in np.flatnonzero(mask):
            self.conversations[i] = list(convs[i])
        self.done[mask] = False
        self._begin(np.flatnonzero(mask))

    def step(self, actions: Sequence[Any] | np.ndarray, autoreset: bool = False
             ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """One wrapped step of every row; rows whose episode ended ignore their action until reset.

        With ``autoreset`` rows that end are reset at once and their final observation is in
        ``infos[i]["terminal_observation"]`` (Stable-Baselines3's convention).

        Returns:
            observations (leading dim N), rewards (N,), terminated (N,), truncated (N,), one info dict per row.
        """
        actions = np.asarray(actions).reshape(self.num_envs, *(self.action_space.shape or ()))
        n = self.num_envs
        rewards, terminated, truncated = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        running = ~self.done
        texts = self._texts(actions)
        send: list[str | None] = [None] * n
        for i in np.flatnonzero(running):
            if texts[i] is None:
                continue
            if not texts[i].strip():  # the env rejects blank messages: end the episode here
                rewards[i], terminated[i] = self.blank_reward, True
                infos[i].update(turn_ended=True, blank_reply=True)
            else:
                send[i] = texts[i]
        stepped = np.array([s is not None for s in send])
        if stepped.any():
            convs, r, te, tr, info = self.venv.step(send)
            for i in np.flatnonzero(stepped):
                self.conversations[i] = list(convs[i])
                rewards[i], terminated[i], truncated[i] = r[i], te[i], tr[i]
                infos[i].update(turn_ended=True, blank_reply=False, reply=send[i],
                                user_message=info["user_message"][i], dialogue_turn=int(info["turn"][i]))
                if info.get("_score", np.zeros(n, dtype=bool))[i]:
                    infos[i]["score"] = float(info["score"][i])
        ended = running & (terminated | truncated)
        self.done |= ended
        self._begin(np.flatnonzero(stepped & ~ended))
        terminal: dict[int, Conversation] = {}
        if autoreset and ended.any():
            terminal = {int(i): list(self.conversations[i]) for i in np.flatnonzero(ended)}
            self.reset_rows(ended)
        obs, final = self._observe(terminal)
        for i, o in final.items():
            infos[i]["terminal_observation"] = o
        return obs, rewards, terminated, truncated, infos

    def close(self) -> None:
        self.venv.close()


def single_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A single env's reset options (``state``, ``task_index``, ``messages``) as the vector env's (lists of one)."""
    if not options:
        return None
    names = {"state": "states", "task_index": "task_indices", "messages": "messages"}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise DialogueError(f"unknown reset option(s) {unknown}; allowed: {', '.join(names)}")
    return {names[k]: [v] for k, v in options.items()}


class SingleEnv(gym.Env):
    """A Gymnasium env that is a :class:`BatchedWrapper` of one row (what ``check_env`` and single-env code use).

    Args:
        batched: the wrapper, built over a vector env of one sub-env.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, batched: BatchedWrapper, render_mode: str | None = None):
        if batched.num_envs != 1:
            raise DialogueError(f"SingleEnv wraps a batch of one sub-env, got {batched.num_envs}")
        if render_mode not in (None, "ansi"):
            raise DialogueError(f"render_mode is {render_mode!r}; allowed: None, 'ansi'")
        self.batched = batched
        self.render_mode = render_mode
        self.observation_space = batched.observation_space
        self.action_space = batched.action_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        obs, infos = self.batched.reset(seed=seed, options=single_options(options))
        return _row(obs), infos[0]

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self.batched.done[0]:
            raise DialogueError("the episode has ended (terminated or truncated); call reset() to start another")
        obs, r, te, tr, infos = self.batched.step(np.asarray(action)[None])
        return _row(obs), float(r[0]), bool(te[0]), bool(tr[0]), infos[0]

    def get_state(self) -> Any:
        """The dialogue state of the wrapped conversation (see :meth:`DialogueVectorEnv.get_state`)."""
        return self.batched.venv.get_state(0)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n".join(f"[{m['role']}] {m['content']}" for m in self.batched.conversations[0])

    def close(self) -> None:
        self.batched.close()


def _row(obs: Any, i: int = 0) -> Any:
    if isinstance(obs, dict):
        return {k: v[i] for k, v in obs.items()}
    return obs[i]
