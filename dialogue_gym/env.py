"""``DialogueEnv``: one multi-turn conversation between a policy (the assistant) and a simulated user."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

import gymnasium as gym

from dialogue_gym.budget import Usage
from dialogue_gym.conversation import DialogueError, DialogueState
from dialogue_gym.core import DialogueCore, EnvConfig, StepResult, Timings, entropy_from
from dialogue_gym.spaces import Conversation, Utterance
from dialogue_gym.tasks.base import Task, TaskRow

RESET_OPTIONS = ("state", "branch", "messages", "profile", "task_index")


def make_config(kwargs: dict[str, Any]) -> EnvConfig:
    """An :class:`EnvConfig` from keyword arguments, with a clear error for unknown names."""
    allowed = [f.name for f in fields(EnvConfig)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise DialogueError(f"unknown env argument(s) {unknown}; allowed: {', '.join(allowed)}")
    return EnvConfig(**kwargs)


class EnvContract:
    """The public view of an env's configuration and counters, shared by :class:`DialogueEnv` and
    :class:`~dialogue_gym.vector.DialogueVectorEnv` (agents and benchmarks read these, never the core)."""

    core: DialogueCore

    @property
    def config(self) -> EnvConfig:
        """The validated configuration the env was made with."""
        return self.core.config

    @property
    def max_turns(self) -> int:
        """The horizon H: assistant turns before an episode is truncated."""
        return self.core.config.max_turns

    @property
    def num_rows(self) -> int:
        """Task rows in the env's split (valid ``task_index`` values are ``0 .. num_rows - 1``)."""
        return len(self.core.rows)

    @property
    def rows(self) -> tuple[TaskRow, ...]:
        """The task rows of the env's split, in ``task_index`` order."""
        return tuple(self.core.rows)

    @property
    def task(self) -> Task:
        """The task the env draws its rows from."""
        return self.core.task

    @property
    def fingerprint(self) -> str:
        """Hash of the configuration that is stamped on every state of this env."""
        return self.core.fingerprint

    @property
    def usage(self) -> Usage:
        """A copy of what this env has spent so far: user and reward calls, samples, scored conversations, steps
        (``policy_tokens`` stays 0: the env has no tokenizer)."""
        return dataclasses.replace(self.core.usage)

    @property
    def timings(self) -> Timings:
        """A copy of where this env's step time went so far (:class:`~dialogue_gym.core.Timings`: seconds in the
        simulated user and the reward model, tokens the user's engine generated)."""
        return dataclasses.replace(self.core.timings)


def check_reset_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(RESET_OPTIONS))
    if unknown:
        raise DialogueError(f"unknown reset option(s) {unknown}; allowed: {', '.join(RESET_OPTIONS)}")
    starts = [k for k in ("state", "messages", "task_index") if k in options]
    if len(starts) > 1:
        raise DialogueError(f"reset options {starts} conflict: give at most one of 'state', 'messages', 'task_index'")
    if "branch" in options and "state" not in options:
        raise DialogueError("reset option 'branch' only applies together with 'state'")
    if "profile" in options and "messages" not in options:
        raise DialogueError("reset option 'profile' only applies together with 'messages'")


