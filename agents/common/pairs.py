"""Pair construction: best-vs-worst selection (online DPO, REBEL) and REFUEL's choice of the turn to branch at.

Pure functions over numbers; they never touch a model or the environment. Turns are numbered from 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["TURN_MODES", "reference_turn_distribution", "sample_turn", "select_best_worst"]

TURN_MODES = ("reference", "uniform", "last")
TurnMode = Literal["reference", "uniform", "last"]  # the values of TURN_MODES


def _as_vector(name: str, values: Sequence[float] | np.ndarray, fn: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fn}: {name} must be a sequence of numbers ({e})") from e
    if arr.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D with one entry per sample, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{fn}: {name}[{int(bad[0])}] is {arr[bad[0]]}; every entry must be finite (drop failed samples first)"
        )
    return arr


def select_best_worst(
    rewards: Sequence[float] | np.ndarray,
    lengths: Sequence[float] | np.ndarray | None = None,
    length_penalty: float = 0.0,
) -> tuple[int, int] | None:
    """Indices of the best and the worst of ``n`` samples of one prompt (RLHF-Workflow online DPO pairs).

    Samples are ranked by ``rewards[i] − length_penalty · lengths[i]`` (the "concise" variant uses
    λ = 0.001 with lengths in characters). Among equal best (or worst) scores the lowest index wins, so the
    choice is deterministic.

    Args:
        rewards: (n,) reward-model scores, finite.
        lengths: (n,) reply lengths (e.g. characters), ≥ 0; needed only when ``length_penalty`` > 0.
        length_penalty: λ ≥ 0.

    Returns:
        ``(best_index, worst_index)`` (Python ints, always different), or None when no pair can be made:
        fewer than 2 samples, or all penalised scores equal (a tie carries no preference and is dropped).

    Raises:
        ValueError: non-finite or non-1-D rewards/lengths, lengths of another size or negative,
            ``length_penalty`` negative, or ``length_penalty`` > 0 without ``lengths``.
    """
    fn = "select_best_worst"
    r = _as_vector("rewards", rewards, fn)
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, (int, float))
        or not math.isfinite(length_penalty)
        or length_penalty < 0
    ):
        raise ValueError(f"{fn}: length_penalty must be a finite number >= 0, got {length_penalty!r}")
    score = r
    if lengths is not None:
        lens = _as_vector("lengths", lengths, fn)
        if lens.shape != r.shape:
            raise ValueError(f"{fn}: lengths has {lens.shape[0]} entries but rewards has {r.shape[0]}; they must match")
        if (lens < 0).any():
            raise ValueError(f"{fn}: lengths[{int(np.flatnonzero(lens < 0)[0])}] is negative; lengths must be >= 0")
        score = r - float(length_penalty) * lens
    elif length_penalty > 0:
        raise ValueError(f"{fn}: length_penalty={length_penalty} needs lengths (one per sample), got None")
    if score.shape[0] < 2:
        return None
    best, worst = int(np.argmax(score)), int(np.argmin(score))
    if score[best] == score[worst]:
        return None
    return best, worst


def _check_max_horizon(max_horizon: int, fn: str) -> int:
    if isinstance(max_horizon, bool) or not isinstance(max_horizon, (int, np.integer)) or max_horizon < 1:
        raise ValueError(f"{fn}: max_horizon must be an int >= 1, got {max_horizon!r}")
    return int(max_horizon)


def sample_turn(
    rng: np.random.Generator, max_horizon: int = 5, mode: TurnMode = "reference"
) -> tuple[int, int]:
    """Draw REFUEL's rollout horizon H' and the turn h (1 ≤ h ≤ H') at which to branch.

    Modes:
        ``"reference"`` (the REFUEL reference code): H' uniform in {1..max_horizon}, then h uniform in
        {1..H'}. Early turns are drawn more often — for max_horizon 5, P(h=1) ≈ .46 … P(h=5) = .04 (see
        :func:`reference_turn_distribution`) — and the branches are only rolled out to H'.
        ``"uniform"``: h uniform in {1..max_horizon} and H' = max_horizon.
        ``"last"``: h = H' = max_horizon (no draw): the last-turn baseline of the REFUEL paper (a dialogue that
        ends earlier is branched at the last turn it reached).

    Args:
        rng: the caller's seeded generator (consumed: two draws in ``"reference"`` mode, one in ``"uniform"``,
            none in ``"last"``).
        max_horizon: the longest dialogue, in assistant turns (reference: 5).
        mode: ``"reference"``, ``"uniform"`` or ``"last"``.

    Returns:
        ``(horizon, turn)`` as Python ints.
    """
    fn = "sample_turn"
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{fn}: rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}")
    max_horizon = _check_max_horizon(max_horizon, fn)
    if mode == "reference":
        horizon = int(rng.integers(1, max_horizon + 1))
        return horizon, int(rng.integers(1, horizon + 1))
    if mode == "uniform":
        return max_horizon, int(rng.integers(1, max_horizon + 1))
    if mode == "last":
        return max_horizon, max_horizon
    raise ValueError(f"{fn}: mode must be one of {', '.join(TURN_MODES)}, got {mode!r}")


def reference_turn_distribution(max_horizon: int = 5) -> np.ndarray:
    """Exact P(h) of ``sample_turn(mode="reference")``: ``P(h) = (1/M) · Σ_{H'=h..M} 1/H'``.

    Returns:
        (max_horizon,) float64 array whose entry ``h − 1`` is P(h); it sums to 1.
    """
    m = _check_max_horizon(max_horizon, "reference_turn_distribution")
    inv = 1.0 / np.arange(1, m + 1, dtype=np.float64)  # 1/H' for H' = 1..M
    tail = np.cumsum(inv[::-1])[::-1]  # entry h−1: Σ_{H'=h..M} 1/H'
    return tail / m
