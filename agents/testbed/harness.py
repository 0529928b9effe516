"""The harness that trains the table policy with each agent's own ``run(cfg)``, and the arms: each agent's config
on the testbed with the check of its closed form."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.testbed.closed_forms import Testbed, cdpo_optimum, centred
from agents.testbed.policy import HORIZON, REPLIES, STATES, log_policy, make_policy, save_policy

# ----------------------------------------------------------------------------------------------- the harness
PI0 = np.array([[0.4, 0.4, 0.2],  # (1, unknown): asks 40% of the time
                [1 / 3, 1 / 3, 1 / 3],  # (2, unknown)
                [0.25, 0.25, 0.5]])  # (2, known): answers half the time


def common_settings(policy_dir: Path, run_dir: Path, seed: int, dialogues: int) -> dict[str, Any]:
    """The settings every agent shares on the testbed: its env, the table policy trained in full (no LoRA) on the
    CPU, sampling at T = 1 (log-probs are the table's), AdamW without weight decay, warm-up or clipping."""
    from agents.common.config import EnvSettings, EvalSettings, OptimSettings, SamplingSettings
    from agents.common.policy import PolicySettings

    return dict(
        env=EnvSettings(task="testbed", max_turns=HORIZON, reward_mode="terminal", device="cpu", dtype="float32"),
        policy=PolicySettings(model=str(policy_dir), lora_r=0, device="cpu", dtype="float32"),
        sampling=SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=4),
        optim=OptimSettings(lr=0.2, betas=[0.0, 0.9], weight_decay=0.0, warmup_ratio=0.0, batch_size=4 * dialogues,
                            micro_batch_size=8 * dialogues, epochs=1, max_grad_norm=1e9, max_length=64),
        eval=EvalSettings(dialogues=2), seed=seed, iterations=1, dialogues=dialogues, run_dir=str(run_dir),
        export=True)


@dataclass
class Check:
    """How a trained table is compared with an arm's closed form.

    Attributes:
        expected: (states, replies) the predicted mean centred change of ``log pi`` (``exact``), or any array with
            the predicted signs (``sign``).
        kind: ``exact``: ``|mean - expected| <= z * SE + atol`` for every entry; ``sign``: every entry with
            ``|expected| > atol`` moves in its sign with ``|mean| >= z * SE``.
        z: Monte-Carlo tolerance in standard errors of the mean over seeds.
        atol: the optimiser's tolerance (``exact``), or the smallest predicted value checked (``sign``).
    """

    expected: np.ndarray
    kind: str = "exact"
    z: float = 5.0
    atol: float = 0.02

    def failures(self, deltas: np.ndarray) -> list[str]:
        """Every entry that disagrees with the closed form, in words (empty: the arm passes).

        Args:
            deltas: (seeds, states, replies) log-prob changes, one row per seed (centred here).
        """
        if deltas.ndim != 3 or deltas.shape[0] < 2:
            raise ValueError(f"Check.failures: deltas must be (seeds >= 2, states, replies), got {deltas.shape}")
        deltas = centred(deltas)
        mean = deltas.mean(0)
        se = deltas.std(0, ddof=1) / math.sqrt(deltas.shape[0])
        out = []
        for i, j in itertools.product(range(len(STATES)), range(len(REPLIES))):
            where = f"state {STATES[i]} reply {REPLIES[j]!r}"
            e, m, s = float(self.expected[i, j]), float(mean[i, j]), float(se[i, j])
            if self.kind == "exact" and abs(m - e) > self.z * s + self.atol:
                out.append(f"{where}: mean change {m:+.3f} (SE {s:.3f}), closed form {e:+.3f}")
            if self.kind == "sign" and abs(e) > self.atol and not (np.sign(m) == np.sign(e) and abs(m) >= self.z * s):
                out.append(f"{where}: mean change {m:+.3f} (SE {s:.3f}), closed form's sign {np.sign(e):+.0f}")
        return out


