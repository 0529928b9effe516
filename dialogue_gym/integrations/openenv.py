"""dialogue-gym as an OpenEnv environment: a server built on ``openenv.core``'s FastAPI app and a typed client.

    python -m dialogue_gym.serve_env +env=clarify port=8000          # the server (see dialogue_gym/serve_env.py)

    from dialogue_gym.integrations.openenv import DialogueGymClient
    with DialogueGymClient(base_url="http://127.0.0.1:8000").sync() as env:
        r = env.reset(seed=0)                       # r.observation.messages: the opening
        r = env.step("How many apples at the start?")
        saved = env.state().dialogue_state()        # our JSON DialogueState, over the wire
        r = env.reset(state=saved)                  # fork: continue exactly from the snapshot

## Sessions
Each WebSocket connection is one session (openenv's ``HTTPEnvServer``): its own :class:`DialogueEnvironment`, with
its own episode, its own seeded RNG and its own snapshot, built from the server's env keyword arguments (the
fields of :class:`~dialogue_gym.core.EnvConfig`, as ``gym.make`` takes them). Every session shares one
process-wide :class:`SharedDialogue`: one :class:`~dialogue_gym.core.DialogueCore`, so the task, the simulated user
and the reward model (and their engines) load once. ``max_sessions`` caps the sessions; one more is refused with
openenv's capacity error ("Server at capacity: N/N sessions active").

## Batching (how concurrent sessions share one user call and one reward call)
A step is a coroutine (``step_async``) that validates the action, copies the session's state and hands it to the
:class:`StepBatcher` of the event loop. The batcher flushes when every running session (no finished episode, no step
already in a batch) has handed in its step, or ``batch_window_s`` after the first pending step, whichever comes
first; a flush advances all pending states with one :meth:`DialogueCore.advance` call: one batched user call and one
batched reward call, on one worker thread, so model calls never overlap. Steps that arrive while a batch runs wait
for the next one. A session's result is exactly what a :class:`~dialogue_gym.env.DialogueEnv` with the same seed
would give: ``advance`` treats each state on its own (per-state RNG streams), only the model calls are shared.

## Errors
Bad input never reaches a model and never ends a session: an invalid action, unknown reset option or malformed
state comes back as an observation whose ``error`` is ``{"type": "DialogueError", "field": ..., "message": ...}``
(the env's own message: which field, what was wrong, what is allowed); the session keeps its episode and other
sessions are untouched. :class:`DialogueGymClient` raises it as :class:`RemoteDialogueError`. A request is plain
JSON: the server builds nothing from it but messages and a validated ``DialogueState`` (no code, no pickles, no
model or task names: the configuration is fixed when the server starts). A state that passes those checks but
cannot be played (a free-form prefix without the profile its task's user needs) fails inside the batched call; that
batch is then retried state by state, so only that session gets the error (``field`` ``"state"``, its episode
unchanged; its later steps are refused before they join a batch, until it resets). A failure of a model itself
(or a budget run out) fails every step of its batch, each session keeping its previous state.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gymnasium.utils import seeding

from dialogue_gym.conversation import DialogueError, DialogueState
from dialogue_gym.core import DialogueCore, StepResult
from dialogue_gym.env import RESET_OPTIONS, check_reset_options, make_config, start_state
from dialogue_gym.integrations import INSTALL_HINT

try:
    from fastapi import FastAPI
    from openenv.core.client_types import StepResult as WireResult
    from openenv.core.env_client import EnvClient
    from openenv.core.env_server.http_server import create_fastapi_app
    from openenv.core.env_server.interfaces import Environment
    from openenv.core.env_server.types import Action, Observation, State
    from pydantic import Field
except ImportError as e:  # pragma: no cover - exercised by a subprocess test without the package
    raise ImportError(f"dialogue_gym.integrations.openenv needs OpenEnv (the `openenv` package): {INSTALL_HINT}"
                      ) from e

__all__ = ["DialogueAction", "DialogueEnvironment", "DialogueGymClient", "DialogueGymState", "DialogueObservation",
           "RemoteDialogueError", "SharedDialogue", "StepBatcher", "create_app"]

RESET_KWARGS = ("seed", "episode_id", *RESET_OPTIONS)


# ---- wire types ------------------------------------------------------------------------------------------------


class DialogueAction(Action):
    """The assistant's next message. ``content`` is typed loosely on purpose: the env validates it and answers a
    non-string, blank or too long message with its own error (field, what was wrong, what is allowed)."""

    content: Any = Field(description="the assistant's next message: a non-blank string of at most max_action_chars")


class DialogueObservation(Observation):
    """The conversation after a reset or a step, with the env's step outputs.

    ``done`` is ``terminated or truncated``; ``reward`` is the env's reward of the step (None after a reset or an
    error). ``error`` is set (and nothing else changed) when the request was refused.
    """

    messages: list[dict[str, str]] = Field(default_factory=list, description="the conversation so far")
    turn: int = Field(default=0, description="assistant turns taken so far")
    terminated: bool = Field(default=False, description="the user or the task ended the conversation")
    truncated: bool = Field(default=False, description="max_turns was reached without that")
    info: dict[str, Any] = Field(default_factory=dict, description="the env's info dict of the reset or step")
    error: dict[str, str] | None = Field(default=None, description="a refused request: type, field, message")


class DialogueGymState(State):
    """``state``: the session's JSON :class:`~dialogue_gym.conversation.DialogueState` (None before a reset)."""

    dialogue: dict[str, Any] | None = Field(default=None, description="DialogueState.to_dict() of the episode")

    def dialogue_state(self) -> DialogueState:
        """The snapshot as a :class:`DialogueState` (to pass back to ``reset(state=...)``, here or in process)."""
        if self.dialogue is None:
            raise DialogueError("the session has no episode yet; call reset() first")
        return DialogueState.from_dict(self.dialogue)


