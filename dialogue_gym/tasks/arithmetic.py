"""Arithmetic word problems with exact answers: a verifiable task with a critic user and a verifier reward.

Problems are generated procedurally from a seed: a short story about a person and a quantity, changed by one to
three arithmetic steps, then a question. Difficulty sets the number of steps and the size of the numbers:

=========== ====== ============================================= ===========================
difficulty  steps  numbers                                       answers
=========== ====== ============================================= ===========================
1           1      2..20, + - and small products                 integers
2           1..2   2..50, + - x and exact division               integers
3           1..3   2..100, + - x and exact division              integers
4           1..3   money amounts with cents                      decimals (two places)
=========== ====== ============================================= ===========================

The **critic** user checks each assistant reply with :func:`extract_answer`: a correct final number ends the
conversation (the env reports ``terminated``); a wrong or missing one gets a scripted critique, chosen by the
conversation's seed, that never states the answer. ``critic_llm`` lets a language model write the critique
instead (the verifier still decides when to stop, and a critique that contains the answer is replaced by a
scripted one). The **verifier** reward is 1.0 when the last assistant reply is correct, times
``discount ** (turns - 1)``, so with ``discount < 1`` solving earlier is worth more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dialogue_gym.conversation import DialogueError, Message, count_assistant_turns
from dialogue_gym.tasks.base import SPLITS, TaskRow
from dialogue_gym.users.base import UserTurn

DIFFICULTIES = (1, 2, 3, 4)
DEFAULT_INSTRUCTION = "End your reply with: The answer is <number>."

# ---------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Problem generation
# ---------------------------------------------------------------------------------------------------------------

_PEOPLE = (("Maya", "she"), ("Leo", "he"), ("Aisha", "she"), ("Tom", "he"), ("Nina", "she"), ("Omar", "he"),
           ("Sofia", "she"), ("Ben", "he"), ("Lena", "she"), ("Ravi", "he"), ("Emma", "she"), ("Jack", "he"),
           ("Zoe", "she"), ("Sam", "he"), ("Mia", "she"), ("Carlos", "he"), ("Yuki", "she"), ("Finn", "he"))
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "eggs",
          "balloons", "coins", "flowers", "toy cars", "beads", "oranges")
_CONTAINERS = ("bags", "boxes", "jars", "baskets", "packs")
_GOODS = (("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
          ("cup of juice", "cups of juice"), ("magazine", "magazines"), ("muffin", "muffins"), ("toy", "toys"))
_RANGES = {1: (2, 20), 2: (2, 50), 3: (2, 100)}
PEOPLE, ITEMS = _PEOPLE, _ITEMS  # (name, pronoun) pairs and countable things, shared with the clarify task


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def _count_problem(rng: np.random.Generator, steps: int, difficulty: int) -> tuple[str, int]:
    """A counting story: start, ``steps - 1`` changes (or a grouped start), a question. Returns (text, answer)."""
    lo, hi = _RANGES[difficulty]
    name, pron = _PEOPLE[rng.integers(len(_PEOPLE))]
    item = _ITEMS[rng.integers(len(_ITEMS))]
    small_hi = min(hi, 12) if difficulty == 1 else min(hi, 20)
    ops_left = steps
    if rng.random() < 0.35:  # grouped start: one multiplication step
        groups, per = int(rng.integers(2, min(9, hi) + 1)), int(rng.integers(2, small_hi + 1))
        box = _CONTAINERS[rng.integers(len(_CONTAINERS))]
        sentences = [f"{name} has {groups} {box} with {per} {item} in each."]
        total = groups * per
        ops_left -= 1
        if ops_left == 0:
            return f"{sentences[0]} How many {item} does {name} have in total?", total
    else:
        total = int(rng.integers(lo, hi + 1))
        sentences = [f"{name} has {total} {item}."]
    p = pron.capitalize()
    for k in range(ops_left):
        last = k == ops_left - 1
        choices = ["add", "sub"]
        if difficulty >= 2 and total <= 60:
            choices.append("mul")
        divisors = [d for d in range(2, 10) if total % d == 0 and total // d >= 1]
        if difficulty >= 2 and last and divisors:
            choices.append("div")
        op = choices[rng.integers(len(choices))]
        if op == "sub" and total < 2:
            op = "add"
        if op == "add":
            n = int(rng.integers(lo, hi + 1))
            verb = ("buys", "finds", "gets", "is given")[rng.integers(4)]
            sentences.append(f"{p} {verb} {n} more.")
            total += n
        elif op == "sub":
            n = int(rng.integers(1, total))
            verb = ("gives away", "loses", "uses", "sells")[rng.integers(4)]
            sentences.append(f"{p} {verb} {n} of the {item}.")
            total -= n
        elif op == "mul":
            factor = int(rng.integers(2, 4))
            sentences.append(f"Then the number of {item} {pron} has {('doubles', 'triples')[factor - 2]}.")
            total *= factor
        else:
            d = divisors[rng.integers(len(divisors))]
            sentences.append(f"{p} shares all the {item} equally among {d} friends.")
            return " ".join(sentences) + f" How many {item} does each friend get?", total // d
    return " ".join(sentences) + f" How many {item} does {name} have now?", total


def _money_problem(rng: np.random.Generator, steps: int) -> tuple[str, int]:
    """A shopping story with amounts in cents (multiples of 5). Returns (text, answer in cents)."""
    name, pron = _PEOPLE[rng.integers(len(_PEOPLE))]
    p = pron.capitalize()
    total = int(rng.integers(200, 1200)) * 5  # $10.00 .. $59.95
    sentences = [f"{name} has {_money(total)}."]
    for _ in range(steps):
        single, plural = _GOODS[rng.integers(len(_GOODS))]
        kind = ("several", "one", "earn")[rng.integers(3)]
        if kind == "several" and total >= 2 * 50:
            count = int(rng.integers(2, 5))
            while total // count < 50:
                count -= 1
            price = int(rng.integers(10, min(total // count, 900) // 5 + 1)) * 5
            sentences.append(f"{p} buys {count} {plural} at {_money(price)} each.")
            total -= count * price
        elif kind == "one" and total >= 30:
            price = int(rng.integers(5, min(total - 5, 1500) // 5 + 1)) * 5
            sentences.append(f"{p} buys a {single} for {_money(price)}.")
            total -= price
        else:
            gift = int(rng.integers(5, 96)) * 5
            how = ("earns {} helping a neighbour", "gets {} from a friend", "finds {} in a coat pocket")
            sentences.append(f"{p} {how[rng.integers(len(how))].format(_money(gift))}.")
            total += gift
    return " ".join(sentences) + f" How much money does {name} have now?", total


def generate_problem(rng: np.random.Generator, difficulty: int) -> tuple[str, float, int]:
    """One problem from ``rng`` at ``difficulty``: (question text, exact answer, number of steps)."""
    steps = int(rng.integers(1, min(difficulty, 3) + 1))
    if difficulty == 4:
        text, cents = _money_problem(rng, steps)
        return text, round(cents / 100, 2), steps
    text, answer = _count_problem(rng, steps, difficulty)
    return text, answer, steps


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------


class ArithmeticTask:
    """Seeded arithmetic word problems with exact answers.

    Args:
        difficulty: 1 (one step, small integers) to 4 (money with cents); see the module docstring.
        n_train: problems in the train split.
        n_test: problems in the test split (disjoint from train: no problem text appears in both).
        n_validation: problems in the validation split (disjoint from both), for choices made by looking at
            results; the test split is then used only for the final report.
        seed: generation seed; the same (seed, difficulty, sizes) always give the same problems.
        instruction: appended to every question (tells the model how to state its answer); "" for none.
        discount: the verifier reward is ``discount ** (turns - 1)`` for a correct reply at turn ``turns``.
        system_prompt: an optional system message opening every conversation.

    Raises:
        DialogueError: a bad setting (names the argument and what is allowed).
    """

    name = "arithmetic"
    default_user = "critic"
    default_reward = "verifier"

    def __init__(self, difficulty: int = 1, n_train: int = 1000, n_test: int = 200, seed: int = 0,
                 instruction: str = DEFAULT_INSTRUCTION, discount: float = 1.0, system_prompt: str | None = None,
                 n_validation: int = 100):
        if isinstance(difficulty, bool) or difficulty not in DIFFICULTIES:
            allowed = ", ".join(map(str, DIFFICULTIES))
            raise DialogueError(f"task_kwargs.difficulty is {difficulty!r}; allowed: {allowed}")
        for key, v in (("n_train", n_train), ("n_test", n_test), ("n_validation", n_validation)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DialogueError(f"task_kwargs.{key} must be a positive integer, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DialogueError(f"task_kwargs.seed must be a non-negative integer, got {seed!r}")
        if not isinstance(discount, (int, float)) or isinstance(discount, bool) or not 0 < discount <= 1:
            raise DialogueError(f"task_kwargs.discount must be a number in (0, 1], got {discount!r}")
        if not isinstance(instruction, str):
            raise DialogueError(f"task_kwargs.instruction must be a string, got {type(instruction).__name__}")
        self.difficulty, self.n_train, self.n_test, self.seed = difficulty, n_train, n_test, seed
        self.n_validation = n_validation
        self.instruction, self.discount, self.system_prompt = instruction, float(discount), system_prompt
        test = self._generate("test", n_test, exclude=set())
        train = self._generate("train", n_train, exclude={r.profile["question"] for r in test})
        # generated after train, so adding it left the train and test problems as they were
        validation = self._generate("validation", n_validation,
                                    exclude={r.profile["question"] for r in test + train})
        self._rows = {"train": train, "test": test, "validation": validation}

    def _generate(self, split: str, n: int, exclude: set[str]) -> list[TaskRow]:
        rng = np.random.default_rng([self.seed, self.difficulty, SPLITS.index(split)])
        rows: list[TaskRow] = []
        seen = set(exclude)
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise DialogueError(f"could not generate {n} distinct {split} problems at difficulty "
                                    f"{self.difficulty}; ask for fewer (task_kwargs.n_{split})")
            question, answer, steps = generate_problem(rng, self.difficulty)
            if question in seen:
                continue
            seen.add(question)
            content = f"{question} {self.instruction}".strip()
            messages: list[Message] = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            profile = {"answer": answer, "steps": steps, "difficulty": self.difficulty, "question": question}
            rows.append(TaskRow(id=f"arith-d{self.difficulty}-s{self.seed}-{split}-{len(rows):05d}",
                                messages=messages, profile=profile))
        return rows

    def rows(self, split: str = "train") -> list[TaskRow]:
        if split not in SPLITS:
            raise DialogueError(f"split is {split!r}; allowed: {', '.join(SPLITS)}")
        return self._rows[split]

    def make_user(self, spec: str, engine: Callable[[], Any]) -> Any | None:
        if spec == "critic":
            return CriticUser()
        if spec == "critic_llm":
            return LLMCriticUser(engine)
        return None

    def make_reward(self, spec: str) -> Any | None:
        if spec == "verifier":
            return VerifierReward(discount=self.discount)
        return None

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "difficulty": self.difficulty, "n_train": self.n_train, "n_test": self.n_test,
                "n_validation": self.n_validation,
                "seed": self.seed, "instruction": self.instruction, "discount": self.discount,
                "system_prompt": self.system_prompt}


# ---------------------------------------------------------------------------------------------------------------
# Critic users and the verifier reward
# ---------------------------------------------------------------------------------------------------------------

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


def _profile_answer(profile: Mapping[str, Any], who: str) -> float:
    if "answer" not in profile:
        raise DialogueError(f"{who} needs the task profile's 'answer' (got profile keys {sorted(profile)}); "
                            "use it with the arithmetic task or put the answer in options['profile']")
    return float(profile["answer"])


def _last_assistant(conversation: Sequence[Message]) -> str:
    for m in reversed(conversation):
        if m["role"] == "assistant":
            return m["content"]
    return ""


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
            reply = _last_assistant(conv)
            if is_correct(reply, _profile_answer(profile, "the critic user")):
                out.append(UserTurn(CORRECT_REPLIES[int(seed) % len(CORRECT_REPLIES)], done=True))
            else:
                out.append(UserTurn(scripted_critique(reply, int(profile.get("steps", 1)), int(seed))))
        return out


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

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        out: list[UserTurn | None] = []
        ask: list[int] = []
        prompts = []
        for i, (conv, profile, seed) in enumerate(zip(conversations, profiles, seeds)):
            reply = _last_assistant(conv)
            if is_correct(reply, _profile_answer(profile, "the critic_llm user")):
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
                answer = _profile_answer(profiles[i], "the critic_llm user")
                text = g.text.strip()
                leaks = any(math.isclose(n.value, answer, abs_tol=1e-6) for n in find_numbers(text))
                if not text or leaks:
                    text = scripted_critique(_last_assistant(conversations[i]),
                                             int(profiles[i].get("steps", 1)), int(seeds[i]))
                out[i] = UserTurn(text)
        return [t for t in out if t is not None]


class VerifierReward:
    """1.0 when the last assistant reply states the correct answer, else 0.0, times ``discount ** (turns - 1)``.

    Args:
        discount: in (0, 1]; 1.0 makes the turn of success irrelevant, smaller values favour solving earlier.
    """

    def __init__(self, discount: float = 1.0):
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not 0 < discount <= 1:
            raise DialogueError(f"discount must be a number in (0, 1], got {discount!r}")
        self.discount = float(discount)

    def describe(self) -> dict[str, Any]:
        return {"reward": "verifier", "discount": self.discount}

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        if profiles is None or len(profiles) != len(conversations):
            raise DialogueError("the verifier reward needs one profile (with 'answer') per conversation")
        scores = np.zeros(len(conversations), dtype=np.float64)
        for i, (conv, profile) in enumerate(zip(conversations, profiles)):
            if is_correct(_last_assistant(conv), _profile_answer(profile, "the verifier reward")):
                scores[i] = self.discount ** max(0, count_assistant_turns(conv) - 1)
        return scores