@dataclass
class Arm:
    """One agent on the testbed: how to run it, and what its update must be.

    Attributes:
        name: shown in failures.
        run: the agent's own ``run(cfg)`` (its module's ``run``).
        config: ``config(policy_dir, run_dir, seed)`` -> the agent's config object (start from
            :func:`common_settings`).
        check: ``check(testbed)`` -> the :class:`Check` its trained tables must pass.
        patches: context managers entered around the runs (a mutant's bug).
        mutant: the arm is a deliberately broken agent that must FAIL its check.
    """

    name: str
    run: Callable[[Any], Any]
    config: Callable[[Path, Path, int], Any]
    check: Callable[[Testbed], Check]
    patches: list[Callable[[], contextlib.AbstractContextManager]] = field(default_factory=list)
    mutant: bool = False


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread while the arms run: with tensors this small, a thread pool on a busy machine costs
    ~10x (measured: 15 ms vs 115 ms per batched generate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def initial_policy_dir(root: Path, pi0: np.ndarray = PI0) -> Path:
    """Save the table policy with ``pi0`` as a model directory (what ``policy.model`` names) under ``root``."""
    model, tokenizer = make_policy({s: p for s, p in zip(STATES, pi0)})
    return save_policy(model, tokenizer, root / "pi0")


def train(arm: Arm, seeds: Sequence[int], root: Path, pi0: np.ndarray = PI0) -> np.ndarray:
    """Run ``arm`` once per seed from ``pi0`` and read each exported policy back.

    Returns:
        (seeds, states, replies) changes of ``log pi``: the exported policy's minus ``pi0``'s.
    """
    from dialogue_gym.models import load_model

    policy_dir = initial_policy_dir(root, pi0)
    before = np.log(pi0)
    out = []
    with one_thread(), contextlib.ExitStack() as stack:
        for patch in arm.patches:
            stack.enter_context(patch())
        for seed in seeds:
            run_dir = root / f"{arm.name}-{seed}"
            arm.run(arm.config(policy_dir, run_dir, seed))
            model, _ = load_model(str(run_dir / "policy"), shared=False, device="cpu")
            out.append(log_policy(model) - before)
    return np.stack(out)


# ----------------------------------------------------------------------------------------------- the arms
ETA = 2.0  # REFUEL/REBEL's eta: the closed-form moves are eta * (centred target), up to ~1 nat here
FIT_EPOCHS = 40  # full-batch AdamW steps: enough to reach the regression's (and cDPO's) minimiser
DPO_BETA, DPO_EPS, DPO_N = 1.0, 0.1, 3  # cDPO: the exact fit is finite only with label smoothing eps > 0
PPO_LR = 0.05


def refuel_arm(turn_sampling: str = "uniform", dialogues: int = 96, name: str | None = None) -> Arm:
    """REFUEL (agents.refuel): one iteration, full-batch regression fitted to convergence.

    Closed form: ``delta(s, a) = eta * E[Q_hat | s, a] + c(s)`` with ``E[Q_hat | s, a] = sum_H' P(H' | h)
    Q_H'(s, a)`` (:meth:`Testbed.refuel_target`).
    """
    from agents.refuel.__main__ import run
    from agents.refuel.config import RefuelConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = RefuelConfig(**common_settings(policy_dir, run_dir, seed, dialogues), eta=ETA,
                           turn_sampling=turn_sampling)
        cfg.optim.epochs = FIT_EPOCHS
        return cfg

    return Arm(name or f"REFUEL-{turn_sampling}", run, config,
               lambda tb: Check(ETA * centred(tb.refuel_target(turn_sampling))))


def rebel_arm(turn_sampling: str = "uniform", dialogues: int = 96) -> Arm:
    """REBEL (agents.rebel): REFUEL's loop with each reply scored by its immediate reward.

    Closed form: ``delta(s, a) = eta * r(s, a) + c(s)`` (:meth:`Testbed.immediate`).
    """
    from agents.rebel.__main__ import run
    from agents.rebel.config import RebelConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = RebelConfig(**common_settings(policy_dir, run_dir, seed, dialogues), eta=ETA,
                          turn_sampling=turn_sampling)
        cfg.optim.epochs = FIT_EPOCHS
        return cfg

    return Arm(f"REBEL-{turn_sampling}", run, config, lambda tb: Check(ETA * centred(tb.immediate())))


def dpo_arm(dialogues: int = 96) -> Arm:
    """Online DPO (agents.dpo, mode=online, immediate reward, best vs worst of n): cDPO fitted to convergence.

    Closed form: at each state the minimiser of the cDPO loss over the pair types in their exact proportions
    (:meth:`Testbed.pair_frequencies`, :func:`cdpo_optimum`). Where every pair prefers one reply ``w`` (at turn 1
    and at (2, unknown): the guess's partial credit), ``beta * (delta_w - delta_l) = log((1 - eps) / eps)``.
    """
    from agents.dpo.__main__ import run
    from agents.dpo.config import DpoConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = DpoConfig(**common_settings(policy_dir, run_dir, seed, dialogues), mode="online", n=DPO_N,
                        beta=DPO_BETA, label_smoothing=DPO_EPS, future=False, turn_sampling="uniform",
                        reference="sft")
        cfg.optim.epochs = FIT_EPOCHS
        return cfg

    def check(tb: Testbed) -> Check:
        return Check(np.stack([cdpo_optimum(f, DPO_BETA, DPO_EPS) for f in tb.pair_frequencies(DPO_N)]))

    return Arm("DPO-online", run, config, check)


def ppo_arm(dialogues: int = 96) -> Arm:
    """PPO (agents.ppo): one full-batch step, gamma = lambda = 1, no KL penalty, value head at 0.

    Closed form: the expected policy gradient on ``table[s, b]`` is ``d(s) pi0(b|s) (Q(s, b) - V(s))``, and
    AdamW's first step (zero moments, beta1 = 0 here) moves each entry by exactly ``lr`` in the sign of its
    gradient: ``delta table[s, b] = lr * sign(Q(s, b) - V(s))`` (:meth:`Testbed.advantage`), once the batch is large
    enough for the sampled gradient to have its expectation's sign.
    """
    from agents.ppo.__main__ import run
    from agents.ppo.config import PpoConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = PpoConfig(**common_settings(policy_dir, run_dir, seed, dialogues), gamma=1.0, lam=1.0, kl_coef=0.0,
                        whiten_advantages=True)
        cfg.optim.lr = PPO_LR
        cfg.optim.batch_size = dialogues  # one minibatch: a single step, from pi0
        return cfg

    return Arm("PPO", run, config, lambda tb: Check(PPO_LR * centred(np.sign(tb.advantage())), atol=0.002))


def grpo_arm(credit: str = "turn", dialogues: int = 96, group_size: int = 4) -> Arm:
    """GRPO (agents.grpo): one full-batch AdamW step from pi0 (beta1 = 0), no KL, unscaled group-relative advantages.

    Closed form: with ``credit=turn`` the G replies forked at s_h are each scored by their return to the horizon
    (uniform turn sampling) minus the group mean, so the expected gradient on ``table[s, b]`` is
    ``(1 - 1/G) d(s) pi0(b|s) (Q(s, b) - V(s))``: the centred Q of each reply. With ``credit=trajectory`` every reply
    of a dialogue is credited with the whole return minus the mean of its opening's group; since
    ``E[grad log pi(.|s)] = 0`` the expectation is again ``d(s) pi0(b|s) (Q(s, b) - V(s))`` (times 1 - 1/G). AdamW's
    first step moves each entry by ``lr`` in that sign, as for PPO. On this task the two credits share the expected
    first step; they differ in variance, which a one-step sign check does not see.
    """
    from agents.grpo.__main__ import run
    from agents.grpo.config import GrpoConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = GrpoConfig(**common_settings(policy_dir, run_dir, seed, dialogues), credit=credit,
                         group_size=group_size, beta=0.0, scale="none", turn_sampling="uniform")
        cfg.optim.lr = PPO_LR
        cfg.optim.batch_size = dialogues * group_size  # every group member in one minibatch: a single step
        return cfg

    return Arm(f"GRPO-{credit}", run, config,
               lambda tb: Check(PPO_LR * centred(np.sign(tb.advantage("uniform"))), atol=0.002))


@contextlib.contextmanager
def refuel_scores_immediate_reward() -> Iterator[None]:
    """A mutant of REFUEL's loop: its branches are scored by their immediate reward (``future=False``), the credit
    assignment bug the REFUEL check must catch."""
    import agents.refuel.__main__ as refuel

    real = refuel.collect_pairs

    def mutant(*args: Any, **kwargs: Any) -> Any:
        kwargs["future"] = False
        return real(*args, **kwargs)

    refuel.collect_pairs = mutant
    try:
        yield
    finally:
        refuel.collect_pairs = real


def default_arms() -> dict[str, tuple[Arm, range]]:
    """Every arm the suite and ``python -m benchmarks.testbed`` run, with its seeds: REFUEL's turn-1 targets are
    Monte-Carlo returns (8 and 6 seeds of 128 dialogues); the other arms' targets are exact (immediate rewards,
    signs), so their seeds only have to give a standard error. ``refuel_mutant`` must fail the REFUEL check."""
    mutant = refuel_arm("uniform", dialogues=128, name="REFUEL-mutant")
    mutant.patches.append(refuel_scores_immediate_reward)
    mutant.mutant = True
    return {"refuel": (refuel_arm("uniform", dialogues=128), range(8)),
            "refuel_reference": (refuel_arm("reference", dialogues=128), range(6)),
            "refuel_mutant": (mutant, range(3)),
            "rebel": (rebel_arm("uniform"), range(4)),
            "dpo": (dpo_arm(), range(4)),
            "ppo": (ppo_arm(), range(4)),
            "grpo_turn": (grpo_arm("turn"), range(4)),
            "grpo_trajectory": (grpo_arm("trajectory"), range(4))}