class RemoteDialogueError(DialogueError):
    """A request the server refused with the env's :class:`DialogueError`.

    Attributes:
        field: the request field at fault (``"action.content"``, ``"state"``, ``"messages"``, ``"seed"``, ...).
        message: the env's message: what was wrong and what is allowed.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---- server side -----------------------------------------------------------------------------------------------


class SharedDialogue:
    """What every session of one server shares: one :class:`DialogueCore` and the thread its models run on.

    Args:
        env_kwargs: the fields of :class:`~dialogue_gym.core.EnvConfig` (what ``gym.make`` takes).
        batch_window_s: longest wait, in seconds, from a session's step to the batch that carries it.
    """

    def __init__(self, env_kwargs: Mapping[str, Any] | None = None, batch_window_s: float = 0.02):
        if isinstance(batch_window_s, bool) or not isinstance(batch_window_s, (int, float)) or batch_window_s < 0:
            raise DialogueError(f"batch_window_s must be a number of seconds >= 0, got {batch_window_s!r}")
        self.core = DialogueCore(make_config(dict(env_kwargs or {})))
        self.batch_window_s = float(batch_window_s)
        self.lock = threading.Lock()  # the core (its models, its counters) serves one caller at a time
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dialogue-gym-models")
        self.batch_sizes: list[int] = []  # one entry per advance call: how many sessions it carried
        self._sessions: weakref.WeakSet[DialogueEnvironment] = weakref.WeakSet()
        self._batchers: dict[int, StepBatcher] = {}

    def register(self, env: DialogueEnvironment) -> None:
        self._sessions.add(env)

    def unregister(self, env: DialogueEnvironment) -> None:
        self._sessions.discard(env)

    def running_sessions(self) -> int:
        """Sessions that may send a step (see :attr:`DialogueEnvironment.running`)."""
        return sum(1 for s in list(self._sessions) if s.running)

    def batcher(self) -> StepBatcher:
        """The batcher of the running event loop (one per loop: futures belong to their loop)."""
        loop = asyncio.get_running_loop()
        key = id(loop)
        if key not in self._batchers or self._batchers[key].loop is not loop:
            self._batchers[key] = StepBatcher(self, loop)
        return self._batchers[key]

    def advance(self, states: list[DialogueState], texts: list[str]) -> list[StepResult]:
        """One turn for ``states`` (in place): one user call and one reward call for all of them."""
        with self.lock:
            self.batch_sizes.append(len(states))
            return self.core.advance(states, texts)

    def start(self, options: dict[str, Any], np_random: Any) -> DialogueState:
        """A starting state (a prefix ending with an assistant turn asks the user first)."""
        with self.lock:
            return start_state(self.core, options, np_random)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


class StepBatcher:
    """Collects the steps of concurrent sessions and advances them together (see the module docstring)."""

    def __init__(self, shared: SharedDialogue, loop: asyncio.AbstractEventLoop):
        self.shared = shared
        self.loop = loop
        self._pending: list[tuple[DialogueEnvironment, DialogueState, str,
                                  asyncio.Future[tuple[DialogueState, StepResult]]]] = []
        self._first_at = 0.0  # loop time of the oldest pending step
        self._timer: asyncio.TimerHandle | None = None
        self._flushing = asyncio.Lock()

    async def submit(self, session: DialogueEnvironment, state: DialogueState, text: str
                     ) -> tuple[DialogueState, StepResult]:
        """Advance ``state`` (a copy ``session`` owns) by ``text`` in the next batch; returns the advanced state (a
        fresh copy where the batch had to be retried state by state) and its result."""
        fut: asyncio.Future[tuple[DialogueState, StepResult]] = self.loop.create_future()
        if not self._pending:
            self._first_at = self.loop.time()
        self._pending.append((session, state, text, fut))
        session._stepping = True
        if self.shared.running_sessions() == 0:
            self._schedule(0.0)  # every session that could step has stepped: no reason to wait
        elif self._timer is None:
            self._schedule(self.shared.batch_window_s)
        return await fut

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        async with self._flushing:  # one batch at a time; steps that arrive meanwhile form the next batch
            if not self._pending:
                return
            # A batch that just finished frees its sessions: give them the rest of the window to join this one.
            left = self._first_at + self.shared.batch_window_s - self.loop.time()
            if self.shared.running_sessions() > 0 and left > 0:
                self._schedule(left)
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, self._pending = self._pending, []
            try:
                results = await self.loop.run_in_executor(
                    self.shared.executor, self.shared.advance, [b[1] for b in batch], [b[2] for b in batch])
            except Exception as e:
                if len(batch) == 1 or not isinstance(e, DialogueError):
                    # a model failure (or a budget run out) fails the whole batch; each session keeps its old state
                    for item in batch:
                        self._settle(item, error=e)
                    return
                # A DialogueError is about one state (say a profile its task's user cannot play) and must not fail
                # the other sessions: each steps again alone, on a fresh copy of its session's state (the batch may
                # have changed the copies it held before it raised).
                for session, _, text, fut in batch:
                    state = session._state.copy() if session._state is not None else None
                    try:
                        alone = await self.loop.run_in_executor(self.shared.executor, self.shared.advance, [state],
                                                                [text])
                    except Exception as each:
                        self._settle((session, state, text, fut), error=each)
                    else:
                        self._settle((session, state, text, fut), result=alone[0])
                return
            for item, r in zip(batch, results):
                self._settle(item, result=r)

    @staticmethod
    def _settle(item: tuple[DialogueEnvironment, Any, str, asyncio.Future[tuple[DialogueState, StepResult]]],
                result: StepResult | None = None, error: BaseException | None = None) -> None:
        session, state, _, fut = item
        session._stepping = False  # before its coroutine resumes, so the next flush counts it as running
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result((state, result))


class DialogueEnvironment(Environment[DialogueAction, DialogueObservation, DialogueGymState]):
    """One session: one episode over the server's shared :class:`DialogueCore`.

    ``reset(seed=None, episode_id=None, state=..., branch=..., messages=..., profile=..., task_index=...)`` takes
    :class:`~dialogue_gym.env.DialogueEnv`'s reset options as keyword arguments (``state`` as the dict of
    ``DialogueState.to_dict()``); the first reset with a seed seeds the session's RNG as ``DialogueEnv.reset(seed)``
    does, so a session and an in-process env with the same seed give the same dialogue.
    """

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, shared: SharedDialogue):
        super().__init__()
        self.shared = shared
        self._np_random, _ = seeding.np_random()  # as gym.Env before its first seeded reset
        self._state: DialogueState | None = None
        self._episode_id: str | None = None
        self._steps = 0
        self._stepping = False
        self._unplayable: DialogueError | None = None  # why this episode's state cannot step (until a reset)
        shared.register(self)

    @property
    def running(self) -> bool:
        """The session may send a step soon: no finished episode (a session still before its first reset counts,
        so the sessions of a trainer that connect together also batch their first step) and no step in a batch
        already."""
        return (self._state is None or not self._state.done) and not self._stepping

    # ---- reset ---------------------------------------------------------------------------------------------------

    def _reset_options(self, seed: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Checked reset options and the request field to blame if starting fails."""
        unknown = sorted(set(kwargs) - set(RESET_OPTIONS))
        if unknown:
            raise _Refused(unknown[0], DialogueError(
                f"unknown reset argument(s) {unknown}; allowed: {', '.join(RESET_KWARGS)}"))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise _Refused("seed", DialogueError(f"seed must be a non-negative integer or null, got {seed!r:.60}"))
        options = {k: v for k, v in kwargs.items() if v is not None}
        try:
            check_reset_options(options)
        except DialogueError as e:
            raise _Refused("reset", e) from None
        field = next((k for k in ("state", "messages", "task_index") if k in options), "reset")
        return field, options

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> DialogueObservation:
        try:
            field, options = self._reset_options(seed, kwargs)
            rng = seeding.np_random(seed)[0] if seed is not None else self._np_random
            try:
                state = self.shared.start(options, rng)
            except DialogueError as e:
                raise _Refused(field, e) from None
        except _Refused as r:
            return self._refused(r)
        return self._begin(state, rng, episode_id)

    async def reset_async(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any
                          ) -> DialogueObservation:
        try:
            field, options = self._reset_options(seed, kwargs)
            rng = seeding.np_random(seed)[0] if seed is not None else self._np_random
            loop = asyncio.get_running_loop()
            try:  # a messages prefix may ask the user: on the model thread, never on the event loop
                state = await loop.run_in_executor(self.shared.executor, self.shared.start, options, rng)
            except DialogueError as e:
                raise _Refused(field, e) from None
        except _Refused as r:
            return self._refused(r)
        return self._begin(state, rng, episode_id)

    def _begin(self, state: DialogueState, rng: Any, episode_id: str | None) -> DialogueObservation:
        self._np_random, self._state, self._steps = rng, state, 0
        self._unplayable = None
        self._episode_id = episode_id or str(uuid.uuid4())
        info = {"turn": state.turn, "task_row": state.task_row, "fingerprint": state.config_fingerprint}
        return self._observation(None, info)

    # ---- step ----------------------------------------------------------------------------------------------------

    def _check_step(self, action: Any) -> tuple[DialogueState, str]:
        if self._state is None:
            raise _Refused("action", DialogueError("step() called before reset(); call reset() first"))
        if self._state.done:
            raise _Refused("action", DialogueError(
                "the episode has ended (terminated or truncated); call reset() to start another"))
        if self._unplayable is not None:  # refused before it joins (and fails) another batch
            raise _Refused("state", DialogueError(f"{self._unplayable} (this episode cannot step; reset to start "
                                                  "another)"))
        content = action.content if isinstance(action, DialogueAction) else action
        try:
            text = self.shared.core.validate_action(content, "action.content")
        except DialogueError as e:
            raise _Refused("action.content", e) from None
        return self._state.copy(), text  # a failure inside the user or reward model leaves the episode untouched

    def step(self, action: DialogueAction, timeout_s: float | None = None, **kwargs: Any) -> DialogueObservation:
        try:
            working, text = self._check_step(action)
        except _Refused as r:
            return self._refused(r)
        try:
            result = self.shared.advance([working], [text])[0]
        except DialogueError as e:  # this session's state cannot be played (its profile, say): it stays as it was
            self._unplayable = e
            return self._refused(_Refused("state", e))
        return self._finish(working, result)

    async def step_async(self, action: DialogueAction, timeout_s: float | None = None, **kwargs: Any
                         ) -> DialogueObservation:
        try:
            working, text = self._check_step(action)
        except _Refused as r:
            return self._refused(r)
        try:
            working, result = await self.shared.batcher().submit(self, working, text)
        except DialogueError as e:  # as in step(): refused for this session alone, which keeps its state
            self._unplayable = e
            return self._refused(_Refused("state", e))
        return self._finish(working, result)

    def _finish(self, working: DialogueState, result: StepResult) -> DialogueObservation:
        self._state = working
        self._steps += 1
        obs = self._observation(result.reward, dict(result.info))
        return obs

    # ---- state and observations ----------------------------------------------------------------------------------

    @property
    def state(self) -> DialogueGymState:
        return DialogueGymState(episode_id=self._episode_id, step_count=self._steps,
                                dialogue=None if self._state is None else self._state.to_dict())

    def _observation(self, reward: float | None, info: dict[str, Any]) -> DialogueObservation:
        s = self._state
        if s is None:
            return DialogueObservation(done=False, reward=None)
        return DialogueObservation(messages=[dict(m) for m in s.messages], turn=s.turn, terminated=s.terminated,
                                   truncated=s.truncated, done=s.done, reward=reward, info=info)

    def _refused(self, r: _Refused) -> DialogueObservation:
        obs = self._observation(None, {})
        obs.error = {"type": "DialogueError", "field": r.field, "message": str(r.error)}
        return obs

    def close(self) -> None:
        self.shared.unregister(self)


