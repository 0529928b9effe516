"""The arithmetic task's simulated users: the scripted critic (a correct final number ends the conversation, a
wrong or missing one gets a critique that never states the answer) and ``critic_llm`` (a language model writes the
critique; the answer check still decides when to stop, and a critique that leaks the answer is replaced)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from dialogue_gym.conversation import Message
from dialogue_gym.tasks.answers import (
    extract_answer,
    find_numbers,
    is_correct,
    last_assistant,
    profile_answer,
    profile_steps,
)
from dialogue_gym.users.base import UserTurn

_ORDINALS = ("first", "second", "third")
CORRECT_REPLIES = ("Yes, that's correct. Thank you!", "Right, that's the answer. Thanks!",
                   "Correct! That's what I needed.")
NO_ANSWER_CRITIQUES = (
    "I don't see a final number in your reply. What is the answer?",
    "You didn't give me a final answer. Please finish with the number.",
    "Please state the final answer clearly as a number.",
    "I can't find the answer in that. Can you solve it and tell me the number?",
)
WRONG_CRITIQUES = (
    "That's not right. Check the {step} step again.",
    "Hmm, I don't think that's correct. Look again at the {step} step.",
    "That answer is wrong. Please go through the problem again, step by step.",
    "Are you sure? Re-read the question and redo the calculation.",
    "Not quite. Something went wrong in the {step} step. Try again.",
    "That's not the answer I got. Can you check your arithmetic?",
)


def scripted_critique(reply: str, steps: int, seed: int) -> str:
    """The scripted critique of a wrong or answer-less reply; it never contains the correct answer."""
    if extract_answer(reply) is None:
        return NO_ANSWER_CRITIQUES[seed % len(NO_ANSWER_CRITIQUES)]
    template = WRONG_CRITIQUES[seed % len(WRONG_CRITIQUES)]
    step = _ORDINALS[(seed // len(WRONG_CRITIQUES)) % max(1, min(int(steps), 3))]
    if steps <= 1:
        template = template.replace("the {step} step", "your calculation")
    return template.format(step=step)


class CriticUser:
    """A scripted user for verifiable problems.

    After each assistant turn: a correct final answer (per :func:`is_correct` against ``profile["answer"]``) ends
    the conversation; otherwise the user sends a critique from fixed templates, chosen by the conversation's
    seed, that never reveals the answer.
    """

    def describe(self) -> dict[str, Any]:
        return {"user": "critic", "correct": list(CORRECT_REPLIES), "no_answer": list(NO_ANSWER_CRITIQUES),
                "wrong": list(WRONG_CRITIQUES)}

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        out = []
        for conv, profile, seed in zip(conversations, profiles, seeds):
            reply = last_assistant(conv)
            if is_correct(reply, profile_answer(profile, "the critic user")):
                out.append(UserTurn(CORRECT_REPLIES[int(seed) % len(CORRECT_REPLIES)], done=True))
            else:
                out.append(UserTurn(scripted_critique(reply, profile_steps(profile, "the critic user"), int(seed))))
        return out

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        profile_answer(profile, "the critic user")
        profile_steps(profile, "the critic user")


LLM_CRITIC_PROMPT = (
    "A student is solving this math problem:\n\n{question}\n\nThe student's reply:\n\n{reply}\n\n{verdict} "
    "Write one or two short sentences to the student pointing to what to check, as a teacher would. "
    "Do not solve the problem and do not give the answer."
)


class LLMCriticUser:
    """Like :class:`CriticUser`, but a language model writes the critique of a wrong or answer-less reply.

    The verifier still decides when the conversation ends. The model is never shown the correct answer, and a
    critique that nevertheless contains it (or is empty) is replaced by the scripted one.

    Args:
        engine: a generation engine, or a zero-argument callable returning one (built on first use).
        temperature: sampling temperature of the critic model.
        max_new_tokens: cap on the critique's tokens.
    """

    def __init__(self, engine: Any, temperature: float = 0.7, max_new_tokens: int = 64):
        from dialogue_gym.generation.base import SamplingParams

        self._engine = engine
        self.params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)

    @property
    def engine(self) -> Any:
        if not hasattr(self._engine, "generate") and callable(self._engine):
            self._engine = self._engine()
        return self._engine

    def describe(self) -> dict[str, Any]:
        engine = self.engine.describe() if hasattr(self.engine, "describe") else type(self.engine).__name__
        return {"user": "critic_llm", "engine": engine, "prompt": LLM_CRITIC_PROMPT,
                "temperature": self.params.temperature, "max_new_tokens": self.params.max_new_tokens}

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        profile_answer(profile, "the critic_llm user")
        profile_steps(profile, "the critic_llm user")

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        out: list[UserTurn | None] = []
        ask: list[int] = []
        prompts = []
        for i, (conv, profile, seed) in enumerate(zip(conversations, profiles, seeds)):
            reply = last_assistant(conv)
            if is_correct(reply, profile_answer(profile, "the critic_llm user")):
                out.append(UserTurn(CORRECT_REPLIES[int(seed) % len(CORRECT_REPLIES)], done=True))
                continue
            out.append(None)
            ask.append(i)
            question = profile.get("question") or next((m["content"] for m in conv if m["role"] == "user"), "")
            verdict = ("The reply gives no final number." if extract_answer(reply) is None
                       else "The student's final answer is wrong.")
            prompts.append([{"role": "user", "content": LLM_CRITIC_PROMPT.format(
                question=question, reply=reply.strip(), verdict=verdict)}])
        if ask:
            gens = self.engine.generate(prompts, self.params, seeds=[int(seeds[i]) for i in ask])
            for i, g in zip(ask, gens):
                answer = profile_answer(profiles[i], "the critic_llm user")
                text = g.text.strip()
                leaks = any(math.isclose(n.value, answer, abs_tol=1e-6) for n in find_numbers(text))
                if not text or leaks:
                    text = scripted_critique(last_assistant(conversations[i]),
                                             profile_steps(profiles[i], "the critic_llm user"), int(seeds[i]))
                out[i] = UserTurn(text)
        return [t for t in out if t is not None]
