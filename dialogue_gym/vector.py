"""``DialogueVectorEnv``: N conversations stepped together with one batched user call and one reward call.

Registered as the ``vector_entry_point`` of ``MultiTurnDialogue-v0``, so
``gym.make_vec("MultiTurnDialogue-v0", num_envs=N)`` returns it. Its sub-env ``i`` behaves exactly like a
:class:`DialogueEnv` reset with seed ``seed + i`` (same rows, same user seeds); only the model calls are batched.

Forking: ``reset(options={"states": [s0, s0, s1, s1]})`` puts each sub-env at the given state. The first
occurrence of a state keeps the state's own random stream (so it continues exactly as the original would); the
k-th repeat gets a stream forked from the state and ``k``, so branches differ but the batch is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from dialogue_gym.conversation import DialogueError, DialogueState, Message
from dialogue_gym.core import DialogueCore
from dialogue_gym.env import EnvContract, make_config, start_state, transcript
from dialogue_gym.spaces import Conversation, Utterance

VECTOR_RESET_OPTIONS = ("states", "task_indices", "messages", "reset_mask")

# One observation per sub-env (its messages, copied); an action per sub-env: the assistant's message, or None to sit
# the step out. Rewards, terminated and truncated are numpy arrays of shape (N,).
VectorObs = tuple[list[Message], ...]
VectorAction = Sequence[str | None]


class DialogueVectorEnv(EnvContract, VectorEnv[VectorObs, VectorAction, np.ndarray]):
    """A natively batched dialogue env.

    Args:
        num_envs: number of conversations.
        autoreset_mode: ``AutoresetMode.NEXT_STEP`` (Gymnasium's default: a finished sub-env is reset on the
            following ``step``, whose action for it is ignored) or ``AutoresetMode.DISABLED`` (finished sub-envs
            stay finished, do no work and ignore their actions until ``reset(options={"reset_mask": ...})``).
        render_mode: ``"ansi"`` (``render`` returns transcripts) or None.
        **kwargs: the fields of :class:`dialogue_gym.core.EnvConfig`.

    Observations are tuples of N conversations; rewards, ``terminated`` and ``truncated`` are arrays of shape
    (N,); ``info`` is a dict of arrays with ``_key`` masks (Gymnasium's vector convention), plus ``"active"``:
    which sub-envs took a turn in this step. An action of ``None`` makes a running sub-env sit the step out
    (no model calls, no change), so agents can stop branches at different turns.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["ansi"]}

    def __init__(self, num_envs: int = 1, autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 render_mode: str | None = None, **kwargs: Any):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise DialogueError(f"num_envs must be a positive integer, got {num_envs!r}")
        mode = AutoresetMode(autoreset_mode) if isinstance(autoreset_mode, str) else autoreset_mode
        if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED):
            raise DialogueError(f"autoreset_mode is {autoreset_mode!r}; allowed: NEXT_STEP, DISABLED")
        if render_mode not in (None, "ansi"):
            raise DialogueError(f"render_mode is {render_mode!r}; allowed: None, 'ansi'")
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.core = DialogueCore(make_config(kwargs))
        self.single_observation_space = Conversation(self.core.config.max_turns)
        self.single_action_space = Utterance(self.core.config.max_action_chars)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._states: list[DialogueState | None] = [None] * num_envs
        self._autoreset = np.zeros(num_envs, dtype=bool)

    @property
    def autoreset_mode(self) -> AutoresetMode:
        return self.metadata["autoreset_mode"]

    # ---- reset -----------------------------------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[VectorObs, dict[str, Any]]:
        """Reset all sub-envs, or those in ``options["reset_mask"]``.

        Args:
            seed: an int (sub-env ``i`` gets ``seed + i``), a list of N seeds (None entries keep their RNG), or
                None.
            options: at most one of ``"states"`` (N states; repeats fork), ``"task_indices"`` (N row indices),
                ``"messages"`` (N message prefixes); optionally ``"reset_mask"`` (bool array (N,)): only those
                sub-envs are reset and the per-env lists are indexed by sub-env.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(VECTOR_RESET_OPTIONS))
        if unknown:
            raise DialogueError(f"unknown reset option(s) {unknown}; allowed: {', '.join(VECTOR_RESET_OPTIONS)}")
        starts = [k for k in ("states", "task_indices", "messages") if k in options]
        if len(starts) > 1:
            raise DialogueError(f"reset options {starts} conflict: give at most one of them")
        mask = self._mask(options.get("reset_mask"))
        seeds = self._seeds(seed)
        per_env: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if starts:
            key = starts[0]
            values = options[key]
            listlike = isinstance(values, Sequence) and not isinstance(values, (str, bytes))
            if not listlike or len(values) != self.num_envs:
                raise DialogueError(f"options[{key!r}] must be a list of {self.num_envs} entries (one per sub-env)")
            single = {"states": "state", "task_indices": "task_index", "messages": "messages"}[key]
            seen: dict[str, int] = {}
            for i, v in enumerate(values):
                if not mask[i]:
                    continue
                per_env[i] = {single: v}
                if key == "states":
                    # the k-th repeat of the same state is fork branch k
                    ident = v.to_json() if isinstance(v, DialogueState) else repr(sorted(v.items())) \
                        if isinstance(v, dict) else repr(v)
                    per_env[i]["branch"] = seen.get(ident, 0)
                    seen[ident] = per_env[i]["branch"] + 1
        rngs = list(self._rngs)
        for i, s in enumerate(seeds):
            if mask[i] and s is not None:
                rngs[i] = seeding.np_random(s)[0]
        new_states: list[DialogueState | None] = list(self._states)
        for i in range(self.num_envs):
            if mask[i]:
                try:
                    new_states[i] = start_state(self.core, _single(per_env[i]), rngs[i])
                except DialogueError as e:
                    raise DialogueError(f"sub-env {i}: {e}") from None
        pending = [new_states[i] for i in range(self.num_envs) if mask[i]]
        self.core.answer_prefixes([s for s in pending if s is not None])  # one batched call for prefixes
        self._rngs, self._states = rngs, new_states
        self._autoreset[mask] = False
        return self._observations(), self._reset_info(mask)

    def _mask(self, mask: object) -> np.ndarray:
        if mask is None:
            return np.ones(self.num_envs, dtype=bool)
        arr = np.asarray(mask)
        if arr.shape != (self.num_envs,) or arr.dtype != bool:
            raise DialogueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), "
                                f"got dtype {arr.dtype} shape {arr.shape}")
        return arr

    def _seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + i for i in range(self.num_envs)]
        if isinstance(seed, Sequence) and len(seed) == self.num_envs:
            return [None if s is None else int(s) for s in seed]
        raise DialogueError(f"seed must be an int, None, or a list of {self.num_envs} seeds, got {seed!r}")

    # ---- step ------------------------------------------------------------------------------------------------

    def step(self, actions: VectorAction) -> tuple[VectorObs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Take one assistant turn in every active sub-env: one batched user call, one batched reward call.

        Raises:
            DialogueError: before any change, when an active sub-env's action is invalid (naming the sub-env).
        """
        states = self._started("step")
        if isinstance(actions, (str, bytes)) or len(actions) != self.num_envs:
            raise DialogueError(f"actions must be a sequence of {self.num_envs} strings (one per sub-env)")
        resetting = self._autoreset.copy() if self.autoreset_mode == AutoresetMode.NEXT_STEP else \
            np.zeros(self.num_envs, dtype=bool)
        # an explicit None lets a running sub-env sit this step out (agents stop branches at their own turn)
        active = np.array([not resetting[i] and not states[i].done and actions[i] is not None
                           for i in range(self.num_envs)])
        if self.autoreset_mode == AutoresetMode.DISABLED and all(s.done for s in states):
            raise DialogueError("every sub-env has ended; reset them with reset(options={'reset_mask': ...})")
        idx = [int(i) for i in np.flatnonzero(active)]
        texts = {i: self.core.validate_action(actions[i], f"actions[{i}]") for i in idx}
        working = [states[i].copy() for i in idx]
        results = self.core.advance(working, [texts[i] for i in idx]) if idx else []
        new_states = list(states)
        rewards = np.zeros(self.num_envs)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        for i, w, r in zip(idx, working, results):
            new_states[i] = w
            rewards[i], terminated[i], truncated[i] = r.reward, r.terminated, r.truncated
            infos = self._add_info(infos, r.info, i)
        if resetting.any():
            for i in map(int, np.flatnonzero(resetting)):
                new_states[i] = start_state(self.core, {}, self._rngs[i])
                infos = self._add_info(infos, {"turn": 0, "task_row": new_states[i].task_row}, i)
        self._states = list(new_states)
        infos["active"] = active
        self._autoreset = terminated | truncated
        return self._observations(), rewards, terminated, truncated, infos

    # ---- access ----------------------------------------------------------------------------------------------

    def get_states(self) -> list[DialogueState]:
        """Snapshots (copies) of every sub-env's conversation."""
        return [s.copy() for s in self._started("get_states")]

    def _started(self, caller: str) -> list[DialogueState]:
        """Every sub-env's state (not copied); raises when the env was not reset yet."""
        states = [s for s in self._states if s is not None]
        if len(states) != self.num_envs:
            raise DialogueError(f"{caller}() called before reset(); call reset() first")
        return states

    def get_state(self, index: int) -> DialogueState:
        """Snapshot (copy) of sub-env ``index``."""
        if not 0 <= index < self.num_envs:
            raise DialogueError(f"index must be in [0, {self.num_envs - 1}], got {index}")
        return self.get_states()[index]

    @property
    def done(self) -> np.ndarray:
        """Which sub-envs' episodes have ended, shape (N,)."""
        return np.array([s is not None and s.done for s in self._states])

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        return tuple(transcript(s.messages) if s is not None else "" for s in self._states)

    def _observations(self) -> VectorObs:
        return tuple([dict(m) for m in s.messages] if s is not None else [] for s in self._states)

    def _reset_info(self, mask: np.ndarray) -> dict[str, Any]:
        infos: dict[str, Any] = {}
        for i in map(int, np.flatnonzero(mask)):
            s = self._states[i]
            if s is None:  # every masked sub-env was just given a state; a None here is a bug in reset
                raise RuntimeError(f"sub-env {i} has no state after reset")
            infos = self._add_info(infos, {"turn": s.turn, "task_row": s.task_row}, i)
        return infos


def _single(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if not (k == "branch" and v == 0)}