class _Refused(Exception):
    """A DialogueError and the request field it is about (internal: becomes an observation's ``error``)."""

    def __init__(self, field: str, error: DialogueError):
        super().__init__(str(error))
        self.field = field
        self.error = error


def create_app(env_kwargs: Mapping[str, Any] | None = None, *, max_sessions: int = 64, batch_window_s: float = 0.02,
               shared: SharedDialogue | None = None) -> FastAPI:
    """The OpenEnv FastAPI app serving dialogue-gym (openenv's ``create_fastapi_app`` over our environment).

    Args:
        env_kwargs: the env configuration (fields of :class:`~dialogue_gym.core.EnvConfig`); ignored when
            ``shared`` is given.
        max_sessions: most concurrent WebSocket sessions; one more is refused with a capacity error.
        batch_window_s: see :class:`SharedDialogue`.
        shared: an existing :class:`SharedDialogue` (tests read its counters); None builds one.

    Returns:
        The app; ``app.state.dialogue`` is the :class:`SharedDialogue`. Serve it with uvicorn.
    """
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
        raise DialogueError(f"max_sessions must be a positive integer, got {max_sessions!r}")
    shared = shared if shared is not None else SharedDialogue(env_kwargs, batch_window_s)
    app = create_fastapi_app(functools.partial(DialogueEnvironment, shared), DialogueAction, DialogueObservation,
                             max_concurrent_envs=max_sessions, env_name="dialogue_gym", state_cls=DialogueGymState)
    app.state.dialogue = shared
    return app


