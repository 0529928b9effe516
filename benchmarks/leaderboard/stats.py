"""Intervals a reviewer can accept: a hierarchical bootstrap over training seeds and evaluation states, and paired
differences on the same states.

Every agent is trained with several seeds and every trained policy plays the same stored states, so a result is a
(seeds, states) matrix per turn. Treating its seeds x states cells as independent rows (what the first leaderboard
did) ignores that the same states repeat in every seed and that training itself varies from seed to seed: the
interval of a three-seed agent came out narrower than the one-"seed" initial policy's on the same states. Here each
bootstrap replicate resamples the training seeds with replacement, then the states within each drawn seed, so both
sources of variance are in the interval. A comparison of two policies is made on the difference matrix (same
states; for two agents also the same training seeds, paired by position), so what the states share cancels: the
difference of identical agents is exactly 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.common.evaluation import carry_forward, win_outcomes


def hierarchical_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean of a (seeds, states) matrix: seeds drawn with replacement, then
    the states within each drawn seed (independently per drawn seed)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"values must be a non-empty (seeds, states) matrix, got shape {v.shape}")
    s, n = v.shape
    seeds = rng.integers(0, s, size=(n_boot, s))  # (B, S)
    states = rng.integers(0, n, size=(n_boot, s, n))  # (B, S, N)
    return v[seeds[:, :, None], states].mean(axis=(1, 2))


def hierarchical_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                    ) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of a (seeds, states) matrix and its percentile-bootstrap interval from
    :func:`hierarchical_means`. One row (one seed, or a deterministic policy) resamples the states only."""
    v = np.asarray(values, dtype=float)
    means = hierarchical_means(v, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                      ) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of ``a - b`` on the same states: (seeds, states) matrices with the same states in the same
    order; ``b`` with one row (the initial policy) is compared with every seed of ``a``, otherwise both have the same
    seeds in the same order (row k of each was trained with seed k). Hierarchical bootstrap of the difference."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[1] != b.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"paired matrices need the same states and seeds (or one row for b), got {a.shape} and "
                         f"{b.shape}")
    return hierarchical_ci(a - b, n_boot=n_boot, seed=seed, level=level)


def policy_matrices(records: list[list[Any]], base_scores: np.ndarray, horizon: int, score_matrix: Any,
                    success: Any | None, asks: Any | None = None) -> dict[str, np.ndarray]:
    """(seeds, states, horizon) matrices of one policy, one seed per entry of ``records``: ``score`` (carried
    forward), ``win`` (vs the initial policy's ``base_scores``: 1, 0.5 tie, 0), and ``success`` / ``asks`` where
    those callables map records to a (states, horizon) matrix."""
    played = [score_matrix(r, horizon) for r in records]
    out = {"score": np.stack([carry_forward(m) for m in played]),
           "win": np.stack([win_outcomes(m, base_scores) for m in played])}
    if success is not None:
        out["success"] = np.stack([success(r) for r in records])
    if asks is not None:
        out["asks"] = np.stack([asks(r) for r in records])
    return out


def metric_rows(name: str, seeds: list[str], mats: dict[str, np.ndarray], n_boot: int) -> list[dict[str, Any]]:
    """Rows per (seed "all" or one seed, turn): each metric's mean and interval. "all" is the hierarchical bootstrap
    over the seeds; a single seed's row resamples its states."""
    rows = []
    horizon = next(iter(mats.values())).shape[2]
    for label, pick in [("all", slice(None))] + [(s, slice(k, k + 1)) for k, s in enumerate(seeds)]:
        for h in range(horizon):
            row: dict[str, Any] = {"policy": name, "seed": label, "turn": h + 1}
            for key, offset in (("win", 100), ("score", 0), ("success", 200), ("asks", 400)):
                if key in mats:
                    row[key], row[f"{key}_lo"], row[f"{key}_hi"] = hierarchical_ci(
                        mats[key][pick, :, h], n_boot=n_boot, seed=offset + h)
            rows.append(row)
    return rows


def paired_rows(groups: dict[str, dict[str, np.ndarray]], seeds: dict[str, list[int]], n_boot: int
                ) -> list[dict[str, Any]]:
    """Paired differences at every turn: each agent minus the initial policy, and each pair of agents (in order) that
    ran the same seeds; for ``score`` and (where present) ``success``."""
    agents = [a for a in groups if a != "initial"]
    pairs = [(a, "initial") for a in agents]
    pairs += [(a, b) for i, a in enumerate(agents) for b in agents[i + 1:] if seeds[a] == seeds[b]]
    rows = []
    for a, b in pairs:
        for metric in ("success", "score"):
            if metric not in groups[a]:
                continue
            for h in range(groups[a][metric].shape[2]):
                d, lo, hi = paired_difference(groups[a][metric][:, :, h], groups[b][metric][:, :, h],
                                              n_boot=n_boot, seed=300 + h)
                rows.append({"a": a, "b": b, "metric": metric, "turn": h + 1, "diff": d, "lo": lo, "hi": hi,
                             "excludes_0": bool(lo > 0 or hi < 0)})
    return rows
