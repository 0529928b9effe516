"""Episode mechanics shared by :class:`DialogueEnv` and :class:`DialogueVectorEnv`.

``DialogueCore`` owns the task, the simulated user and the reward model, and advances a *batch* of
``DialogueState`` objects by one assistant turn with exactly one batched user call and one batched reward call.
The single env is the batch-of-one case, so both envs share every rule (validation, reward modes, RNG use).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dialogue_gym.budget import spend
from dialogue_gym.conversation import (
    DialogueError,
    DialogueState,
    Message,
    count_assistant_turns,
    fingerprint,
    new_rng_state,
    rng_from_state,
    validate_messages,
)

REWARD_MODES = ("terminal", "per_turn", "delta")
ENGINES = ("hf", "vllm", "openai")


@dataclass
class EnvConfig:
    """Everything that defines an environment (its fingerprint is stamped on every state).

    Attributes:
        task: task name (``"embedded"``, ``"arithmetic"``, ``"ultrainteract"``, ``"anthropic_hh"``) or instance.
        task_kwargs: keyword arguments for the task (data path, difficulty, ...).
        split: which split reset draws rows from (``"train"``, ``"test"``, or ``"validation"`` where the task has
            one).
        model: the model behind the LLM user and the LLM judge (``"embedded"``, ``"tiny"``, path, hub id).
        engine: generation backend of the LLM user (and, unless ``judge_engine`` says otherwise, the LLM judge):
            ``"hf"``, ``"vllm"`` (in process) or ``"openai"`` (an OpenAI-compatible server at ``base_url``).
        base_url: the user's server for ``engine="openai"``, e.g. ``http://127.0.0.1:8000/v1``; ``model`` is then
            the served model name. The API key comes from an environment variable only (``engine_options``'
            ``api_key_env``, default ``OPENAI_API_KEY``).
        judge_model: the LLM judge's model (``reward="judge"``); None: ``model``.
        judge_engine: the LLM judge's backend; None: ``engine``.
        judge_base_url: the judge's server when its engine is ``"openai"``; None: ``base_url``.
        judge_engine_options: keyword arguments of the judge's engine; None: ``engine_options`` when the judge's
            backend is the user's, else none.
        user: user simulator spec (``"llm"``, ``"replay"``, ``"scripted"``, a task-specific name) or instance;
            None takes the task's default.
        reward: reward spec (``"judge"``, ``"verifier"``, a reward-model path, ...) or instance; None takes the
            task's default.
        reward_mode: ``"terminal"`` (score at the end only), ``"per_turn"`` (score every turn) or ``"delta"``
            (score minus the previous turn's score; sums to the final score).
        max_turns: assistant turns before the episode is truncated.
        max_action_chars: longest accepted assistant message.
        user_temperature: LLM user sampling temperature.
        user_top_p: LLM user nucleus mass.
        user_max_new_tokens: LLM user output cap in tokens.
        device: where the env's own models (LLM user on HF, judge, reward models) run: ``"auto"`` (CUDA when
            available, else CPU; ``$DIALOGUE_GYM_DEVICE`` overrides), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: their weight dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``,
            ``"float16"``.
        engine_options: extra keyword arguments for the LLM user's generation engine, e.g. ``{"cache": "static"}``
            (HF: static KV cache, compiled on CUDA), ``{"max_num_seqs": 256}`` (vLLM), or ``{"max_concurrency":
            64, "timeout_s": 300, "api": "chat", "api_key_env": "MY_KEY"}`` (openai).
    """

    task: Any = "embedded"
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    model: str = "embedded"
    engine: str = "hf"
    base_url: str | None = None
    judge_model: str | None = None
    judge_engine: str | None = None
    judge_base_url: str | None = None
    judge_engine_options: dict[str, Any] | None = None
    user: Any = None
    reward: Any = None
    reward_mode: str = "terminal"
    max_turns: int = 5
    max_action_chars: int = 8000
    user_temperature: float = 0.8
    user_top_p: float = 1.0
    user_max_new_tokens: int = 96
    device: str = "auto"
    dtype: str = "auto"
    engine_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from dialogue_gym.models import DeviceError, resolve_device, resolve_dtype

        try:  # before any model loads: a CUDA device on a machine without one, an unknown dtype
            resolve_dtype(self.dtype, resolve_device(self.device))
        except DeviceError as e:
            raise DialogueError(str(e)) from None
        if self.reward_mode not in REWARD_MODES:
            raise DialogueError(f"reward_mode is {self.reward_mode!r}; allowed: {', '.join(REWARD_MODES)}")
        if self.engine not in ENGINES:
            raise DialogueError(f"engine is {self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.judge_engine is not None and self.judge_engine not in ENGINES:
            raise DialogueError(f"judge_engine is {self.judge_engine!r}; allowed: {', '.join(ENGINES)} or None (the "
                                "user's engine)")
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise DialogueError(f"max_turns must be a positive integer, got {self.max_turns!r}")
        if not isinstance(self.max_action_chars, int) or self.max_action_chars < 1:
            raise DialogueError(f"max_action_chars must be a positive integer, got {self.max_action_chars!r}")
        for name in ("engine_options", "judge_engine_options"):
            value = getattr(self, name)
            if not (isinstance(value, Mapping) or (value is None and name == "judge_engine_options")):
                raise DialogueError(f"{name} must be a dict of engine keyword arguments, got {type(value).__name__}")
        self.user_engine_spec()
        self.judge_engine_spec()
        if self.split not in ("train", "test", "validation"):
            raise DialogueError(f"split is {self.split!r}; allowed: train, test, validation")

    def user_engine_spec(self) -> tuple[str, str, dict[str, Any]]:
        """``(kind, model, kwargs)`` of the LLM user's engine, for :func:`dialogue_gym.generation.make_engine`."""
        return self.engine, self.model, self._engine_kwargs("", self.engine, self.base_url, self.engine_options)

    def judge_engine_spec(self) -> tuple[str, str, dict[str, Any]]:
        """``(kind, model, kwargs)`` of the LLM judge's engine (``reward="judge"``); equal to the user's when they
        name the same model and backend, so both share one engine."""
        kind = self.judge_engine or self.engine
        url = self.judge_base_url if self.judge_base_url is not None else (
            self.base_url if kind == "openai" and self.engine == "openai" else None)
        options = self.judge_engine_options
        if options is None:
            options = self.engine_options if kind == self.engine else {}
        return kind, self.judge_model or self.model, self._engine_kwargs("judge_", kind, url, options)

    def _engine_kwargs(self, prefix: str, kind: str, base_url: str | None, options: Any) -> dict[str, Any]:
        """One role's engine keyword arguments: placement (HF: device and dtype; vLLM: a dtype other than auto),
        the server (openai, checked), then the options."""
        from dialogue_gym.models import resolve_dtype

        if kind != "openai" and base_url is not None:
            raise DialogueError(f"{prefix}base_url is set but the {prefix or 'user '}engine is {kind!r}; a base URL "
                                "needs engine 'openai'")
        kwargs: dict[str, Any] = {}
        if kind == "hf":
            kwargs = {"device": self.device, "dtype": self.dtype}
        elif kind == "vllm" and self.dtype != "auto":  # vLLM places its model itself; it takes the dtype
            kwargs = {"dtype": str(resolve_dtype(self.dtype, "cpu")).removeprefix("torch.")}
        elif kind == "openai":
            if base_url is None:
                raise DialogueError(f"{prefix}engine 'openai' needs {prefix}base_url, the server's API root, e.g. "
                                    "http://127.0.0.1:8000/v1")
            if "base_url" in (options or {}):
                raise DialogueError(f"give the server as {prefix}base_url, not inside the engine options")
            from dialogue_gym.generation.http_common import check_base_url

            try:
                kwargs = {"base_url": check_base_url(base_url)}
            except ValueError as e:
                raise DialogueError(f"{prefix}base_url: {e}") from None
        return {**kwargs, **dict(options or {})}