def transcript(messages: list[dict[str, str]]) -> str:
    """A readable text transcript of a conversation."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


class DialogueEnv(EnvContract, gym.Env):
    """A multi-turn dialogue with a simulated user and a reward model.

    ## Description
    The policy plays the assistant. Each episode starts from a task row (an opening user message, plus a
    hidden user profile), a saved mid-conversation state, or any valid message prefix. After every assistant
    message the simulated user answers (or ends the conversation) and the reward model scores the reply.

    ## Observation Space
    :class:`Conversation`: the conversation so far as a list of ``{"role", "content"}`` dicts. While the
    episode runs it ends with a user message; the final observation ends with the assistant's last message.

    ## Action Space
    :class:`Utterance`: the assistant's next message, a non-blank string of at most ``max_action_chars``.

    ## Rewards
    The reward model's score of the conversation ending with the new assistant message, per ``reward_mode``:
    ``terminal`` (only on the last step, 0 before), ``per_turn`` (every step) or ``delta`` (this turn's score
    minus the previous one; the sum over an episode is the final score). ``info["score"]`` holds the raw score
    (absent when the turn was not scored).

    ## Starting State
    ``reset(seed=None, options=None)``:
    - no options: a task row drawn by the env's seeded RNG;
    - ``{"task_index": i}``: row ``i`` of the split;
    - ``{"state": DialogueState | dict}``: restore a snapshot exactly (mid-conversation reset); with
      ``"branch": k >= 1`` the user's random stream is forked for branch ``k`` (what the vector env does for
      repeated states);
    - ``{"messages": [...], "profile": {...}}``: any valid prefix; if it ends with an assistant turn, the user
      answers first.

    ## Episode End
    ``terminated``: the episode reached a terminal state: the user (or the task's verifier) ended the
    conversation, or the reply of the last allowed turn solved the task (the task's verifier decides; the user is
    not asked after the last turn). ``truncated``: ``max_turns`` assistant turns were taken and the last one did
    not end the episode that way (never both).

    ## Arguments
    Keyword arguments are the fields of :class:`dialogue_gym.core.EnvConfig` (``task``, ``user``, ``reward``,
    ``reward_mode``, ``max_turns``, ``model``, ``engine``, sampling settings, ...), plus ``render_mode``
    (``"human"`` prints, ``"ansi"`` returns the transcript).

    ## Version History
    - v0: initial version. Since 2026-11-27 a last allowed turn that solves the task (its verifier accepts the
      reply) reports ``terminated=True, truncated=False``; before, ``truncated=True``.
    """

    metadata = {"render_modes": ["human", "ansi"], "render_fps": 1}

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise DialogueError(f"render_mode is {render_mode!r}; allowed: None, 'human', 'ansi'")
        self.render_mode = render_mode
        self.core = DialogueCore(make_config(kwargs))
        self.observation_space = Conversation(self.core.config.max_turns)
        self.action_space = Utterance(self.core.config.max_action_chars)
        self._state: DialogueState | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[list[dict[str, str]], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        check_reset_options(options)
        state = start_state(self.core, options, self.np_random)  # the old episode stays until this succeeds
        self._state = state
        info = {"turn": state.turn, "task_row": state.task_row, "fingerprint": state.config_fingerprint}
        return [dict(m) for m in state.messages], info

    def step(self, action: Any) -> tuple[list[dict[str, str]], float, bool, bool, dict[str, Any]]:
        if self._state is None:
            raise DialogueError("step() called before reset(); call reset() first")
        if self._state.done:
            raise DialogueError("the episode has ended (terminated or truncated); call reset() to start another")
        text = self.core.validate_action(action)
        working = self._state.copy()  # a failure inside the user or reward model leaves the episode untouched
        result: StepResult = self.core.advance([working], [text])[0]
        self._state = working
        if self.render_mode == "human":
            self.render()
        return [dict(m) for m in working.messages], result.reward, result.terminated, result.truncated, result.info

    def get_state(self) -> DialogueState:
        """A snapshot of the current conversation (a copy; JSON via ``.to_json()``)."""
        if self._state is None:
            raise DialogueError("get_state() called before reset(); call reset() first")
        return self._state.copy()

    def render(self) -> str | None:
        if self._state is None:
            return None
        text = transcript(self._state.messages)
        if self.render_mode == "human":
            print(text + "\n")
            return None
        return text


def start_state(core: DialogueCore, options: dict[str, Any], np_random: Any) -> DialogueState:
    """The starting state a reset with ``options`` asks for (shared with the vector env)."""
    from dialogue_gym.conversation import fork_rng_state

    if "state" in options:
        state = core.restore(options["state"])
        branch = options.get("branch", 0)
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise DialogueError(f"reset option 'branch' must be a non-negative integer, got {branch!r}")
        if branch:
            state.rng = fork_rng_state(state.rng, branch)
        return state
    if "messages" in options:
        state = core.state_for_messages(options["messages"], options.get("profile"), entropy_from(np_random))
        core.answer_prefixes([state])
        return state
    index = options.get("task_index")
    if index is None:
        index = int(np_random.integers(len(core.rows)))
    return core.state_for_row(index, entropy_from(np_random))
