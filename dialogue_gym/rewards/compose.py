"""Reward combinators: each wraps reward models and is itself a :class:`~dialogue_gym.rewards.base.RewardModel`.

- :class:`WeightedSum` — ``sum_k w_k * r_k``: mix a reward model with a verifier, or several reward models.
- :class:`LengthPenalty` — ``r - lam * len(last assistant reply in characters)``: the RLHF Workflow recipe's
  "concise" variant (lam = 0.001).
- :class:`Clip` — ``min(max(r, lo), hi)``.
- :class:`RunningNorm` — ``(r - mean) / (std + eps)`` with a running mean and standard deviation over every score
  seen so far (updated with each batch before normalising it); its state saves and loads as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dialogue_gym.conversation import Message, check_profile
from dialogue_gym.rewards.base import RewardModel


def _check_rm(rm: Any, where: str) -> RewardModel:
    if not isinstance(rm, RewardModel):
        raise TypeError(f"{where} must be a RewardModel (with score() and describe()), got {type(rm).__name__}")
    return rm


def _scores(rm: RewardModel, conversations: Sequence[Sequence[Message]],
            profiles: Sequence[Mapping[str, Any]] | None) -> np.ndarray:
    got = np.asarray(rm.score(conversations, profiles), dtype=np.float64).reshape(-1)
    if got.shape != (len(conversations),):
        raise RuntimeError(f"reward {rm.describe()} returned {got.shape[0]} scores for {len(conversations)} "
                           "conversations")
    return got


def _finite(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{where} must be a finite number, got {x!r}")
    return float(x)


class WeightedSum:
    """``sum_k weight_k * rm_k(conversation)``.

    Args:
        terms: ``[(weight, reward_model), ...]``, at least one.
    """

    def __init__(self, terms: Sequence[tuple[float, RewardModel]]):
        if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or not terms:
            raise ValueError(f"terms must be a non-empty list of (weight, reward_model) pairs, got {terms!r}")
        self.terms: list[tuple[float, RewardModel]] = []
        for i, t in enumerate(terms):
            if not isinstance(t, (tuple, list)) or len(t) != 2:
                raise ValueError(f"terms[{i}] must be a (weight, reward_model) pair, got {t!r}")
            self.terms.append((_finite(t[0], f"terms[{i}] weight"), _check_rm(t[1], f"terms[{i}] reward model")))

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        for _, rm in self.terms:
            check_profile(rm, profile)

    def describe(self) -> dict[str, Any]:
        return {"reward": "weighted_sum", "terms": [{"weight": w, "reward": rm.describe()} for w, rm in self.terms]}

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        total = np.zeros(len(conversations), dtype=np.float64)
        for w, rm in self.terms:
            total += w * _scores(rm, conversations, profiles)
        return total


def last_reply_chars(conversation: Sequence[Message]) -> int:
    """Characters of the last assistant message (0 when there is none)."""
    for m in reversed(conversation):
        if m["role"] == "assistant":
            return len(m["content"])
    return 0


class LengthPenalty:
    """``rm(conversation) - lam * characters of the last assistant reply``.

    Args:
        rm: the reward model to penalise.
        lam: penalty per character (the recipe's concise variant uses 0.001); must be >= 0.
    """

    def __init__(self, rm: RewardModel, lam: float = 0.001):
        self.rm = _check_rm(rm, "rm")
        self.lam = _finite(lam, "lam")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0 (a penalty per character), got {lam!r}")

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        check_profile(self.rm, profile)

    def describe(self) -> dict[str, Any]:
        return {"reward": "length_penalty", "lam": self.lam, "inner": self.rm.describe()}

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        lengths = np.array([last_reply_chars(c) for c in conversations], dtype=np.float64)
        return _scores(self.rm, conversations, profiles) - self.lam * lengths


class Clip:
    """``min(max(rm(conversation), lo), hi)``.

    Args:
        rm: the reward model to clip.
        lo: lower bound.
        hi: upper bound (>= lo).
    """

    def __init__(self, rm: RewardModel, lo: float, hi: float):
        self.rm = _check_rm(rm, "rm")
        self.lo, self.hi = _finite(lo, "lo"), _finite(hi, "hi")
        if self.lo > self.hi:
            raise ValueError(f"lo ({lo}) must be <= hi ({hi})")

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        check_profile(self.rm, profile)

    def describe(self) -> dict[str, Any]:
        return {"reward": "clip", "lo": self.lo, "hi": self.hi, "inner": self.rm.describe()}

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        return np.clip(_scores(self.rm, conversations, profiles), self.lo, self.hi)


class RunningNorm:
    """``(rm(conversation) - mean) / (std + eps)`` with running statistics of every score seen.

    Each ``score`` call first adds the batch to the statistics (exact parallel mean/variance update), then
    normalises the batch with the updated statistics. Set ``update=False`` to freeze them (evaluation), and use
    :meth:`state_dict` / :meth:`save` to carry them between runs. Normalisation is opt-in: nothing wraps a reward
    in it unless asked.

    Args:
        rm: the reward model to normalise.
        eps: added to the standard deviation.
        update: whether ``score`` updates the statistics.
    """

    def __init__(self, rm: RewardModel, eps: float = 1e-8, update: bool = True):
        self.rm = _check_rm(rm, "rm")
        self.eps = _finite(eps, "eps")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.update = bool(update)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        """Population standard deviation of the scores seen (0 before any)."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        check_profile(self.rm, profile)

    def describe(self) -> dict[str, Any]:
        return {"reward": "running_norm", "eps": self.eps, "inner": self.rm.describe()}

    def observe(self, values: np.ndarray) -> None:
        """Add a batch of raw scores to the statistics (Chan et al.'s parallel update)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            return
        n_b, mean_b = values.size, float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        raw = _scores(self.rm, conversations, profiles)
        if self.update:
            self.observe(raw)
        if self.count == 0:
            return raw
        return (raw - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("count", "mean", "m2") if k not in state]
        if missing:
            raise ValueError(f"RunningNorm state is missing {missing}; expected keys count, mean, m2")
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"RunningNorm state count must be a non-negative integer, got {count!r}")
        m2 = _finite(state["m2"], "RunningNorm state m2")
        if m2 < 0:
            raise ValueError(f"RunningNorm state m2 must be >= 0, got {m2!r}")
        self.count, self.mean, self.m2 = count, _finite(state["mean"], "RunningNorm state mean"), m2

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict()))

    def load(self, path: str | Path) -> None:
        self.load_state_dict(json.loads(Path(path).read_text()))
