"""Reading a final numeric answer out of a reply: the number grammar (digits and number words), the answer
anchors (``The answer is ...``, ``\\boxed{...}``, a last ``= ...``), and the checks the arithmetic and clarify tasks'
users and verifier share."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dialogue_gym.conversation import DialogueError, Message

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"thousand": 1_000, "million": 1_000_000}

# A number in digits: optional sign (only when attached and not preceded by a word character: "10-3" is a
# subtraction), optional "$", thousands separators ("1,234"), optional decimals. Trailing punctuation is left out.
_DIGITS = re.compile(
    r"(?P<sign>[-\u2212])?\$?(?P<int>\d{1,3}(?:,\d{3})+(?![\d,]\d)|\d+)(?P<frac>\.\d+)?"
)
_WORD = re.compile(r"[A-Za-z]+")
_ANSWER_ANCHOR = re.compile(r"\banswer\b(?:\s+(?:is|was|would\s+be|will\s+be|should\s+be|equals))?", re.IGNORECASE)
_BOXED_ANCHOR = re.compile(r"\\boxed\{")
_EQUALS_ANCHOR = re.compile(r"=")
_AFTER_ANSWER_GAP = re.compile(
    r"^[\s*:=\"'`(<\[]*(?:(?:approximately|about|exactly|roughly|just|of)\s+)?[\s*:=\"'`(<\[]*$", re.IGNORECASE
)
_OPERATOR_NEXT = re.compile(r"^\s*[-+*/x\u00d7\u00f7]\s*\$?\d")
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|\n")
_AFTER_EQUALS_GAP = re.compile(r"^[\s*]*$")


@dataclass(frozen=True)
class NumberMention:
    """A number found in a text: its value, where it is, and whether it is a weak mention (a lone "one")."""

    value: float
    start: int
    end: int
    weak: bool = False


def _digit_numbers(text: str) -> list[NumberMention]:
    out = []
    for m in _DIGITS.finditer(text):
        start = m.start()
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._"):
            continue  # part of a word or of a longer number ("x2", "v1.5")
        sign = m.group("sign")
        if sign and start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]"):
            sign = None
            start += 1
        value = float(m.group("int").replace(",", "") + (m.group("frac") or ""))
        out.append(NumberMention(-value if sign else value, start, m.end()))
    return out


def _word_numbers(text: str) -> list[NumberMention]:
    """Numbers written as words ("twelve", "twenty-three", "one hundred and five", "negative four")."""
    words = [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    out: list[NumberMention] = []
    i = 0
    while i < len(words):
        w, start, _ = words[i]
        if w not in _UNITS and w not in _TENS:
            i += 1
            continue
        total, current, last, end, j, n_words = 0, 0, None, start, i, 0
        while j < len(words):
            w, s, e = words[j]
            if j > i and not re.fullmatch(r"[\s-]+", text[words[j - 1][2]:s]):
                break
            if w == "and" and last in ("hundred", "scale") and j + 1 < len(words) and (
                words[j + 1][0] in _UNITS or words[j + 1][0] in _TENS
            ):
                j += 1
                continue
            if w == "zero":
                if last is not None:
                    break
                kind, value = "zero", 0
            elif w in _UNITS:
                value = _UNITS[w]
                kind = "unit" if value < 10 else "teen"
                if last not in (None, "hundred", "scale") and not (kind == "unit" and last == "tens"):
                    break
            elif w in _TENS:
                kind, value = "tens", _TENS[w]
                if last not in (None, "hundred", "scale"):
                    break
            elif w == "hundred":
                if last not in ("unit", "teen"):
                    break
                kind, value = "hundred", 0
            elif w in _SCALES:
                if last not in ("unit", "teen", "tens", "hundred"):
                    break
                kind, value = "scale", 0
            else:
                break
            if kind == "hundred":
                current *= 100
            elif kind == "scale":
                total += current * _SCALES[w]
                current = 0
            else:
                current += value
            last, end, n_words = kind, e, n_words + 1
            j += 1
            if kind == "zero":
                break
        value = float(total + current)
        phrase_start = start
        if i > 0 and words[i - 1][0] == "negative" and re.fullmatch(r"\s+", text[words[i - 1][2]:start]):
            value, phrase_start = -value, words[i - 1][1]
        weak = n_words == 1 and words[i][0] == "one"
        out.append(NumberMention(value, phrase_start, end, weak))
        i = max(j, i + 1)
    return out


def find_numbers(text: str) -> list[NumberMention]:
    """Every number mentioned in ``text`` (digits or words), in order of position."""
    found = _digit_numbers(text) + _word_numbers(text)
    return sorted(found, key=lambda n: n.start)


def _after_anchor(numbers: list[NumberMention], anchor_end: int, text: str, gap: re.Pattern) -> NumberMention | None:
    for n in numbers:
        if n.start >= anchor_end:
            return n if gap.match(text[anchor_end:n.start].replace("$", "")) else None
    return None


def _equation_result(numbers: list[NumberMention], text: str, start: int, end: int) -> NumberMention | None:
    """The number after the last "=" in ``text[start:end]`` that is followed by one, or None."""
    for q in reversed(list(_EQUALS_ANCHOR.finditer(text, start, end))):
        found = _after_anchor(numbers, q.end(), text, _AFTER_EQUALS_GAP)
        if found is not None and found.start < end:
            return found
    return None


def stated_answer(text: str) -> float | None:
    """The answer a reply explicitly commits to: the number after the last ``\\boxed{`` or "answer" anchor ("The
    answer is 12", "Answer: $12.50"; for "the answer is 5 + 7 = 12", the result), or None when it states none.

    Unlike :func:`extract_answer` it does not fall back to the last number of the reply, so "Maya has 12 apples,
    but how many did she buy?" commits to nothing.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    numbers = find_numbers(text)
    for anchor, gap in ((_BOXED_ANCHOR, _AFTER_EQUALS_GAP), (_ANSWER_ANCHOR, _AFTER_ANSWER_GAP)):
        for m in reversed(list(anchor.finditer(text))):
            found = _after_anchor(numbers, m.end(), text, gap)
            if found is None:
                continue
            if _OPERATOR_NEXT.match(text[found.end:]):  # "the answer is 5 + 7 = 12": take the result
                stop = _SENTENCE_END.search(text, found.end)
                found = _equation_result(numbers, text, found.end, stop.start() if stop else len(text))
                if found is None:
                    continue
            return found.value
    return None


def extract_answer(text: str) -> float | None:
    """The final numeric answer stated in a reply, or None when it states none.

    Preference order: the number after the last ``\\boxed{``; after the last "answer" ("The answer is 12",
    "Answer: $12.50", "the answer is twelve"; for "the answer is 5 + 7 = 12", the result); otherwise the
    conclusion, i.e. the last sentence that holds a number: the result of its last "=" if it has one
    ("so 5 + 7 = 12 apples in 2 bags" gives 12), else its last number ("... we get 22. So she has 22 now." gives
    22). A lone "one" counts only when nothing else does. Numbers may be written in digits or words, with
    thousands separators ("1,234"), a sign ("-5", "negative five"), decimals, a "$" or a unit after them
    ("12 apples"), and trailing punctuation.

    Args:
        text: the assistant's reply.

    Returns:
        The value as a float, or None when the text holds no number.
    """
    stated = stated_answer(text)
    if stated is not None:
        return stated
    numbers = find_numbers(text)
    if not numbers:
        return None
    strong = [n for n in numbers if not n.weak]
    last = (strong or numbers)[-1]
    sentence_start = max((m.end() for m in _SENTENCE_END.finditer(text, 0, last.start)), default=0)
    stop = _SENTENCE_END.search(text, last.end)
    result = _equation_result(numbers, text, sentence_start, stop.start() if stop else len(text))
    return (result or last).value


def is_correct(text: str, answer: float, rel_tol: float = 1e-6) -> bool:
    """Whether the reply's extracted final answer equals ``answer`` (up to ``rel_tol``, at least 1e-6 absolute)."""
    got = extract_answer(text)
    return got is not None and math.isclose(got, float(answer), rel_tol=rel_tol, abs_tol=1e-6)


def profile_answer(profile: Mapping[str, Any], who: str) -> float:
    """The correct answer kept in a task profile; ``who`` names the caller in the error when it is missing."""
    if "answer" not in profile:
        raise DialogueError(f"{who} needs the task profile's 'answer' (got profile keys {sorted(profile)}); "
                            "use it with the arithmetic task or put the answer in options['profile']")
    answer = profile["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (numbers.Real, str)):
        raise DialogueError(f"{who} needs profile['answer'] to be a number, got {answer!r:.60}")
    try:
        return float(answer)
    except ValueError:
        raise DialogueError(f"{who} needs profile['answer'] to be a number, got {answer!r:.60}") from None


def profile_steps(profile: Mapping[str, Any], who: str) -> int:
    """The number of solution steps a task profile states (1 when absent), which the scripted critique names (0 or 1:
    it names none)."""
    steps = profile.get("steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise DialogueError(f"{who} needs profile['steps'] to be an integer >= 0 when given, got {steps!r:.60}")
    return int(steps)


def last_assistant(conversation: Sequence[Message]) -> str:
    """The last assistant message's text (empty when there is none)."""
    for m in reversed(conversation):
        if m["role"] == "assistant":
            return m["content"]
    return ""
