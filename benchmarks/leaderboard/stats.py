"""Intervals a reviewer can accept: a bootstrap of the crossed (seeds x states) design, a seed-level test and the
power of every comparison.

Every agent is trained with several seeds and every trained policy plays the *same* stored states, so a result is
a (seeds, states) matrix per turn whose rows and columns are crossed, not nested. Two earlier designs were wrong:

1. Treating the seeds x states cells as independent rows ignored that the same states repeat in every seed and
   that training varies from seed to seed.
2. A nested bootstrap (seeds drawn, then states drawn *independently for each drawn seed*) averaged the state
   effect away inside each replicate: on 64 states the three-seed REFUEL interval came out narrower than the
   one-row initial policy's, and in simulation of that design the true standard error was 0.053 where the nested
   bootstrap gave 0.036.

The model behind the intervals here is the two-way random-effects decomposition of a cell,
``y_ij = mu + a_i + b_j + e_ij`` (seed effect a, state effect b, interaction and outcome noise e). The grand mean's
variance is ``s_a^2 / S + s_b^2 / N + s_e^2 / (S N)``. Each bootstrap replicate draws the seeds with replacement
and *one* resample of the states, shared by every drawn seed (the crossed or "pigeonhole" bootstrap). Its three
parts (the replicate's seed part, state part and interaction part, computed from the matrix's own two-way
decomposition) are rescaled so that each has the method-of-moments variance of its component: the plain crossed
bootstrap underestimates the seed part by (S - 1) / S (a third with three seeds) and counts the interaction in
the seed and state parts twice. The interval is the mean +- t * SE, SE the replicates' standard deviation and t
Student's quantile at the Satterthwaite degrees of freedom of the three components: with three seeds and
seed-dominated variance that is about 2 degrees of freedom, and a percentile interval would cover far less than
95% (tests/benchmarks/test_leaderboard_stats.py simulates both regimes).

A comparison of two policies is made on the difference matrix (the same states; for two agents also the same
training seeds, paired by position), so what the states share cancels: the difference of identical agents is
exactly 0. Beside each interval: a seed-level test (a one-sample t-test over the per-seed mean differences,
S - 1 degrees of freedom; it needs two seeds) and the comparison's power, stated as the smallest difference the
interval would detect (exclude 0) with 80% probability at the run's design (``mde80``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq

from agents.common.evaluation import carry_forward, win_outcomes

LEVEL = 0.95
POWER = 0.8


def _matrix(values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"values must be a non-empty (seeds, states) matrix, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite (carry scores forward before the statistics)")
    return v


@dataclass(frozen=True)
class Components:
    """The two-way decomposition of a (seeds, states) matrix and its variance components.

    Attributes:
        mean: the grand mean.
        seed: (S,) row effects (row mean - grand mean).
        state: (N,) column effects.
        rest: (S, N) interaction and noise (what the row and column effects leave).
        var_seed: the seed component's share of the mean's variance, ``max(0, s_rows^2 - MSE / N) / S``.
        var_state: the state component's share, ``max(0, s_cols^2 - MSE / S) / N``.
        var_rest: the interaction's share, ``MSE / (S N)``.
        df: Satterthwaite degrees of freedom of the summed variance, from the mean squares it is made of (at
            least 1; inf when the variance is 0).
    """

    mean: float
    seed: np.ndarray
    state: np.ndarray
    rest: np.ndarray
    var_seed: float
    var_state: float
    var_rest: float
    df: float

    @property
    def variance(self) -> float:
        """Estimated variance of the grand mean (unbiased under the two-way random-effects model, before the
        truncation at 0 of the seed and state parts)."""
        return self.var_seed + self.var_state + self.var_rest


def components(values: Any) -> Components:
    """The variance components of a (seeds, states) matrix (see the module docstring)."""
    v = _matrix(values)
    s, n = v.shape
    m = float(v.mean())
    row, col = v.mean(axis=1) - m, v.mean(axis=0) - m  # (S,), (N,)
    rest = v - m - row[:, None] - col[None, :]  # (S, N)
    mse = float((rest ** 2).sum()) / ((s - 1) * (n - 1)) if s > 1 and n > 1 else 0.0
    var_seed = max(0.0, float((row ** 2).sum()) / (s - 1) - mse / n) / s if s > 1 else 0.0
    var_state = max(0.0, float((col ** 2).sum()) / (n - 1) - mse / s) / n if n > 1 else 0.0
    var_rest = mse / (s * n)
    # Satterthwaite: the variance is the rows' mean square / S (S - 1 degrees of freedom; the seed part and the
    # interaction's share) plus the state part (N - 1)
    ms_rows = float((row ** 2).sum()) / (s - 1) / s if s > 1 else 0.0
    parts = [(ms_rows, s - 1), (var_state, n - 1)]
    denom = sum(x ** 2 / d for x, d in parts if d > 0 and x > 0)
    total = var_seed + var_state + var_rest
    df = max(1.0, total ** 2 / denom) if denom > 0 else float("inf")
    return Components(m, row, col, rest, var_seed, var_state, var_rest, df)


def crossed_means(values: Any, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) replicates of the mean of a (seeds, states) matrix from the crossed bootstrap.

    Each replicate draws the seeds with replacement and one resample of the states shared by every drawn seed;
    its seed, state and interaction parts are rescaled to the variance components of :func:`components`, so the
    replicates' variance estimates the grand mean's (module docstring). One row (one seed, or a deterministic
    policy) resamples the states only.
    """
    v = _matrix(values)
    c = components(v)
    s, n = v.shape
    u = rng.multinomial(s, np.full(s, 1 / s), size=n_boot).astype(float)  # (B, S) seed draw counts
    w = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)  # (B, N) state draw counts
    a = u @ c.seed / s  # (B,) plain crossed bootstrap parts: variance sum(seed^2) / S^2
    b = w @ c.state / n  # (B,)                                 sum(state^2) / N^2
    e = np.einsum("bs,sn,bn->b", u, c.rest, w) / (s * n)  # (B,)     sum(rest^2) / (S N)^2

    def scale(target: float, raw: float) -> float:
        return float(np.sqrt(target / raw)) if raw > 0 else 0.0

    return (c.mean + scale(c.var_seed, float((c.seed ** 2).sum()) / s ** 2) * a
            + scale(c.var_state, float((c.state ** 2).sum()) / n ** 2) * b
            + scale(c.var_rest, float((c.rest ** 2).sum()) / (s * n) ** 2) * e)


