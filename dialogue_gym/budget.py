"""Training budgets counted by the environment itself, so every agent is held to the same measure.

An agent builds several vector envs (roll-in, branches, its own held-out evaluation), each with its own
``DialogueCore``. A budget must span all of them without the agent knowing, so it is *process-wide*: inside
``with use_budget(Budget(...)):`` every core charges the active budget on every step:

- ``policy_samples``: assistant turns stepped (one per sub-env per step; a sit-out ``None`` action is free);
- ``policy_tokens``: their tokens, when the budget has a ``count_tokens`` function (e.g. the policy tokenizer);
- ``scored_conversations``: conversations the reward model scored; ``reward_calls``: batched reward calls;
- ``steps``: batched env steps;
- ``optimizer_steps``: ``torch.optim`` optimizer steps taken anywhere in the process (a global step pre-hook,
  charged to the ``"train"`` split), so an agent that squeezes more updates out of the same samples is seen.
- ``user_calls``: batched calls to the simulated user made by those steps.

Counts are kept per split. Limits apply to ``limited_splits`` (``"train"``: the agent's training rollouts); the
agents' own evaluations on the ``"test"`` split are counted but never stopped. A step that would take a limited
split past a limit raises :class:`BudgetExhausted` before its reward call and is not counted, so the counters
never exceed the limits and always equal what completed steps used (a step whose reward call raises is refunded).
The env stays usable (both envs step on copies of their states), but the agent's run ends there unless it catches
the error.

Why process-wide and not an ``EnvConfig`` field: agents build their envs from Hydra settings that cannot carry a
Python object, and a budget passed to one env would miss the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

LIMITS = ("policy_samples", "scored_conversations", "optimizer_steps")


class BudgetExhausted(RuntimeError):
    """A step would spend more than the active budget allows (raised by the env before the step's reward call)."""


@dataclass
class Usage:
    """What envs spent on one split (a budget keeps one per split; each env keeps its own, ``venv.usage``).

    Attributes:
        policy_samples: assistant turns stepped.
        policy_tokens: tokens of those turns (0 when the budget has no ``count_tokens``).
        scored_conversations: conversations scored by the reward model.
        reward_calls: batched reward-model calls.
        steps: batched env steps (``DialogueCore.advance`` calls).
        optimizer_steps: optimizer steps taken (counted on the ``"train"`` split only).
        user_calls: batched simulated-user calls (an env's own counter also counts those answering a reset
            prefix that ends with an assistant turn).
    """

    policy_samples: int = 0
    policy_tokens: int = 0
    scored_conversations: int = 0
    reward_calls: int = 0
    steps: int = 0
    optimizer_steps: int = 0
    user_calls: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add_step(self, samples: int, tokens: int, scored: int, user_calls: int) -> None:
        """Count one env step: ``samples`` assistant turns of ``tokens`` tokens, ``scored`` conversations scored
        (one batched reward call when > 0) and ``user_calls`` batched user calls."""
        self.policy_samples += samples
        self.policy_tokens += tokens
        self.scored_conversations += scored
        self.reward_calls += 1 if scored else 0
        self.steps += 1
        self.user_calls += user_calls


@dataclass
class Budget:
    """Limits on what the envs of this process may spend, and what they spent, per split.

    Attributes:
        policy_samples: most assistant turns the limited splits may step (None: no limit).
        scored_conversations: most conversations the reward model may score on the limited splits (None: no limit).
        optimizer_steps: most optimizer steps the process may take (None: no limit; charged to ``"train"``).
        limited_splits: the splits the limits apply to; other splits are counted only.
        count_tokens: maps an assistant message to its number of tokens, for ``Usage.policy_tokens``.
        used: counters per split (filled by the envs).

    Raises:
        ValueError: a limit that is not a non-negative integer or None, naming it.
    """

    policy_samples: int | None = None
    scored_conversations: int | None = None
    optimizer_steps: int | None = None
    limited_splits: tuple[str, ...] = ("train",)
    count_tokens: Callable[[str], int] | None = None
    used: dict[str, Usage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in LIMITS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"budget {name} must be a non-negative integer or None (no limit), got {v!r}")
        if isinstance(self.limited_splits, str):
            raise ValueError(f"budget limited_splits must be a tuple of split names, got the string "
                             f"{self.limited_splits!r}")
        self.limited_splits = tuple(self.limited_splits)
        self._lock = threading.Lock()

    def limits(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in LIMITS}

    def usage(self, split: str = "train") -> Usage:
        """A copy of the counters of ``split`` (zeros when nothing was spent there)."""
        with self._lock:
            return Usage(**asdict(self.used.get(split, Usage())))

    def charge(self, split: str, actions: Sequence[str], scored: int, user_calls: int = 0) -> None:
        """Pay for one env step: ``actions`` stepped, ``scored`` conversations sent to the reward model and
        ``user_calls`` batched user calls made.

        Raises:
            BudgetExhausted: the step would take a limited split past a limit; nothing is counted.
        """
        tokens = sum(self.count_tokens(a) for a in actions) if self.count_tokens is not None else 0
        with self._lock:
            u = self.used.setdefault(split, Usage())
            if split in self.limited_splits:
                for name, extra in (("policy_samples", len(actions)), ("scored_conversations", scored)):
                    limit = getattr(self, name)
                    if limit is not None and getattr(u, name) + extra > limit:
                        raise BudgetExhausted(
                            f"budget exhausted on split {split!r}: {name} would reach {getattr(u, name) + extra} "
                            f"({getattr(u, name)} used + {extra} in this step), the limit is {limit}"
                        )
            u.add_step(len(actions), tokens, scored, user_calls)

    def refund(self, split: str, actions: Sequence[str], scored: int) -> None:
        """Take back a :meth:`charge` whose step then failed (its reward call raised): the samples, tokens, scored
        conversations, reward call and step, so a caller that retries the step pays for it once. The step's user
        calls stay counted: they were made (``user_calls`` counts calls, and no limit applies to it)."""
        tokens = sum(self.count_tokens(a) for a in actions) if self.count_tokens is not None else 0
        with self._lock:
            u = self.used.setdefault(split, Usage())
            u.policy_samples -= len(actions)
            u.policy_tokens -= tokens
            u.scored_conversations -= scored
            u.reward_calls -= 1 if scored else 0
            u.steps -= 1

    def charge_optimizer_step(self) -> None:
        """Pay for one optimizer step (split ``"train"``).

        Raises:
            BudgetExhausted: the step would take ``"train"`` past ``optimizer_steps`` (when limited); not counted.
        """
        with self._lock:
            u = self.used.setdefault("train", Usage())
            if "train" in self.limited_splits and self.optimizer_steps is not None and \
                    u.optimizer_steps + 1 > self.optimizer_steps:
                raise BudgetExhausted(f"budget exhausted on split 'train': optimizer_steps would reach "
                                      f"{u.optimizer_steps + 1}, the limit is {self.optimizer_steps}")
            u.optimizer_steps += 1


_active: Budget | None = None
_active_lock = threading.Lock()


@contextmanager
def use_budget(budget: Budget) -> Iterator[Budget]:
    """Make ``budget`` the process's active budget inside the block (every env core charges it).

    Raises:
        RuntimeError: another budget is already active (budgets do not nest).
    """
    global _active
    if not isinstance(budget, Budget):
        raise TypeError(f"use_budget needs a Budget, got {type(budget).__name__}")
    with _active_lock:
        if _active is not None:
            raise RuntimeError("a budget is already active in this process; budgets do not nest")
        _active = budget
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    # every optimizer of the process, whatever agent built it: the step is charged (or refused) before it is taken
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: budget.charge_optimizer_step())
    try:
        yield budget
    finally:
        hook.remove()
        with _active_lock:
            _active = None


def active_budget() -> Budget | None:
    """The budget envs charge right now, or None."""
    return _active


def spend(split: str, actions: Sequence[str], scored: int, user_calls: int = 0) -> Budget | None:
    """Charge the active budget, if any, for one env step (called by ``DialogueCore.advance``); returns the budget
    charged (for :meth:`Budget.refund` if the step then fails), or None."""
    budget = _active
    if budget is not None:
        budget.charge(split, actions, scored, user_calls)
    return budget


__all__ = ["LIMITS", "Budget", "BudgetExhausted", "Usage", "active_budget", "spend", "use_budget"]
