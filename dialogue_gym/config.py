"""The environment's configuration: the one definition of its fields, defaults, allowed values and docs.

``gym.make("MultiTurnDialogue-v0", **kwargs)`` and ``gym.make_vec`` take the fields of :class:`EnvConfig` as
keyword arguments; the agents' Hydra schemas use the same dataclass as their ``env`` node, so ``+env=NAME`` and
``env.FIELD=...`` overrides reach it unchanged, and both call :meth:`EnvConfig.validate`. The docs' keyword table
is generated from this class (:func:`field_table`), so it cannot drift from the code.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore

from dialogue_gym.conversation import DialogueError

REWARD_MODES = ("terminal", "per_turn", "delta")
ENGINES = ("hf", "vllm", "openai")
SPLITS = ("train", "test", "validation")


class EnvConfigError(DialogueError):
    """A bad env setting. ``field`` names the setting; the message starts with it (``"max_turns must be ..."``),
    so callers can prefix where it came from (the agents raise ``ConfigError("env." + message)``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class EnvConfig:
    """Everything that defines an environment (its fingerprint is stamped on every state).

    Attributes:
        task: task name (``"embedded"``, ``"arithmetic"``, ``"clarify"``, ``"ultrainteract"``, ``"anthropic_hh"``)
            or a Task instance.
        task_kwargs: keyword arguments for the task (data path, difficulty, ...).
        split: which split reset draws rows from (``"train"``, ``"test"``, or ``"validation"`` where the task has
            one).
        model: the model behind the LLM user and the LLM judge (``"embedded"``, ``"tiny"``, a path, a hub id).
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
        max_turns: assistant turns before the episode is truncated (the horizon H).
        max_action_chars: longest accepted assistant message, in characters.
        user_temperature: LLM user sampling temperature.
        user_top_p: LLM user nucleus mass.
        user_max_new_tokens: LLM user output cap in tokens.
        device: where the env's own models (LLM user on HF, judge, reward models) run: ``"auto"`` (CUDA when
            available, else CPU; ``$DIALOGUE_GYM_DEVICE`` overrides), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: their weight dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"fast"`` (bfloat16 where the
            device multiplies it natively, float32 elsewhere), ``"float32"``, ``"bfloat16"``,
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
        """Check every field before any model loads.

        Raises:
            EnvConfigError: the first bad field, named at the start of the message with what is allowed.
        """
        from dialogue_gym.models import DeviceError, resolve_device, resolve_dtype
        from dialogue_gym.tasks import TASKS

        if isinstance(self.task, str) and self.task not in TASKS:
            raise EnvConfigError("task", f"task is {self.task!r}; allowed: {', '.join(sorted(TASKS))}, or a Task "
                                         "instance")
        if not isinstance(self.task_kwargs, Mapping):
            raise EnvConfigError("task_kwargs", f"task_kwargs must be a dict, got {type(self.task_kwargs).__name__}")
        try:  # a CUDA device on a machine without one, an unknown dtype
            device = resolve_device(self.device)
        except DeviceError as e:
            raise EnvConfigError("device", str(e)) from None
        try:
            resolve_dtype(self.dtype, device)
        except DeviceError as e:
            raise EnvConfigError("dtype", str(e)) from None
        if self.reward_mode not in REWARD_MODES:
            raise EnvConfigError("reward_mode", f"reward_mode is {self.reward_mode!r}; allowed: "
                                                f"{', '.join(REWARD_MODES)}")
        if self.engine not in ENGINES:
            raise EnvConfigError("engine", f"engine is {self.engine!r}; allowed: {', '.join(ENGINES)}")
        if self.judge_engine is not None and self.judge_engine not in ENGINES:
            raise EnvConfigError("judge_engine", f"judge_engine is {self.judge_engine!r}; allowed: "
                                                 f"{', '.join(ENGINES)} or None (the user's engine)")
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise EnvConfigError("max_turns", f"max_turns must be a positive integer, got {self.max_turns!r}")
        if (isinstance(self.max_action_chars, bool) or not isinstance(self.max_action_chars, int)
                or self.max_action_chars < 1):
            raise EnvConfigError("max_action_chars", f"max_action_chars must be a positive integer, got "
                                                     f"{self.max_action_chars!r}")
        for name in ("engine_options", "judge_engine_options"):
            value = getattr(self, name)
            if not (isinstance(value, Mapping) or (value is None and name == "judge_engine_options")):
                raise EnvConfigError(name, f"{name} must be a dict of engine keyword arguments, got "
                                           f"{type(value).__name__}")
        self.user_engine_spec()
        self.judge_engine_spec()
        if self.split not in SPLITS:
            raise EnvConfigError("split", f"split is {self.split!r}; allowed: {', '.join(SPLITS)}")

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

    def _engine_kwargs(self, prefix: str, kind: str, base_url: str | None,
                       options: Mapping[str, Any] | None) -> dict[str, Any]:
        """One role's engine keyword arguments: placement (HF: device and dtype; vLLM: a dtype other than auto),
        the server (openai, checked), then the options."""
        from dialogue_gym.models import resolve_dtype

        if kind != "openai" and base_url is not None:
            raise EnvConfigError(f"{prefix}base_url", f"{prefix}base_url is set but the {prefix or 'user '}engine "
                                                      f"is {kind!r}; a base URL needs engine 'openai'")
        kwargs: dict[str, Any] = {}
        if kind == "hf":
            kwargs = {"device": self.device, "dtype": self.dtype}
        elif kind == "vllm" and self.dtype != "auto":  # vLLM places its model itself (CUDA when available, as
            # device "auto" resolves): "fast" is decided for that device, not for this CPU
            kwargs = {"dtype": str(resolve_dtype(self.dtype, "auto")).removeprefix("torch.")}
        elif kind == "openai":
            if base_url is None:
                raise EnvConfigError(f"{prefix}base_url", f"{prefix}base_url is missing: {prefix}engine 'openai' "
                                                          f"needs {prefix}base_url, the server's API root, e.g. "
                                                          "http://127.0.0.1:8000/v1")
            if "base_url" in (options or {}):
                raise EnvConfigError(f"{prefix}engine_options", f"{prefix}engine_options has base_url: give the "
                                                                f"server as {prefix}base_url instead")
            from dialogue_gym.generation.http_common import check_base_url

            try:
                kwargs = {"base_url": check_base_url(base_url)}
            except ValueError as e:
                raise EnvConfigError(f"{prefix}base_url", f"{prefix}base_url: {e}") from None
        return {**kwargs, **dict(options or {})}


# Hydra: the agents' YAML files take their env node from this schema (``defaults: [schema@env: env, _self_]``), so
# the fields and defaults live only in EnvConfig and ``env.FIELD=...`` reaches every field without a ``+``.
# Registered on import, so any process that imports dialogue_gym can compose those files.
ConfigStore.instance().store(group="schema", name="env", node=EnvConfig)


@dataclass(frozen=True)
class FieldDoc:
    """One row of the keyword table: a field of :class:`EnvConfig`, its default and its documentation."""

    name: str
    type: str
    default: str
    doc: str


def field_table() -> list[FieldDoc]:
    """The fields of :class:`EnvConfig` with their types, defaults and the docstring's description, in order.

    Raises:
        RuntimeError: a field has no entry under ``Attributes:`` in the docstring (so the docs cannot skip one).
    """
    docs = _attribute_docs(inspect.getdoc(EnvConfig) or "")
    rows = []
    for f in fields(EnvConfig):
        if f.name not in docs:
            raise RuntimeError(f"EnvConfig.{f.name} has no description under 'Attributes:' in the docstring")
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            raise RuntimeError(f"EnvConfig.{f.name} has no default (every env setting needs one)")
        rows.append(FieldDoc(f.name, str(f.type), default, docs[f.name]))
    return rows


def _attribute_docs(docstring: str) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Attributes:`` section (continuation lines joined)."""
    out: dict[str, str] = {}
    section = docstring.split("Attributes:", 1)[1] if "Attributes:" in docstring else ""
    name = None
    for line in section.splitlines():
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.startswith("        "):
            out[name] += " " + line.strip()
        elif line.strip():
            break
    return out
