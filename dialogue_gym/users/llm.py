"""The LLM simulated user, prompted in the REFUEL format.

The user model sees the dialogue as ``### user: ...`` / ``### assistant: ...`` blocks and is asked, pretending to
be the user, which question it would ask next: a justification, then the question, as ``Justification:`` /
``Question:`` lines. The text after the last ``Question:`` becomes the next user turn; when the format is broken
the whole output is used (cleaned); when nothing usable remains, a short generic follow-up is used, so a user
turn is never empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dialogue_gym.conversation import Message
from dialogue_gym.generation.base import GenerationEngine, SamplingParams
from dialogue_gym.users.base import UserTurn

INSTRUCTION = (
    "Below is a conversation between a user and an AI assistant.\n\n{dialogue}\n\n"
    "{persona}Pretend you are the user in this conversation. What question would you ask next? "
    "First give a one-sentence justification, then write the question on a new line, exactly in this format:\n"
    "Justification: <why you ask it>\nQuestion: <your next question>"
)

# Used only when the model's output holds no usable text; picked by the row's seed.
FALLBACK_QUESTIONS = (
    "Can you explain that in more detail?",
    "Could you give me a concrete example?",
    "Why is that the case?",
    "What should I do next?",
    "Can you make that shorter and clearer?",
)

_ROLE_PREFIX = re.compile(r"^\s*(#+\s*)?(user|assistant|question|justification)\s*:\s*", re.IGNORECASE)


def render_dialogue(messages: Sequence[Message]) -> str:
    """The conversation as REFUEL's ``### role: content`` blocks (system messages are left out)."""
    return "\n\n".join(f"### {m['role']}: {m['content'].strip()}" for m in messages if m["role"] != "system")


def parse_question(text: str, fallback: str, max_chars: int = 1000) -> str:
    """The next user turn from the user model's output.

    Takes the text after the last ``Question:`` (case-insensitive) up to the next line that starts a new
    labelled block; without that marker, the whole output. Strips role prefixes and quotes. Never empty: an
    output with no usable text gives ``fallback``.
    """
    matches = list(re.finditer(r"question\s*:", text, flags=re.IGNORECASE))
    body = text[matches[-1].end():] if matches else text
    lines = []
    for line in body.strip().splitlines():
        if re.match(r"^\s*(#+\s*)?(assistant|justification)\s*:", line, re.IGNORECASE) and lines:
            break
        lines.append(line)
    out = "\n".join(lines).strip()
    while True:  # "### user: Question: ..." and the like
        stripped = _ROLE_PREFIX.sub("", out, count=1).strip()
        if stripped == out:
            break
        out = stripped
    out = out.strip().strip('"').strip()[:max_chars].strip()
    return out if out else fallback


class LLMUser:
    """A simulated user driven by a language model through a generation engine (REFUEL prompt format).

    Args:
        engine: a :class:`GenerationEngine`, or a zero-argument callable returning one (built lazily).
        temperature: user sampling temperature (REFUEL: 0.8).
        top_p: nucleus mass.
        max_new_tokens: cap on the user model's output (justification + question).
        max_chars: cap on the characters of the extracted user turn.
    """

    def __init__(self, engine: GenerationEngine | Callable[[], GenerationEngine], temperature: float = 0.8,
                 top_p: float = 1.0, max_new_tokens: int = 96, max_chars: int = 1000):
        self._engine = engine
        self.params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.max_chars = max_chars

    @property
    def engine(self) -> GenerationEngine:
        if callable(self._engine) and not hasattr(self._engine, "generate"):  # a factory, built on first use
            self._engine = self._engine()
        return self._engine  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        engine = self.engine.describe() if hasattr(self.engine, "describe") else type(self.engine).__name__
        return {"user": "llm", "engine": engine, "temperature": self.params.temperature, "top_p": self.params.top_p,
                "max_new_tokens": self.params.max_new_tokens, "max_chars": self.max_chars}

    def prompt(self, conversation: Sequence[Message], profile: Mapping[str, Any]) -> list[Message]:
        """The user model's chat prompt for one conversation."""
        persona = profile.get("persona") or profile.get("goal")
        persona_text = f"You are this user: {persona}\n\n" if persona else ""
        content = INSTRUCTION.format(dialogue=render_dialogue(conversation), persona=persona_text)
        return [{"role": "user", "content": content}]

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        prompts = [self.prompt(c, p) for c, p in zip(conversations, profiles)]
        outs = self.engine.generate(prompts, self.params, seeds=list(seeds))
        return [
            UserTurn(parse_question(o.text, FALLBACK_QUESTIONS[int(s) % len(FALLBACK_QUESTIONS)], self.max_chars))
            for o, s in zip(outs, seeds)
        ]
