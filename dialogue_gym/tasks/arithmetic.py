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

This module holds the problem generator and the task; the answer grammar is in :mod:`dialogue_gym.tasks.answers`,
the critic users in :mod:`dialogue_gym.tasks.critic` and the verifier in :mod:`dialogue_gym.tasks.verifier`
(all re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dialogue_gym.conversation import DialogueError, Message
from dialogue_gym.tasks.answers import (  # re-exported: the answer grammar lived here before answers.py
    NumberMention,
    extract_answer,
    find_numbers,
    is_correct,
    last_assistant,
    profile_answer,
    stated_answer,
)
from dialogue_gym.tasks.base import SPLITS, TaskRow
from dialogue_gym.tasks.critic import (  # re-exported, as above
    CORRECT_REPLIES,
    LLM_CRITIC_PROMPT,
    NO_ANSWER_CRITIQUES,
    WRONG_CRITIQUES,
    CriticUser,
    LLMCriticUser,
    scripted_critique,
)
from dialogue_gym.tasks.verifier import VerifierReward

DIFFICULTIES = (1, 2, 3, 4)
DEFAULT_INSTRUCTION = "End your reply with: The answer is <number>."

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


__all__ = ["CORRECT_REPLIES", "DEFAULT_INSTRUCTION", "DIFFICULTIES", "ITEMS", "LLM_CRITIC_PROMPT",
           "NO_ANSWER_CRITIQUES", "PEOPLE", "WRONG_CRITIQUES", "ArithmeticTask", "CriticUser", "LLMCriticUser",
           "NumberMention", "VerifierReward", "extract_answer", "find_numbers", "generate_problem", "is_correct",
           "last_assistant", "profile_answer", "scripted_critique", "stated_answer"]