# ---- client ----------------------------------------------------------------------------------------------------


class DialogueGymClient(EnvClient[DialogueAction, DialogueObservation, DialogueGymState]):
    """openenv's WebSocket client for a dialogue-gym server: one instance is one session.

    ``step`` takes a :class:`DialogueAction` or the message string; ``reset`` takes the reset keyword arguments
    (``state`` may be a :class:`DialogueState`); ``state()`` returns a :class:`DialogueGymState`. A refused request
    raises :class:`RemoteDialogueError`; the session stays usable. Async by default (``await env.step(...)``);
    ``.sync()`` gives the blocking wrapper.
    """

    async def _reset_async(self, **kwargs: Any) -> WireResult[DialogueObservation]:
        if isinstance(kwargs.get("state"), DialogueState):  # the async and the .sync() paths both come here
            kwargs["state"] = kwargs["state"].to_dict()
        return await super()._reset_async(**kwargs)

    def _step_payload(self, action: DialogueAction | str) -> dict[str, Any]:
        if isinstance(action, DialogueAction):
            return action.model_dump()
        return {"content": action}

    def _parse_result(self, payload: dict[str, Any]) -> WireResult[DialogueObservation]:
        obs = DialogueObservation(**payload.get("observation", {}), reward=payload.get("reward"),
                                  done=payload.get("done", False))
        if obs.error is not None:
            raise RemoteDialogueError(obs.error.get("field", "?"), obs.error.get("message", ""))
        return WireResult(observation=obs, reward=obs.reward, done=obs.done, metadata=payload.get("metadata"))

    def _parse_state(self, payload: dict[str, Any]) -> DialogueGymState:
        return DialogueGymState(**payload)