@dataclass(frozen=True)
class Interval:
    """A mean with its crossed-bootstrap interval and what the design could have detected.

    Attributes:
        mean: the matrix's mean.
        lo, hi: the ``level`` interval, ``mean +- t(df) * se``.
        se: the crossed bootstrap's standard error.
        df: Satterthwaite degrees of freedom of ``se``.
        mde80: the smallest true difference from 0 the interval excludes (on its side) with 80% probability at
            this design: :func:`detectable` standard errors.
    """

    mean: float
    lo: float
    hi: float
    se: float
    df: float
    mde80: float

    def excludes_0(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)


def crossed_interval(values: Any, n_boot: int = 2000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of a (seeds, states) matrix with its crossed-bootstrap interval (module docstring)."""
    v = _matrix(values)
    means = crossed_means(v, n_boot, np.random.default_rng(seed))
    se = float(means.std(ddof=1))
    df = components(v).df
    t = float(sps.t.ppf(1 - (1 - level) / 2, df)) if np.isfinite(df) else float(sps.norm.ppf(1 - (1 - level) / 2))
    m = float(v.mean())
    if se == 0.0:  # a constant matrix (or a constant difference): a point interval
        return Interval(m, m, m, 0.0, df, 0.0)
    return Interval(m, m - t * se, m + t * se, se, df, detectable(t, df) * se)


def detectable(t: float, df: float, power: float = POWER) -> float:
    """The true difference, in standard errors, that a ``mean - t * se > 0`` test detects with probability
    ``power`` when ``se`` is itself estimated with ``df`` degrees of freedom (noncentral t; with few seeds this is
    well above the known-variance ``t + z_power``)."""
    if not np.isfinite(df):
        return t + float(sps.norm.ppf(power))
    return float(brentq(lambda d: sps.nct.sf(t, df, d) - power, 0.0, 100.0))


def crossed_ci(values: Any, n_boot: int = 2000, seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of :func:`crossed_interval`."""
    i = crossed_interval(values, n_boot, seed, level)
    return i.mean, i.lo, i.hi


def _paired(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"paired matrices need the same states and seeds (or one row for b), got {a.shape} and "
                         f"{b.shape}")
    return a - b


def paired_difference(a: Any, b: Any, n_boot: int = 2000, seed: int = 0, level: float = LEVEL
                      ) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of ``a - b`` on the same states: (seeds, states) matrices with the same states in the same
    order; ``b`` with one row (the initial policy) is compared with every seed of ``a``, otherwise both have the same
    seeds in the same order (row k of each was trained with seed k). Crossed bootstrap of the difference."""
    return crossed_ci(_paired(a, b), n_boot=n_boot, seed=seed, level=level)


@dataclass(frozen=True)
class SeedTest:
    """A one-sample t-test over the per-seed means of a difference matrix (H0: the mean over seeds is 0).

    Attributes:
        seeds: seeds (rows) tested.
        mean: the mean of the per-seed means.
        lo, hi: the ``level`` t-interval of the per-seed means (None with one seed: no test).
        p: two-sided p-value (None with one seed; 0 or 1 when every seed's mean is the same).
        sd: the standard deviation of the per-seed means (None with one seed), what :func:`seed_power` needs.
    """

    seeds: int
    mean: float
    lo: float | None
    hi: float | None
    p: float | None
    sd: float | None = None


def seed_test(diff: Any, level: float = LEVEL) -> SeedTest:
    """The seed-level test of a (seeds, states) difference matrix: the states are averaged within each seed, and
    the seeds are the sample (``S - 1`` degrees of freedom). It asks whether training moved the policy the same way
    in every seed; with three seeds it needs a large, consistent effect."""
    d = _matrix(diff).mean(axis=1)  # (S,) per-seed means
    s, m = len(d), float(d.mean())
    if s < 2:
        return SeedTest(s, m, None, None, None)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return SeedTest(s, m, m, m, 1.0 if m == 0 else 0.0, 0.0)
    half = float(sps.t.ppf(1 - (1 - level) / 2, s - 1)) * sd / np.sqrt(s)
    p = float(2 * sps.t.sf(abs(m) / (sd / np.sqrt(s)), s - 1))
    return SeedTest(s, m, m - half, m + half, p, sd)


def seed_power(difference: float, sd: float, seeds: int, alpha: float) -> float:
    """The probability that :func:`seed_test` over ``seeds`` seeds gives p < ``alpha`` (either sign) when the
    per-seed mean differences are normal with mean ``difference`` and standard deviation ``sd``: the two tails of a
    noncentral t with ``seeds - 1`` degrees of freedom. Used to state what a look at a pre-registered threshold
    could detect; with ``sd`` estimated from the same seeds it is an estimate too.

    Raises:
        ValueError: fewer than two seeds, ``sd`` not positive, or ``alpha`` outside (0, 1).
    """
    if seeds < 2 or not sd > 0 or not 0 < alpha < 1:
        raise ValueError(f"seed_power needs seeds >= 2, sd > 0 and 0 < alpha < 1 (got seeds={seeds}, sd={sd}, "
                         f"alpha={alpha})")
    df, nc = seeds - 1, difference * np.sqrt(seeds) / sd
    t = float(sps.t.ppf(1 - alpha / 2, df))
    # P(T > t) + P(T < -t), the lower tail as the upper tail of -T (scipy's nct.cdf far in the left tail is nan)
    return float(sps.nct.sf(t, df, nc) + sps.nct.sf(t, df, -nc))


def seed_detectable(sd: float, seeds: int, alpha: float, power: float = POWER) -> float:
    """The smallest true difference (> 0) that :func:`seed_test` at p < ``alpha`` detects with probability
    ``power`` (:func:`seed_power`), at per-seed standard deviation ``sd``; ``inf`` beyond 10^4 standard deviations
    (two seeds at a tiny alpha: no difference in reach, and scipy's noncentral t is no longer accurate there)."""
    if seed_power(0.0, sd, seeds, alpha) >= power:
        return 0.0
    hi = sd
    while seed_power(hi, sd, seeds, alpha) < power:
        if hi > 1e4 * sd:
            return math.inf
        hi *= 2
    return float(brentq(lambda d: seed_power(d, sd, seeds, alpha) - power, 0.0, hi))


@dataclass(frozen=True)
class Design:
    """A (seeds x states) comparison of two policies on binary outcomes, for simulation (coverage and power).

    Outcomes are ``y_ij ~ Bernoulli(sigmoid(logit(p) + effect_logit + seed_i + state_j + gain_j))`` with
    ``seed_i ~ N(0, sd_seed^2)`` drawn afresh for each policy's seeds (training varies), ``state_j ~ N(0,
    sd_state^2)`` shared by both policies (a state is hard for every policy alike) and ``gain_j ~ N(0,
    sd_gain^2)`` for policy a only (training helps on some states more than on others).

    Attributes:
        seeds, states: the design's size.
        base: success probability of policy b at a median seed and state.
        sd_seed: seed effect, logit scale.
        sd_state: state effect shared by both policies, logit scale.
        sd_gain: state effect of policy a only, logit scale.
    """

    seeds: int
    states: int
    base: float = 0.6
    sd_seed: float = 0.3
    sd_state: float = 2.0
    sd_gain: float = 0.0

    def draw(self, rng: np.random.Generator, effect_logit: float) -> tuple[np.ndarray, np.ndarray]:
        """One dataset: (seeds, states) outcome matrices of policies a (shifted by ``effect_logit``) and b."""
        state = rng.normal(0, self.sd_state, self.states)[None, :]  # (1, N)
        logit = np.log(self.base / (1 - self.base)) + state
        gain = rng.normal(0, self.sd_gain, self.states)[None, :]  # (1, N)
        mats = []
        for shift in (effect_logit + gain, 0.0):
            seed = rng.normal(0, self.sd_seed, (self.seeds, 1))  # (S, 1)
            p = 1 / (1 + np.exp(-(logit + shift + seed)))
            mats.append((rng.random(p.shape) < p).astype(float))
        return mats[0], mats[1]

    def true_difference(self, effect_logit: float, draws: int = 400_000, seed: int = 12345) -> float:
        """E[y_a - y_b] over the population of seeds and states (Monte Carlo over the effects; error ~1e-4)."""
        rng = np.random.default_rng(seed)
        z = np.log(self.base / (1 - self.base)) + rng.normal(0, self.sd_state, draws)
        sa, sb = rng.normal(0, self.sd_seed, draws), rng.normal(0, self.sd_seed, draws)
        gain = rng.normal(0, self.sd_gain, draws)
        return float(np.mean(1 / (1 + np.exp(-(z + effect_logit + gain + sa))) - 1 / (1 + np.exp(-(z + sb)))))

    def effect_for(self, difference: float) -> float:
        """The logit shift whose true difference is ``difference`` (bisection)."""
        lo, hi = -6.0, 6.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.true_difference(mid, draws=100_000) < difference else (lo, mid)
        return (lo + hi) / 2


def simulated_power(design: Design, difference: float, n_sim: int = 400, n_boot: int = 400, seed: int = 0
                    ) -> tuple[float, float]:
    """The share of simulated datasets of ``design`` in which the crossed interval of a - b lies above 0, when the
    true difference is ``difference``; returns ``(power, its Monte-Carlo standard error)``."""
    rng = np.random.default_rng(seed)
    effect = design.effect_for(difference)
    hits = 0
    for k in range(n_sim):
        a, b = design.draw(rng, effect)
        hits += crossed_interval(a - b, n_boot=n_boot, seed=k).lo > 0
    power = hits / n_sim
    return power, float(np.sqrt(power * (1 - power) / n_sim))


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
    """Rows per (seed "all" or one seed, turn): each metric's mean and crossed interval. "all" is the crossed
    bootstrap over seeds and states; a single seed's row resamples its states."""
    rows = []
    horizon = next(iter(mats.values())).shape[2]
    for label, pick in [("all", slice(None))] + [(s, slice(k, k + 1)) for k, s in enumerate(seeds)]:
        for h in range(horizon):
            row: dict[str, Any] = {"policy": name, "seed": label, "turn": h + 1}
            for key, offset in (("win", 100), ("score", 0), ("success", 200), ("asks", 400)):
                if key in mats:
                    row[key], row[f"{key}_lo"], row[f"{key}_hi"] = crossed_ci(
                        mats[key][pick, :, h], n_boot=n_boot, seed=offset + h)
            rows.append(row)
    return rows


def comparison_row(a: str, b: str, metric: str, turn: int, diff: np.ndarray, n_boot: int, seed: int
                   ) -> dict[str, Any]:
    """One paired comparison of a (seeds, states) difference matrix: the crossed interval, its power (``mde80``)
    and the seed-level test (``seed_p``, ``seed_lo``, ``seed_hi``)."""
    i, t = crossed_interval(diff, n_boot=n_boot, seed=seed), seed_test(diff)
    return {"a": a, "b": b, "metric": metric, "turn": turn, "diff": i.mean, "lo": i.lo, "hi": i.hi, "se": i.se,
            "df": i.df, "mde80": i.mde80, "excludes_0": i.excludes_0(), "seeds": t.seeds, "seed_lo": t.lo,
            "seed_hi": t.hi, "seed_p": t.p, "seed_sd": t.sd}


def paired_rows(groups: dict[str, dict[str, np.ndarray]], seeds: dict[str, list[int]], n_boot: int,
                metrics: tuple[str, ...] = ("success", "score", "probe")) -> list[dict[str, Any]]:
    """Paired differences at every turn: each agent minus the initial policy, and each pair of agents (in order) on
    the training seeds both ran (an arm run at fewer seeds is compared on those, listed in the row's ``on_seeds``;
    None when both ran the same seeds, and against the initial policy); for every metric in ``metrics`` the groups
    have (``probe`` has one "turn")."""
    agents = [a for a in groups if a != "initial"]
    rows = []
    for a, b in [(a, "initial") for a in agents] + [(a, b) for i, a in enumerate(agents) for b in agents[i + 1:]]:
        common = None if b == "initial" else [s for s in seeds[a] if s in seeds[b]]
        if common is not None and not common:
            continue  # no seed in common: nothing to pair
        rows_a = slice(None) if common is None else [seeds[a].index(s) for s in common]
        rows_b = slice(None) if common is None else [seeds[b].index(s) for s in common]
        for metric in metrics:
            if metric not in groups[a] or metric not in groups[b]:
                continue
            for h in range(groups[a][metric].shape[2]):
                diff = _paired(groups[a][metric][rows_a, :, h], groups[b][metric][rows_b, :, h])
                fewer = common is not None and not (common == seeds[a] == seeds[b])
                rows.append({**comparison_row(a, b, metric, h + 1, diff, n_boot, 300 + h),
                             "on_seeds": common if fewer else None})
    return rows
