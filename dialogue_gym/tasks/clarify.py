"""Clarify: arithmetic word problems whose needed numbers arrive only in later turns, when the assistant asks.

## Description
A seeded story about a person and a quantity, changed by ``steps`` steps (0 to 2), then a question ("How many
apples does Maya have now?"). ``withheld`` of the story's numbers are left out of the opening message ("Maya has
some apples."); the scripted user holds them. ``distractors`` adds sentences with numbers the answer does not need
("Leo has 9 shells."). The task exists because on ``arithmetic`` everything happens on the first turn; here a
turn's value shows only later: asking earns nothing at once, and is the only way to the answer. With ``steps=0``
the story is only the withheld start: once the user gives it, the answer is that number, so what is left to learn
is the asking (the CPU leaderboard's shaping: the 135M policy rarely gets even one step of arithmetic right after
the number comes out).

## The user (``user: clarify``), after each assistant reply
1. a correct final answer (:func:`~dialogue_gym.tasks.arithmetic.is_correct`, the verifier's rule) ends the
   conversation (``terminated``) - a lucky guess before asking counts too;
2. otherwise, while numbers are still withheld: a reply that **asks** (has a "?") or **commits to no final answer**
   (states no "The answer is N" / ``\\boxed{N}``, see :func:`~dialogue_gym.tasks.arithmetic.stated_answer`; with
   ``reveal: strict`` it must also name no number at all, so a bare guess like "17 apples." gets nothing)
   gets the next withheld number ("Sorry, I left that out: Maya has 12 apples at the start."); with probability
   ``vague`` (drawn from the conversation's seed) the user answers vaguely instead and the number stays withheld;
   a reply that commits to a wrong answer is told what is unknown ("You can't know that yet: I haven't told you
   how many apples Maya has at the start."), without the number;
3. once every number is out, it critiques like arithmetic's critic user (never revealing the answer).
Why "commits to no final answer" also gets the number: the embedded 135M model almost never asks (0 of 32 replies at
T = 0.7, docs PLATFORM.md), but most of its replies end without "The answer is N"; RL can only reinforce what the
initial policy sometimes does, so this gives the useful behaviour a real base rate
(``benchmarks/clarify_base_rate.py`` measures it).

## Rewards
``verifier`` (default): 1.0 when the last assistant reply is correct, times ``discount ** (turn - 1)``. A reply
that solves the last allowed turn ends the episode with ``terminated=True``.

## Episode End and horizon
Use ``max_turns >= withheld + 1`` (the env's setting; ``conf/env/clarify.yaml`` has 3): one turn per withheld number,
one to answer. The best policy asks (or holds back its answer) until every number is out, then answers.

## What each algorithm should do here, and why
- **REFUEL** regresses each turn-h reply on the return of the rest of the dialogue (branches completed to the
  horizon): a turn-1 reply that asks is followed by a turn-2 answer that can be right (Q = 1), a wrong guess is
  not (Q = 0 unless lucky). It should learn to ask first - this is the credit assignment the paper claims.
- **REBEL** (and DPO with its default ``future=false``) scores the turn-h reply alone: asking scores 0, a wrong
  guess 0, a lucky guess 1, so at turn 1 it can only learn to guess; at later turns of on-policy roll-ins (after a
  number came out) it learns to answer. Expected: no more asking than the initial policy.
- **DPO online** pairs best vs worst of n replies by the same immediate reward: like REBEL, unless ``future=true``.
- **PPO** (terminal reward, GAE with gamma = 1 over the assistant turns) can credit the asking turn through its value
  function, if the value head learns from the few samples a CPU budget gives it.

## Splits
``train``, ``validation`` (for choices made by looking at results) and ``test``, disjoint: no (opening, hidden
numbers) pair appears in two splits.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dialogue_gym.conversation import DialogueError, Message
from dialogue_gym.tasks.answers import is_correct, profile_steps, stated_answer
from dialogue_gym.tasks.arithmetic import ITEMS, PEOPLE
from dialogue_gym.tasks.base import SPLITS, TaskRow
from dialogue_gym.tasks.critic import CORRECT_REPLIES, scripted_critique
from dialogue_gym.tasks.verifier import VerifierReward
from dialogue_gym.users.base import UserTurn

DEFAULT_INSTRUCTION = ("If a number you need is missing, ask me for it. When you know the answer, end your reply "
                       "with: The answer is <number>.")
REVEAL_INTROS = ("Sorry, I left that out:", "Oh, right:", "Good question.", "I forgot to say:")
VAGUE_REPLIES = ("Hmm, I don't remember exactly. Quite a few, I think.", "Not sure... some. Does it matter?",
                 "I can't recall the exact number, sorry.")
UNKNOWN_TEMPLATES = ("You can't know that yet: I haven't told you {unknown}.",
                     "How could you know? I never said {unknown}.",
                     "That's a guess: you don't know {unknown} yet.")
_ADD_VERBS = ("buys", "finds", "gets", "is given")
_SUB_VERBS = ("gives away", "loses", "uses", "sells")


def generate_clarify_problem(rng: np.random.Generator, steps: int, withheld: int, distractors: int
                             ) -> tuple[str, float, list[dict[str, str]]]:
    """One problem: ``(opening text without the instruction, answer, withheld facts in story order)``.

    Each withheld fact is ``{"text": the sentence the user reveals, "unknown": what the assistant does not know}``.
    """
    name = PEOPLE[rng.integers(len(PEOPLE))][0]
    item = ITEMS[rng.integers(len(ITEMS))]
    total = int(rng.integers(2, 21))
    # (known sentence, hidden sentence, revealed sentence, unknown phrase)
    facts = [(f"{name} has {total} {item}.", f"{name} has some {item}.", f"{name} has {total} {item} at the start.",
              f"how many {item} {name} has at the start")]
    for k in range(steps):  # the name, not a pronoun: distractor sentences may come between
        who, after = (name, "") if k == 0 else (f"Then {name}", " after that")
        if total >= 3 and rng.random() < 0.5:
            n, verb = int(rng.integers(1, total)), _SUB_VERBS[rng.integers(len(_SUB_VERBS))]
            facts.append((f"{who} {verb} {n} of the {item}.", f"{who} {verb} some of the {item}.",
                          f"{who} {verb} {n} of the {item}.", f"how many of the {item} {name} {verb}{after}"))
            total -= n
        else:
            n, verb = int(rng.integers(2, 21)), _ADD_VERBS[rng.integers(len(_ADD_VERBS))]
            facts.append((f"{who} {verb} {n} more {item}.", f"{who} {verb} some more {item}.",
                          f"{who} {verb} {n} more {item}.", f"how many more {item} {name} {verb}{after}"))
            total += n
    hidden = set(int(i) for i in rng.choice(len(facts), size=withheld, replace=False))
    sentences = [f[1] if i in hidden else f[0] for i, f in enumerate(facts)]
    others = [q for q in PEOPLE if q[0] != name]
    for _ in range(distractors):
        other = others[rng.integers(len(others))][0]
        thing = ITEMS[rng.integers(len(ITEMS))]
        sentences.insert(int(rng.integers(1, len(sentences) + 1)), f"{other} has {int(rng.integers(2, 21))} {thing}.")
    opening = " ".join(sentences) + f" How many {item} does {name} have now?"
    return opening, float(total), [{"text": facts[i][2], "unknown": facts[i][3]} for i in sorted(hidden)]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def check_clarify_profile(profile: Mapping[str, Any]) -> None:
    """Raise a DialogueError unless ``profile`` has what the clarify user reads: a numeric ``answer`` and ``facts``, a
    list of ``{"text": str, "unknown": str}`` (a profile sent by a client is checked here, per conversation)."""
    if "answer" not in profile or "facts" not in profile:
        raise DialogueError(f"the clarify user needs the profile's 'answer' and 'facts' (got keys "
                            f"{sorted(profile)}); use it with the clarify task")
    answer, facts = profile["answer"], profile["facts"]
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise DialogueError(f"the clarify user needs profile['answer'] to be a number, got {answer!r:.60}")
    if not isinstance(facts, list) or not all(
            isinstance(f, Mapping) and isinstance(f.get("text"), str) and isinstance(f.get("unknown"), str)
            for f in facts):
        raise DialogueError(f"the clarify user needs profile['facts'] to be a list of {{'text': str, 'unknown': str}}, "
                            f"got {facts!r:.80}")
    profile_steps(profile, "the clarify user")


def revealed(fact: Mapping[str, str], conversation: Sequence[Message]) -> bool:
    """Whether a user message after the opening has stated ``fact``."""
    return any(m["role"] == "user" and fact["text"] in m["content"] for m in conversation[1:])


REVEAL_RULES = ("lenient", "strict")


def asks_or_holds_back(reply: str, reveal: str = "lenient") -> bool:
    """The behaviour the user rewards with a number.

    ``lenient``: the reply asks (has a "?") or commits to no final answer. ``strict``: it asks, or it *clearly*
    holds back: no final answer and no number at all (a reply that names a number without "The answer is" is a
    guess too).
    """
    if "?" in reply:
        return True
    if reveal == "strict":
        return stated_answer(reply) is None and re.search(r"\d", reply) is None
    return stated_answer(reply) is None


class ClarifyUser:
    """The scripted, seeded user of the clarify task (rules in the module docstring).

    Args:
        vague: probability in [0, 1) that a request for a withheld number gets a vague reply instead.
        reveal: which replies get a withheld number, ``lenient`` or ``strict`` (:func:`asks_or_holds_back`).
    """

    def __init__(self, vague: float = 0.0, reveal: str = "lenient"):
        if reveal not in REVEAL_RULES:
            raise DialogueError(f"reveal is {reveal!r}; allowed: {', '.join(REVEAL_RULES)}")
        self.vague, self.reveal = float(vague), reveal

    def describe(self) -> dict[str, Any]:
        return {"user": "clarify", "vague": self.vague, "reveal_rule": self.reveal, "reveal": list(REVEAL_INTROS),
                "vague_replies": list(VAGUE_REPLIES), "unknown": list(UNKNOWN_TEMPLATES),
                "correct": list(CORRECT_REPLIES)}

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        check_clarify_profile(profile)

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        out = []
        for conv, profile, seed in zip(conversations, profiles, seeds):
            check_clarify_profile(profile)
            reply = next((m["content"] for m in reversed(conv) if m["role"] == "assistant"), "")
            rng = np.random.default_rng(int(seed))
            missing = [f for f in profile["facts"] if not revealed(f, conv)]
            if is_correct(reply, float(profile["answer"])):
                out.append(UserTurn(_pick(rng, CORRECT_REPLIES), done=True))
            elif not missing:
                out.append(UserTurn(scripted_critique(reply, profile_steps(profile, "the clarify user"), int(seed))))
            elif asks_or_holds_back(reply, self.reveal):
                if rng.random() < self.vague:
                    out.append(UserTurn(_pick(rng, VAGUE_REPLIES)))
                else:
                    out.append(UserTurn(f"{_pick(rng, REVEAL_INTROS)} {missing[0]['text']}"))
            else:
                out.append(UserTurn(_pick(rng, UNKNOWN_TEMPLATES).format(unknown=missing[0]["unknown"])))
        return out


class ClarifyTask:
    """Seeded word problems with ``withheld`` numbers that the user gives when asked.

    Args:
        steps: changes to the starting quantity, 0 .. 2 (0: the withheld number is the answer).
        withheld: numbers left out of the opening, 1 .. steps + 1.
        distractors: sentences with numbers the answer does not need, 0 .. 3.
        vague: probability in [0, 1) that the user answers a request vaguely (the number stays withheld).
        n_train, n_validation, n_test: problems per split (disjoint).
        seed: generation seed.
        instruction: appended to every opening (tells the model to ask, and how to state its answer).
        discount: the verifier reward is ``discount ** (turns - 1)`` for a correct reply at turn ``turns``.
        system_prompt: an optional system message opening every conversation.
        reveal: which replies the user gives a withheld number to: ``lenient`` (asks, or states no final answer)
            or ``strict`` (asks, or states no final answer and names no number: a clear holding back).

    Raises:
        DialogueError: a bad setting (names the argument and what is allowed).
    """

    name = "clarify"
    default_user = "clarify"
    default_reward = "verifier"

    def __init__(self, steps: int = 1, withheld: int = 1, distractors: int = 0, vague: float = 0.0,
                 n_train: int = 2000, n_validation: int = 100, n_test: int = 200, seed: int = 0,
                 instruction: str = DEFAULT_INSTRUCTION, discount: float = 1.0, system_prompt: str | None = None,
                 reveal: str = "lenient"):
        def whole(key: str, v: Any, lo: int, hi: int) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise DialogueError(f"task_kwargs.{key} must be an integer in [{lo}, {hi}], got {v!r}")

        whole("steps", steps, 0, 2)
        whole("withheld", withheld, 1, steps + 1)
        whole("distractors", distractors, 0, 3)
        for key, v in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
            whole(key, v, 1, 100_000)
        whole("seed", seed, 0, 2**63 - 1)
        if isinstance(vague, bool) or not isinstance(vague, (int, float)) or not 0 <= vague < 1:
            raise DialogueError(f"task_kwargs.vague must be a probability in [0, 1), got {vague!r}")
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not 0 < discount <= 1:
            raise DialogueError(f"task_kwargs.discount must be a number in (0, 1], got {discount!r}")
        if reveal not in REVEAL_RULES:
            raise DialogueError(f"task_kwargs.reveal is {reveal!r}; allowed: {', '.join(REVEAL_RULES)}")
        self.reveal = reveal
        if not isinstance(instruction, str):
            raise DialogueError(f"task_kwargs.instruction must be a string, got {type(instruction).__name__}")
        self.steps, self.withheld, self.distractors, self.vague = steps, withheld, distractors, float(vague)
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.seed, self.instruction, self.discount, self.system_prompt = seed, instruction, float(discount), \
            system_prompt
        seen: set[str] = set()
        self._rows = {split: self._generate(split, self.sizes[split], seen) for split in ("test", "train",
                                                                                          "validation")}

    def _generate(self, split: str, n: int, seen: set[str]) -> list[TaskRow]:
        rng = np.random.default_rng([self.seed, self.steps, self.withheld, self.distractors, SPLITS.index(split)])
        rows: list[TaskRow] = []
        for _ in range(50 * n + 1000):
            if len(rows) == n:
                return rows
            opening, answer, facts = generate_clarify_problem(rng, self.steps, self.withheld, self.distractors)
            key = json.dumps([opening, facts])
            if key in seen:
                continue
            seen.add(key)
            messages: list[Message] = [{"role": "user", "content": f"{opening} {self.instruction}".strip()}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            profile = {"answer": answer, "steps": self.steps, "question": opening, "facts": facts}
            rows.append(TaskRow(id=f"clarify-s{self.seed}-{split}-{len(rows):05d}", messages=messages,
                                profile=profile))
        raise DialogueError(f"could not generate {n} distinct {split} problems with these settings; ask for fewer "
                            f"(task_kwargs.n_{split})")

    def rows(self, split: str = "train") -> list[TaskRow]:
        if split not in SPLITS:
            raise DialogueError(f"split is {split!r}; allowed: {', '.join(SPLITS)}")
        return self._rows[split]

    def make_user(self, spec: str, engine: Callable[[], Any]) -> Any | None:
        return ClarifyUser(self.vague, self.reveal) if spec == "clarify" else None

    def make_reward(self, spec: str) -> Any | None:
        return VerifierReward(discount=self.discount) if spec == "verifier" else None

    def asks(self, reply: str) -> bool:
        """The behaviour this task exists to teach (:func:`asks_or_holds_back` under the task's ``reveal`` rule);
        the leaderboard reports its rate."""
        return asks_or_holds_back(reply, self.reveal)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "steps": self.steps, "withheld": self.withheld, "distractors": self.distractors,
                "vague": self.vague, **{f"n_{k}": v for k, v in self.sizes.items()}, "seed": self.seed,
                "instruction": self.instruction, "discount": self.discount, "system_prompt": self.system_prompt,
                "reveal": self.reveal}
