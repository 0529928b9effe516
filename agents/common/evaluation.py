"""In-run evaluation: fixed held-out states and user seeds, per-turn reward, win rate vs the initial policy.

Every evaluation of a run (and every agent evaluated with the same settings) plays the same test rows with the
same user seeds. A policy's turn-h outcome is the score of its conversation at turn h, carried forward after a
dialogue ended (a solved arithmetic problem stays solved). The win rate at turn h compares, dialogue by
dialogue, the policy's turn-h outcome with the initial policy's: 1 for higher, 0.5 for a tie, 0 for lower.
Intervals are percentile bootstrap 95% over dialogues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def carry_forward(scores: np.ndarray) -> np.ndarray:
    """(n, H) scores with NaN after a dialogue's end replaced by its last score."""
    out = scores.copy()
    for h in range(1, out.shape[1]):
        gap = np.isnan(out[:, h])
        out[gap, h] = out[gap, h - 1]
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (1-D, NaNs dropped)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def win_outcomes(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """(n, H) per-dialogue outcomes vs the baseline: 1 win, 0.5 tie, 0 loss (on carried-forward scores)."""
    a, b = carry_forward(scores), carry_forward(baseline)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def summarize(result: dict[str, Any], baseline: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """Per-turn metrics of one evaluation (see module docstring); JSON-able."""
    scores = np.asarray(result["scores"], dtype=float)
    n, horizon = scores.shape
    out: dict[str, Any] = {"policy": name, "dialogues": n, "turns": list(range(1, horizon + 1)),
                           "tokens": int(result.get("tokens", 0))}
    out["mean_reward"] = [float(np.nanmean(scores[:, h])) if (~np.isnan(scores[:, h])).any() else None
                          for h in range(horizon)]
    cf = carry_forward(scores)
    out["mean_outcome"] = [float(cf[:, h].mean()) for h in range(horizon)]
    out["outcome_ci"] = [list(bootstrap_ci(cf[:, h], seed=h)) for h in range(horizon)]
    if "terminated" in result:
        term = np.asarray(result["terminated"], dtype=bool)
        ended = np.asarray(result["ended_at"])
        # terminal by turn h: the user ended the dialogue or its last allowed turn solved the task (the env's rule)
        out["terminated_by_turn"] = [float((term & (ended <= h + 1)).mean()) for h in range(horizon)]
    if baseline is not None:
        wins = win_outcomes(scores, np.asarray(baseline["scores"], dtype=float))
        out["win_rate"] = [float(wins[:, h].mean()) for h in range(horizon)]
        out["win_rate_ci"] = [list(bootstrap_ci(wins[:, h], seed=100 + h)) for h in range(horizon)]
    out["scores"] = [[None if np.isnan(x) else float(x) for x in row] for row in scores]
    return out


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per evaluated policy, per-turn outcome and win rate with intervals."""
    horizon = len(summaries[0]["turns"])
    head = "| policy | metric | " + " | ".join(f"h={h}" for h in range(1, horizon + 1)) + " |"
    lines = [head, "|" + "---|" * (horizon + 2)]
    for s in summaries:
        cells = [f"{m:.3f} [{lo:.2f}, {hi:.2f}]" for m, (lo, hi) in zip(s["mean_outcome"], s["outcome_ci"])]
        lines.append(f"| {s['policy']} | score at turn h | " + " | ".join(cells) + " |")
        if "win_rate" in s:
            cells = [f"{w:.3f} [{lo:.2f}, {hi:.2f}]" for w, (lo, hi) in zip(s["win_rate"], s["win_rate_ci"])]
            lines.append(f"| {s['policy']} | win rate vs initial | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