@dataclass
class StepResult:
    """What one assistant turn produced for one conversation."""

    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


class DialogueCore:
    """Task + user + reward, and the rules that move a batch of states forward one turn."""

    def __init__(self, config: EnvConfig):
        from dialogue_gym.rewards import build_reward
        from dialogue_gym.tasks import build_task
        from dialogue_gym.users import build_user

        config.validate()
        self.config = config
        self.task = build_task(config.task, **config.task_kwargs)
        self._engine: Any = None
        if config.engine == "openai":  # check the server now: a down server or a missing model fails fast
            self.engine()
        self.user = build_user(config.user if config.user is not None else self.task.default_user, self.task,
                               self.engine, config)
        self.reward = build_reward(config.reward if config.reward is not None else self.task.default_reward,
                                   self.task, config)
        # The task's verifier (None for tasks without one) decides whether a last allowed turn solved the task.
        self.verifier = self.task.make_reward("verifier")
        self.rows = list(self.task.rows(config.split))
        if not self.rows:
            raise DialogueError(f"task {self.task.name!r} has no rows in split {config.split!r}")
        self._row_index = {r.id: i for i, r in enumerate(self.rows)}
        self.fingerprint = fingerprint(self.describe())
        self.user_calls = 0
        self.reward_calls = 0

    def engine(self) -> Any:
        """The shared generation engine of the LLM user (built on first use)."""
        if self._engine is None:
            from dialogue_gym.generation import make_engine

            kind, model, kwargs = self.config.user_engine_spec()
            self._engine = make_engine(kind, model, **kwargs)
        return self._engine

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"task": self.task.describe(), "split": c.split, "user": self.user.describe(),
                "reward": self.reward.describe(), "reward_mode": c.reward_mode, "max_turns": c.max_turns}

    # ---- starting states -------------------------------------------------------------------------------------

    def state_for_row(self, index: int, entropy: int) -> DialogueState:
        """A fresh state at task row ``index`` whose RNG is seeded from ``entropy``."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.rows):
            raise DialogueError(f"task_index must be an integer in [0, {len(self.rows) - 1}], got {index!r}")
        row = self.rows[int(index)]
        return self._new_state(row.messages, row.id, dict(row.profile), entropy)

    def state_for_messages(self, messages: Any, profile: Any, entropy: int) -> DialogueState:
        """A state from any valid prefix (validated); it may end with an assistant turn (see ``needs_user``)."""
        msgs = validate_messages(messages, "options['messages']")
        if profile is not None and not isinstance(profile, Mapping):
            raise DialogueError(f"options['profile'] must be a dict, got {type(profile).__name__}")
        return self._new_state(msgs, "", dict(profile or {}), entropy)

    def restore(self, data: Any) -> DialogueState:
        """A validated copy of a saved state that belongs to this configuration."""
        state = DialogueState.from_dict(data)
        if state.config_fingerprint != self.fingerprint:
            raise DialogueError(
                f"state.config_fingerprint is {state.config_fingerprint!r} but this env's configuration has "
                f"fingerprint {self.fingerprint!r}: the state was made by a differently configured env"
            )
        if state.done:
            raise DialogueError("state has already ended (terminated or truncated); reset to an unfinished state")
        # A state may carry a shorter horizon than the env (REFUEL scores each branch at its own horizon H').
        if not state.turn < state.max_turns <= self.config.max_turns:
            raise DialogueError(
                f"state.max_turns is {state.max_turns}; it must exceed state.turn ({state.turn}) and be at most the "
                f"env's max_turns ({self.config.max_turns})"
            )
        if state.messages[-1]["role"] != "user":
            raise DialogueError("state.messages must end with a user message (the assistant speaks next)")
        return state

    def _new_state(self, messages: list[Message], row_id: str, profile: dict, entropy: int) -> DialogueState:
        turn = count_assistant_turns(messages)
        if turn >= self.config.max_turns:
            raise DialogueError(
                f"the conversation already has {turn} assistant turn(s); max_turns is {self.config.max_turns}"
            )
        return DialogueState(messages=[dict(m) for m in messages], turn=turn, max_turns=self.config.max_turns,
                             task_row=row_id, profile=profile, rng=new_rng_state(int(entropy)),
                             config_fingerprint=self.fingerprint)

    @staticmethod
    def needs_user(state: DialogueState) -> bool:
        return state.messages[-1]["role"] == "assistant"

    def answer_prefixes(self, states: Sequence[DialogueState]) -> None:
        """Let the user answer every state whose prefix ends with an assistant turn (one batched call)."""
        todo = [s for s in states if self.needs_user(s)]
        if not todo:
            return
        turns = self._ask_user(todo)
        for s, t in zip(todo, turns):
            if t.done:
                raise DialogueError("the simulated user ended the conversation on this prefix; nothing to continue")
            s.messages.append({"role": "user", "content": t.text})

    # ---- one turn --------------------------------------------------------------------------------------------

    def validate_action(self, action: Any, where: str = "action") -> str:
        if not isinstance(action, str):
            raise DialogueError(f"{where} must be a string (the assistant's message), got {type(action).__name__}")
        if not action.strip():
            raise DialogueError(f"{where} is empty; the assistant's message needs non-blank text")
        if len(action) > self.config.max_action_chars:
            raise DialogueError(
                f"{where} has {len(action)} characters; at most max_action_chars={self.config.max_action_chars}"
            )
        return action

    def advance(self, states: Sequence[DialogueState], actions: Sequence[str]) -> list[StepResult]:
        """Apply one assistant message to each state (in place): one user call, one reward call for the batch.

        Actions must already be validated. States must be unfinished.

        Raises:
            BudgetExhausted: the active budget (:mod:`dialogue_gym.budget`) cannot pay for this step; raised
                before the reward call, with ``states`` partly advanced (callers step copies).
        """
        for s, a in zip(states, actions):
            s.messages.append({"role": "assistant", "content": a})
            s.turn += 1
            s.truncated = s.turn >= s.max_turns
        scored_conversations = [list(s.messages) for s in states]  # ending with the new assistant reply
        self._end_solved([s for s in states if s.truncated])
        asking = [i for i, s in enumerate(states) if not s.done]
        user_turns: dict[int, Any] = {}
        if asking:
            for i, t in zip(asking, self._ask_user([states[i] for i in asking])):
                user_turns[i] = t
                if t.done:
                    states[i].terminated = True
                else:
                    states[i].messages.append({"role": "user", "content": t.text})
        mode = self.config.reward_mode
        to_score = [i for i, s in enumerate(states) if mode != "terminal" or s.done]
        spend(self.config.split, actions, len(to_score))  # the active budget pays, or BudgetExhausted is raised
        scores = np.zeros(len(states))
        if to_score:
            self.reward_calls += 1
            got = self.reward.score([scored_conversations[i] for i in to_score], [states[i].profile for i in to_score])
            got = np.asarray(got, dtype=np.float64).reshape(-1)
            if got.shape != (len(to_score),):
                raise RuntimeError(f"reward model returned {got.shape[0]} scores for {len(to_score)} conversations")
            scores[to_score] = got
        results = []
        for i, s in enumerate(states):
            scored = i in to_score or mode != "terminal"
            score = float(scores[i])
            if mode == "delta":
                reward = score - s.last_score
            elif mode == "per_turn" or s.done:
                reward = score
            else:
                reward = 0.0
            if scored:
                s.last_score = score
            t = user_turns.get(i)
            info = {"turn": s.turn, "user_message": t.text if t is not None and not t.done else "",
                    "user_ended": bool(t.done) if t is not None else False, "task_row": s.task_row}
            if i in to_score:  # present only when the turn was scored (the vector env masks it as "_score")
                info["score"] = score
            results.append(StepResult(float(reward), s.terminated, s.truncated, info))
        return results

    def _end_solved(self, last: Sequence[DialogueState]) -> None:
        """Mark states whose last allowed turn solved the task as ``terminated`` (not ``truncated``).

        The user is not asked after the final turn, so without this a correct last answer would read as a cut-off
        episode and a learner that bootstraps on truncation would bootstrap past a solved problem. The task's
        verifier decides (no user call); tasks without one keep ``truncated``.
        """
        if self.verifier is None or not last:
            return
        solved = np.asarray(self.verifier.score([list(s.messages) for s in last], [s.profile for s in last]))
        for s, v in zip(last, solved.reshape(-1)):
            if v > 0:
                s.terminated, s.truncated = True, False

    def _ask_user(self, states: Sequence[DialogueState]) -> list[Any]:
        seeds = []
        for s in states:
            rng = rng_from_state(s.rng)
            seeds.append(int(rng.integers(0, 2**63 - 1)))
            s.rng = rng.bit_generator.state
        self.user_calls += 1
        turns = self.user.respond([list(s.messages) for s in states], [s.profile for s in states], seeds)
        if len(turns) != len(states):
            raise RuntimeError(f"user simulator returned {len(turns)} turns for {len(states)} conversations")
        for t in turns:
            if not t.done and not t.text.strip():
                raise RuntimeError("user simulator returned an empty turn without ending the conversation")
        return turns


def entropy_from(rng: np.random.Generator) -> int:
    """A 63-bit seed drawn from a generator (for a new episode's RNG)."""
    return int(rng.integers(0, 2**63 - 1))


EngineFactory = Callable[[], Any]
