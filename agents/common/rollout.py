"""The agents' rollouts, all on the one branching primitive (:mod:`agents.common.branching`).

- :func:`collect_pairs`: REFUEL and REBEL (k = 2, both branches are the pair) and online/offline DPO (k = n,
  best vs worst): plan an iteration, grow the trees, read the pairs off them (:func:`make_pairs`);
- :func:`collect_dialogues`: PPO's full dialogues (k = 1 from each row's own prefix to the horizon H).

The evaluation plays on the same primitive (:func:`agents.common.evaluation.play`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.common.branching import Branch, Plan, Tree, grow, plan_dialogues
from agents.common.distributed import SINGLE, Ranks, share
from agents.common.pairs import select_best_worst
from dialogue_gym.generation.base import GenerationEngine, SamplingParams
from dialogue_gym.vector import DialogueVectorEnv

PAIRINGS = ("both", "best_worst")


def make_pairs(trees: Sequence[Tree], pairing: str = "both", length_penalty: float = 0.0
               ) -> tuple[list[Any], dict[str, float]]:
    """The training pairs of grown trees, and ``env/`` statistics.

    ``pairing="both"`` (REFUEL, REBEL; k = 2): the two branches are the pair, whatever their rewards (equal
    returns regress onto 0). ``pairing="best_worst"`` (DPO; k = n): :func:`select_best_worst` on
    reward − ``length_penalty``·characters gives chosen (``a``) and rejected (``b``); ties are dropped. Either
    way a pair whose two turn-h replies are token-identical is dropped.

    Statistics: ``env/mean_return``, ``env/mean_reply_tokens`` and ``env/cut_replies`` are over every branch's
    turn-h reply; ``env/policy_samples`` counts every policy reply of the roll-ins and branches;
    ``env/reward_chosen``/``env/reward_rejected`` only with ``best_worst``.
    """
    from agents.common.train import Pair

    if pairing not in PAIRINGS:
        raise ValueError(f"pairing is {pairing!r}; allowed: {', '.join(PAIRINGS)}")
    pairs: list[Pair] = []
    ties = identical = 0
    for tree in trees:
        row = tree.branches
        if pairing == "both":
            if len(row) != 2:
                raise ValueError(f"pairing='both' needs exactly 2 branches per tree, got {len(row)}")
            a, b = row
        else:
            picked = select_best_worst([x.reward for x in row], [len(x.reply.text) for x in row], length_penalty)
            if picked is None:
                ties += 1
                continue
            a, b = row[picked[0]], row[picked[1]]
        if a.reply.token_ids == b.reply.token_ids:
            identical += 1
            continue
        pairs.append(Pair(a.reply, b.reply, a.reward, b.reward, tree.turn))
    every: list[Branch] = [x for t in trees for x in t.branches]
    stats = {"env/pairs": float(len(pairs)), "env/ties_dropped": float(ties),
             "env/identical_pairs_dropped": float(identical),
             "env/mean_return": float(np.mean([x.reward for x in every])) if every else 0.0,
             "env/mean_turn_h": float(np.mean([t.turn for t in trees])) if trees else 0.0,
             "env/policy_samples": float(sum(t.policy_samples for t in trees)),
             "env/mean_reply_tokens": float(np.mean([len(x.reply.token_ids) for x in every])) if every else 0.0,
             "env/cut_replies": float(np.mean([not x.reply.finished for x in every])) if every else 0.0}
    if pairing == "best_worst":
        stats["env/reward_chosen"] = float(np.mean([p.reward_a for p in pairs])) if pairs else 0.0
        stats["env/reward_rejected"] = float(np.mean([p.reward_b for p in pairs])) if pairs else 0.0
    return pairs, stats


def collect_pairs(rollin: DialogueVectorEnv, branches: DialogueVectorEnv, engine: GenerationEngine,
                  params: SamplingParams, rng: np.random.Generator,
                  dialogues: int, n_rows: int, turn_sampling: str, future: bool, prefix: str, k: int = 2,
                  pairing: str = "both", length_penalty: float = 0.0, ranks: Ranks = SINGLE, futures: int = 1
                  ) -> tuple[list[Any], dict[str, float]]:
    """Pairs at turn h of ``dialogues`` dialogues, each reply scored by the env.

    1. :func:`~agents.common.branching.plan_dialogues`: rows (without replacement), (H', h) per dialogue
       (``turn_sampling``), env and policy seeds, all from ``rng``;
    2. ``prefix="on_policy"``: roll in with the policy to s_h; ``prefix="dataset"``: s_h is the task row as
       stored (its own prefix), so h = the row's turn + 1;
    3. fork each s_h ``k`` times; ``future=True`` completes each branch to H' with the policy and the user and
       takes the env's terminal score there (REFUEL's Q estimate); ``future=False`` ends it right after the
       turn-h reply (the immediate reward: REBEL, DPO);
    4. :func:`make_pairs` with ``pairing``.

    ``futures = m > 1`` (needs ``future=True``): each reply's return is the mean final score of m continuations
    completed from it (CollabLLM's multiturn-aware reward, :func:`~agents.common.branching.fork`); ``branches``
    then holds ``k·m`` sub-envs per dialogue of a chunk.

    ``rollin.num_envs`` dialogues are played at a time (``rollout_batch``); ``branches`` holds ``k`` sub-envs
    per dialogue of a chunk. Under a launcher each process plays its block of the plan (``ranks``,
    agents/common/distributed.py) and returns the pairs and statistics of that block.
    """
    plan = plan_dialogues(rng, dialogues, n_rows, rollin.max_turns, turn_sampling, prefix, future, k,
                          futures)
    return make_pairs(grow(rollin, branches, engine, params, part(plan, ranks)), pairing, length_penalty)


def part(plan: Plan, ranks: Ranks) -> Plan:
    """This process's contiguous block of the plan (the whole plan in one process)."""
    block = share(len(plan.starts), ranks)
    return Plan(plan.starts[block], plan.turns[block], plan.horizons[block], plan.k, plan.complete, plan.futures)


def collect_dialogues(venv: DialogueVectorEnv, engine: GenerationEngine, params: SamplingParams,
                      rng: np.random.Generator, dialogues: int,
                      n_rows: int, ranks: Ranks = SINGLE) -> list[Branch]:
    """Full dialogues from task rows (drawn as in :func:`collect_pairs`), played from each row's own prefix to the
    env's horizon with the policy and the user, ``venv.num_envs`` at a time: one branch per dialogue (this
    process's block of them under a launcher)."""
    plan = plan_dialogues(rng, dialogues, n_rows, venv.max_turns, "uniform", prefix="dataset",
                          future=True, k=1)  # uniform: H' = H; dataset: h = the row's own turn + 1
    return [t.branches[0] for t in grow(venv, venv, engine, params, part(plan, ranks))]
