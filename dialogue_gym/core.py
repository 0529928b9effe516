"""Episode mechanics shared by :class:`DialogueEnv` and :class:`DialogueVectorEnv`.

``DialogueCore`` owns the task, the simulated user and the reward model, and advances a *batch* of
``DialogueState`` objects by one assistant turn with exactly one batched user call and one batched reward call.
The single env is the batch-of-one case, so both envs share every rule (validation, reward modes, RNG use).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dialogue_gym.budget import Usage, spend
from dialogue_gym.config import ENGINES, REWARD_MODES, EnvConfig  # noqa: F401  (re-exported: older import path)
from dialogue_gym.conversation import (
    DialogueError,
    DialogueState,
    Message,
    check_profile,
    count_assistant_turns,
    fingerprint,
    new_rng_state,
    rng_from_state,
    validate_messages,
)

if TYPE_CHECKING:  # types only: the engine, the user and the reward are built lazily (in __init__ and engine())
    from dialogue_gym.generation.base import GenerationEngine
    from dialogue_gym.users.base import UserTurn


@dataclass
class StepResult:
    """What one assistant turn produced for one conversation."""

    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


@dataclass
class Timings:
    """Where an env's step time went: seconds inside its simulated user's ``respond`` and its reward model's
    ``score`` (the task verifier's end-of-episode check is not counted), and the tokens the user's engine generated
    meanwhile (0 for a scripted user). A profile for users and benchmarks, never a budget."""

    user_s: float = 0.0
    reward_s: float = 0.0
    user_tokens: int = 0


class DialogueCore:
    """Task + user + reward, and the rules that move a batch of states forward one turn."""

    def __init__(self, config: EnvConfig):
        from dialogue_gym.rewards import build_reward
        from dialogue_gym.tasks import build_task
        from dialogue_gym.users import build_user

        config.validate()
        self.config = config
        self.task = build_task(config.task, **config.task_kwargs)
        self._engine: GenerationEngine | None = None
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
        # What this env spent (policy_tokens stays 0: the env has no tokenizer; a Budget's count_tokens fills it).
        self.usage = Usage()
        self.timings = Timings()

    @property
    def user_calls(self) -> int:
        """Batched simulated-user calls so far (``usage.user_calls``)."""
        return self.usage.user_calls

    @property
    def reward_calls(self) -> int:
        """Batched reward calls so far (``usage.reward_calls``)."""
        return self.usage.reward_calls

    def engine(self) -> GenerationEngine:
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

    def state_for_messages(self, messages: object, profile: object, entropy: int) -> DialogueState:
        """A state from any valid prefix (validated); it may end with an assistant turn (see ``needs_user``)."""
        msgs = validate_messages(messages, "options['messages']")
        if profile is not None and not isinstance(profile, Mapping):
            raise DialogueError(f"options['profile'] must be a dict, got {type(profile).__name__}")
        profile = dict(profile or {})
        self._check_profile(profile)
        return self._new_state(msgs, "", profile, entropy)

    def _check_profile(self, profile: Mapping[str, Any]) -> None:
        """Refuse a profile the user, reward or verifier cannot read when a state is made, not at its first step."""
        for part in (self.user, self.reward, self.verifier):
            check_profile(part, profile)

    def restore(self, data: object) -> DialogueState:
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
        self._check_profile(state.profile)
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

    def validate_action(self, action: object, where: str = "action") -> str:
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
        user_turns: dict[int, UserTurn] = {}
        user_calls = self.usage.user_calls
        if asking:
            for i, t in zip(asking, self._ask_user([states[i] for i in asking])):
                user_turns[i] = t
                if t.done:
                    states[i].terminated = True
                else:
                    states[i].messages.append({"role": "user", "content": t.text})
        mode = self.config.reward_mode
        to_score = [i for i, s in enumerate(states) if mode != "terminal" or s.done]
        step_user_calls = self.usage.user_calls - user_calls
        # the active budget pays, or BudgetExhausted is raised
        budget = spend(self.config.split, actions, len(to_score), step_user_calls)
        scores = np.zeros(len(states))
        if to_score:
            t0 = time.perf_counter()
            try:
                got = self.reward.score([scored_conversations[i] for i in to_score],
                                        [states[i].profile for i in to_score])
                got = np.asarray(got, dtype=np.float64).reshape(-1)
                if got.shape != (len(to_score),):
                    raise RuntimeError(f"reward model returned {got.shape[0]} scores for {len(to_score)} "
                                       "conversations")
            except BaseException:
                # a failed step is not counted (a caller may retry it, as the OpenEnv server does state by state)
                if budget is not None:
                    budget.refund(self.config.split, actions, len(to_score))
                raise
            finally:
                self.timings.reward_s += time.perf_counter() - t0
            scores[to_score] = got
        self.usage.add_step(len(actions), 0, len(to_score), 0)  # the user calls were counted as they were made
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
            turn = user_turns.get(i)
            info = {"turn": s.turn, "user_message": turn.text if turn is not None and not turn.done else "",
                    "user_ended": bool(turn.done) if turn is not None else False, "task_row": s.task_row}
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

    def _user_tokens(self) -> int:
        """Tokens the user's engine has generated so far (0 before it is built, and for a scripted user)."""
        return int(getattr(self._engine, "tokens_generated", 0)) if self._engine is not None else 0

    def _ask_user(self, states: Sequence[DialogueState]) -> list[UserTurn]:
        seeds = []
        for s in states:
            rng = rng_from_state(s.rng)
            seeds.append(int(rng.integers(0, 2**63 - 1)))
            s.rng = dict(rng.bit_generator.state)  # numpy types the state as a Mapping; it is a fresh dict
        self.usage.user_calls += 1
        tokens, t0 = self._user_tokens(), time.perf_counter()
        turns = self.user.respond([list(s.messages) for s in states], [s.profile for s in states], seeds)
        self.timings.user_s += time.perf_counter() - t0
        self.timings.user_tokens += self._user_tokens() - tokens
        if len(turns) != len(states):
            raise RuntimeError(f"user simulator returned {len(turns)} turns for {len(states)} conversations")
        for t in turns:
            if not t.done and not t.text.strip():
                raise RuntimeError("user simulator returned an empty turn without ending the conversation")
        return turns


def entropy_from(rng: np.random.Generator) -> int:
    """A 63-bit seed drawn from a generator (for a new episode's RNG)."""
    return int(rng.integers(0, 2**63 - 1))

