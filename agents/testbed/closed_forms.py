"""The closed form of each agent's update on the testbed, computed exactly by enumeration over the MDP from the
initial table."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from agents.testbed.policy import ANSWER, ASK, HORIZON, REPLIES, STATES
from agents.testbed.task import reward


# ----------------------------------------------------------------------------------------------- closed forms
def horizon_weights(h: int, turn_sampling: str, max_turns: int = HORIZON) -> dict[int, float]:
    """``P(H' | h)``: REFUEL's rollout horizon given the branch turn (agents.common.pairs.sample_turn).

    reference: ``H' ~ U{1..H}``, ``h ~ U{1..H'}``, so ``P(H', h) = 1 / (H H')`` and ``P(H' | h)`` is proportional to
    ``1 / H'`` over ``H' = h..H``. uniform: ``H' = H``.
    """
    if turn_sampling == "uniform":
        return {max_turns: 1.0}
    if turn_sampling != "reference":
        raise ValueError(f"turn_sampling is {turn_sampling!r}; allowed: reference, uniform")
    w = {hp: 1.0 / hp for hp in range(h, max_turns + 1)}
    total = sum(w.values())
    return {hp: v / total for hp, v in w.items()}


@dataclass
class Testbed:
    """The testbed's MDP under the initial policy ``pi0`` (states x replies probabilities, :data:`STATES` order).

    Every closed form the checks compare with is computed here by exact enumeration (no sampling).
    """

    __test__ = False
    pi0: np.ndarray
    max_turns: int = HORIZON

    def index(self, h: int, known: bool) -> int:
        return STATES.index((h, known))

    def q(self, h: int, known: bool, reply: int, horizon: int) -> float:
        """``Q_H'((h, known), reply)``: the final score when the dialogue goes on with pi0 to absolute turn H'."""
        if h >= horizon or (reply == ANSWER and known):  # the branch ends here (horizon, or the user ends it)
            return reward(reply, known)
        nxt = known or reply == ASK
        return float(sum(self.pi0[self.index(h + 1, nxt), b] * self.q(h + 1, nxt, b, horizon)
                         for b in range(len(REPLIES))))

    def immediate(self) -> np.ndarray:
        """(states, replies) ``r(s, a)``: the score of the conversation ending with the reply (REBEL's target)."""
        return np.array([[reward(a, k) for a in range(len(REPLIES))] for _, k in STATES])

    def refuel_target(self, turn_sampling: str) -> np.ndarray:
        """(states, replies) ``E[Q_hat | s, a] = sum_H' P(H' | h) Q_H'(s, a)``: REFUEL's regression target."""
        return np.array([[sum(w * self.q(h, k, a, hp) for hp, w in horizon_weights(h, turn_sampling,
                                                                                    self.max_turns).items())
                          for a in range(len(REPLIES))] for h, k in STATES])

    def q_table(self) -> np.ndarray:
        """(states, replies) ``Q(s, a)``: the return over the whole horizon H under pi0."""
        return np.array([[self.q(h, k, a, self.max_turns) for a in range(len(REPLIES))] for h, k in STATES])

    def advantage(self, turn_sampling: str = "uniform") -> np.ndarray:
        """(states, replies) ``A(s, a) = y(s, a) - sum_b pi0(b|s) y(s, b)`` with ``y`` REFUEL's target for this turn
        sampling: ``uniform`` gives ``Q(s, a) - V(s)`` over the whole horizon (PPO's, and a whole-dialogue
        credit's, expected advantage); ``reference`` the advantage of returns completed to a drawn H' (a
        turn-level credit through forks with REFUEL's turn sampling)."""
        y = self.refuel_target(turn_sampling)
        return y - (self.pi0 * y).sum(-1, keepdims=True)

    def pair_frequencies(self, n: int) -> list[dict[tuple[int, int], float]]:
        """Per state, ``P(pair = (best, worst))`` of n replies drawn from pi0 and ranked by immediate reward (the
        first of equal best / worst wins; all equal: no pair), by enumerating the ``3**n`` draws."""
        out = []
        r = self.immediate()
        for i in range(len(STATES)):
            freq: dict[tuple[int, int], float] = {}
            for draw in itertools.product(range(len(REPLIES)), repeat=n):
                scores = [r[i, a] for a in draw]
                best = draw[max(range(n), key=lambda j: (scores[j], -j))]
                worst = draw[min(range(n), key=lambda j: (scores[j], j))]
                if max(scores) > min(scores):
                    freq[(best, worst)] = freq.get((best, worst), 0.0) + float(np.prod(self.pi0[i, list(draw)]))
            out.append(freq)
        return out


def centred(x: np.ndarray) -> np.ndarray:
    """Subtract each state's mean over replies: the part of a log-prob change that is not the constant ``c(s)``."""
    return x - x.mean(-1, keepdims=True)


def cdpo_optimum(freq: dict[tuple[int, int], float], beta: float, eps: float) -> np.ndarray:
    """(replies,) centred ``delta`` minimising ``sum f_wl * [-(1 - eps) log sig(x) - eps log sig(-x)]`` with ``x =
    beta (delta_w - delta_l)``: the exact fit of the cDPO loss to pairs in these proportions (Newton's method on
    this convex function of two free differences; replies in no pair keep 0)."""
    a = len(REPLIES)
    d = np.zeros(a)
    for _ in range(100):
        grad, hess = np.zeros(a), np.zeros((a, a))
        for (w, lo), f in freq.items():
            x = beta * (d[w] - d[lo])
            s = 1.0 / (1.0 + math.exp(-x))
            g = f * beta * (s - (1.0 - eps))  # d/dx of the smoothed loss, times beta
            e = np.zeros(a)
            e[w], e[lo] = 1.0, -1.0
            grad += g * e
            hess += f * beta * beta * s * (1 - s) * np.outer(e, e)
        hess += 1e-12 * np.eye(a) + np.ones((a, a)) / a  # fix the free constant c(s)
        step = np.linalg.solve(hess, grad)
        d -= step
        if np.abs(step).max() < 1e-12:
            break
    return centred(d)


