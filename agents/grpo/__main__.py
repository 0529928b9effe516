"""GRPO (DeepSeekMath, Shao et al., 2024, https://arxiv.org/abs/2402.03300), RLOO (Ahmadian et al., 2024,
https://arxiv.org/abs/2402.14740) and Dr. GRPO (Liu et al., 2025, https://arxiv.org/abs/2503.20783) in the
multi-turn dialogue env, with turn-level credit through forks, and CollabLLM's multiturn-aware reward (Wu et al.,
2025, https://arxiv.org/abs/2502.00640).

Run:
    python -m agents.grpo                                  # credit=turn, embedded default env
    python -m agents.grpo +env=clarify credit=trajectory   # the peers' multi-turn GRPO
    python -m agents.grpo baseline=loo scale=none          # RLOO at the fork (Dr. GRPO: baseline=mean scale=none)
    python -m agents.grpo future_samples=4                 # each turn-h reply scored by 4 continuations
    python -m agents.grpo +experiment=smoke                # tiny model, a handful of steps
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m agents.grpo +experiment=smoke dialogues=4

Each iteration t (the shared branching primitive, agents/common/branching.py, grows every group):
  1. credit=turn: per group draw (H', h) (``turn_sampling``, as REFUEL) and roll in with π_t to s_h; fork s_h
     G ways (each branch its own user stream) and sample G turn-h replies; complete each branch to H' with π_t
     and the user; its return R_j is the env's terminal score there (with ``future_samples = m > 1``: the mean
     final score of m continuations of the same reply). credit=trajectory: fork each task row's opening G ways
     and play G whole dialogues to the horizon H; R_j is dialogue j's final score;
  2. advantages within each group (agents/common/grpo_losses.py): R_j − mean(R) (``baseline=mean``) or
     R_j − mean of the others (``baseline=loo``), divided by the group's std (``scale=std``) or not
     (``scale=none``); a group whose returns are all equal is dropped (its advantages are 0) and counted;
  3. credit=turn trains the turn-h reply of each branch only; credit=trajectory trains every assistant reply of
     each dialogue with that dialogue's advantage. π_t's per-token log-probs are recomputed once (or taken from
     the engine, ``old_logprobs=engine``), the reference's too when β > 0;
  4. ``optim.epochs`` inner epochs of minibatches (``optim.batch_size`` group members each) of the clipped
     surrogate −min(r·A, clip(r, 1 ± ε)·A) + β·k3, normalised per token (default) or per sequence;
  5. π_{t+1} <- π_θ.

Why turn credit through forks. A trajectory advantage credits every turn of a dialogue with the whole return, and
normalising per turn index is biased when the policy decides when the dialogue ends (verl RFC #7244): the set of
dialogues still running at turn k depends on the policy. Here the G turn-h replies answer the same state s_h (user
hidden state and random stream included), so R_j − baseline compares replies to one state, whatever turn each
branch ended at (tests/agents/test_grpo.py has the case).

Deviations from the references:
  1. LoRA by default (full fine-tuning with policy.lora_r=0); the reference for β > 0 is the adapter-disabled
     model (full fine-tuning: a frozen copy). β defaults to 0 (DeepSeekMath: 0.04; Dr. GRPO and DAPO drop it):
     the clipped ratio already bounds each step, and β = 0 saves the reference pass.
  2. Defaults are sized for a 2-core CPU: G = 4 (DeepSeekMath: 64), 4 groups per iteration, lr 1e-4 for LoRA
     (DeepSeekMath: 1e-6 full fine-tuning), 1 inner epoch (DeepSeekMath: 1 update per batch, i.e. the same).
  3. Loss normalisation per token over the minibatch by default (DeepSeekMath divides each reply by its own
     length, 1/|o_i|, which Dr. GRPO shows favours long wrong replies and short right ones; Dr. GRPO divides by a
     constant instead): every action token weighs the same; ``normalization=sequence`` gives DeepSeekMath's.
  4. The group std is the sample std (G − 1 in the denominator) plus eps = 1e-4, and an all-equal group is
     dropped rather than trained with 0 advantage (with β > 0 DeepSeekMath would still pull it toward the
     reference).
  5. Multi-turn: the references are single-turn. credit=trajectory is the peers' multi-turn GRPO (one advantage
     broadcast over every assistant turn); credit=turn is new here (forks at s_h).
  6. RLOO as ``baseline=loo``: REINFORCE in the paper (one sample per update, no ratio); here inside the same
     clipped surrogate (with one inner epoch and recomputed log-probs the ratio is 1 and the gradient is RLOO's).
  7. CollabLLM's multiturn-aware reward uses m forked continuations of the same reply (the reply copied to m
     forks of s_h, each with its own user stream); the env charges each continuation's turns to the budget, the
     m − 1 copied turn-h replies included. CollabLLM trains with DPO/PPO on it; here it is GRPO's return.
  8. Log-probs are taken at the sampling temperature (logits / T), so the ratio refers to the distribution the
     tokens were drawn from. Evaluation is in-run: fixed held-out states and user seeds, win rate per turn vs
     the initial policy judged by the env's reward.
  9. FSDP (sharded full fine-tuning) is not wired for GRPO: data-parallel LoRA or full fine-tuning under
     conf/accelerate/cpu2.yaml / ddp_gpu8.yaml.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agents.common.batching import Reply, collate_on, pack_right
from agents.common.branching import Tree, grow, plan_dialogues
from agents.common.checkpoint import load_checkpoint, save_checkpoint
from agents.common.config import build_task_early
from agents.common.distributed import (
    SINGLE,
    Ranks,
    check_processes,
    gather,
    setup,
)
from agents.common.grpo_losses import group_advantages, grpo_loss
from agents.common.logging import MetricLogger
from agents.common.logprobs import token_logprobs
from agents.common.policy import frozen_reference, load_policy, reference_mode, trainable_parameters
from agents.common.policy_engine import sync_policy
from agents.common.rollout import part
from agents.common.run import (
    Evaluator,
    begin,
    end_iteration,
    finish,
    launch,
    make_vec,
    pad_id,
    policy_engine,
    sampling_params,
)
from agents.common.sharding import check_sharding
from agents.common.train import make_optimizer, minibatches, optimizer_step
from agents.grpo.config import GrpoConfig, validate
from dialogue_gym.progress import track

log = logging.getLogger("agents.grpo")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@dataclass
class Sample:
    """One trained reply: its tokens, its advantage, and π_t's (and the reference's) log-probs of its L tokens.

    Attributes:
        reply: the prompt ids the policy answered and the ids it sampled.
        advantage: the group-relative advantage of the group member it belongs to.
        member: the index of its group member (branch) in the iteration; minibatches are drawn over members.
        length: action tokens of the whole member (its one turn-h reply, or every reply of its dialogue).
        old: (L,) log π_t of the sampled tokens (filled before the update).
        ref: (L,) log π_ref (β > 0 only).
    """

    reply: Reply
    advantage: float
    member: int
    length: int
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def group_samples(trees: Sequence[Tree], credit: str, baseline: str, scale: str, first_member: int = 0
                  ) -> tuple[list[Sample], list[list[float]], dict[str, float]]:
    """The trained replies of grown groups (module docstring, steps 2-3), the groups' returns, rollout statistics.

    Each tree is one group: its G branches' returns (``Branch.reward``: the final score where the branch ended,
    or the mean of its continuations) give the advantages; nothing else about a branch (when it ended, how many
    turns it took) enters them. Groups whose returns are all equal give no sample.

    Args:
        trees: one per group, G branches each.
        credit: ``turn`` (the turn-h reply of each branch) or ``trajectory`` (every reply of each branch).
        first_member: the member index of the first tree's first branch (a process's offset in the plan).
    """
    returns = [[b.reward for b in t.branches] for t in trees]
    adv, metrics = group_advantages(torch.tensor(returns, dtype=torch.float64), baseline, scale)
    samples: list[Sample] = []
    g = len(trees[0].branches)
    for i, tree in enumerate(trees):
        if min(returns[i]) == max(returns[i]):  # all equal: A = 0 (group_advantages), dropped
            continue
        for j, branch in enumerate(tree.branches):
            replies = [branch.reply] if credit == "turn" else branch.replies
            length = sum(len(r.token_ids) for r in replies)
            samples += [Sample(r, float(adv[i, j]), first_member + i * g + j, length) for r in replies]
    every = [b for t in trees for b in t.branches]
    firsts = [b.reply for b in every]
    stats = {"env/mean_return": float(np.mean(returns)),
             "env/mean_turn_h": float(np.mean([t.turn for t in trees])),
             "env/mean_turns": float(np.mean([len(b.replies) for b in every])),
             "env/policy_samples": float(sum(t.policy_samples for t in trees)),
             "env/mean_reply_tokens": float(np.mean([len(r.token_ids) for r in firsts])),
             "env/cut_replies": float(np.mean([not r.finished for r in firsts]))}
    return samples, returns, stats


@torch.no_grad()
def fill_logprobs(model: Any, reference: Any | None, samples: Sequence[Sample], cfg: GrpoConfig, pad: int) -> None:
    """π_t's per-token log-probs of every sample (recomputed, or the engine's), and the reference's when β > 0,
    once before any update."""
    model.eval()
    device = next(model.parameters()).device
    size, temperature = cfg.optim.micro_batch_size, cfg.sampling.temperature
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        ids, attention, mask = collate_on([s.reply for s in chunk], pad, cfg.optim.max_length, device)
        lengths = [len(s.reply.token_ids) for s in chunk]
        if cfg.old_logprobs == "recompute":
            logp = token_logprobs(model, ids, attention, mask, temperature)
            for b, (s, n) in enumerate(zip(chunk, lengths)):
                s.old = logp[b, logp.shape[1] - n:].float().cpu()
        else:
            for s in chunk:
                if s.reply.logprobs is None or len(s.reply.logprobs) != len(s.reply.token_ids):
                    raise RuntimeError("old_logprobs=engine, but the policy engine returned no log-probs for a "
                                       "reply; use old_logprobs=recompute")
                s.old = torch.tensor(s.reply.logprobs, dtype=torch.float32)
        if cfg.beta > 0:
            with reference_mode(model, reference) as ref:
                ref_logp = token_logprobs(ref, ids, attention, mask, temperature)
            for b, (s, n) in enumerate(zip(chunk, lengths)):
                s.ref = ref_logp[b, ref_logp.shape[1] - n:].float().cpu()


def grpo_update(model: Any, optimizer: Any, scheduler: Any, samples: Sequence[Sample], cfg: GrpoConfig, pad: int,
                rng: np.random.Generator, ranks: Ranks = SINGLE) -> list[dict[str, float]]:
    """``optim.epochs`` inner epochs of minibatches of ``optim.batch_size`` group members (all their replies).

    Each minibatch's loss is divided by its action tokens (``normalization=token``) or its members, each member's
    replies by the member's own token count (``sequence``), so the micro-batches' losses add up to the
    minibatch's. Data-parallel (every process holding all samples): process ``r`` takes members ``r, r + W, ...``
    of each minibatch and the gradients are summed across processes before clipping, so every process takes the
    single-process step (agents/common/distributed.py). Returns one metrics dict per optimizer step.
    """
    optim = cfg.optim
    model.train()
    device = next(model.parameters()).device
    params = list(trainable_parameters(model).values())
    members: dict[int, list[Sample]] = {}
    for s in samples:
        members.setdefault(s.member, []).append(s)
    keys = sorted(members)
    history = []
    for batch in minibatches(len(keys), optim.batch_size, optim.epochs, cfg.steps, rng):
        picked = [keys[i] for i in batch]
        tokens = float(sum(len(s.reply.token_ids) for k in picked for s in members[k]))
        mine = [s for k in picked[ranks.rank::ranks.world] for s in members[k]]
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for m in range(0, len(mine), optim.micro_batch_size):
            mb = mine[m:m + optim.micro_batch_size]
            ids, attention, mask = collate_on([s.reply for s in mb], pad, optim.max_length, device)
            logp = token_logprobs(model, ids, attention, mask, cfg.sampling.temperature)  # (B, T)
            loss, metrics = grpo_loss(
                logp, pack_right([s.old for s in mb], mask),
                torch.tensor([s.advantage for s in mb], dtype=torch.float32, device=device), mask, cfg.clip,
                cfg.beta, pack_right([s.ref for s in mb], mask) if cfg.beta > 0 else None, cfg.normalization,
                tokens=tokens, sequences=float(len(picked)),
                lengths=torch.tensor([float(s.length) for s in mb], device=device))
            loss.backward()
            share = float(mask.sum()) / tokens
            sums["loss"] = sums.get("loss", 0.0) + metrics.pop("loss")  # the micro-batch losses add up
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * share
        history.append(optimizer_step(params, optimizer, scheduler, optim.max_grad_norm, sums, ranks))
    model.eval()
    return history


def collect_groups(rollin: Any, branches: Any, engine: Any, cfg: GrpoConfig, rng: np.random.Generator, n_rows: int,
                   ranks: Ranks = SINGLE) -> list[Tree]:
    """This process's block of the iteration's groups, grown on the branching primitive (module docstring, 1)."""
    max_turns = rollin.max_turns
    if cfg.credit == "turn":
        plan = plan_dialogues(rng, cfg.dialogues, n_rows, max_turns, cfg.turn_sampling, "on_policy", True,
                              cfg.group_size, cfg.future_samples)
    else:  # G whole dialogues from each row's own opening, to the horizon H
        plan = plan_dialogues(rng, cfg.dialogues, n_rows, max_turns, "uniform", "dataset", True, cfg.group_size)
    return grow(rollin, branches, engine, sampling_params(cfg.sampling), part(plan, ranks))


def run(cfg: GrpoConfig) -> dict:
    """Train and evaluate (module docstring)."""
    validate(cfg)
    ranks = setup()  # under `accelerate launch`: this process's share (agents/common/distributed.py)
    check_processes(cfg.dialogues, ranks, cfg.policy.engine)
    check_sharding(ranks.sharded, cfg.policy, "GRPO")
    # a missing dataset, or too few rows in the evaluation split, fails here, before any model loads
    task = build_task_early(cfg.env, cfg.eval.dialogues, cfg.eval.split)
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    if ranks.device:  # one GPU per process under a launcher
        cfg.policy.device = ranks.device
    model, tokenizer = load_policy(cfg.policy, seed=cfg.seed)
    reference = frozen_reference(model) if cfg.beta > 0 and cfg.policy.lora_r == 0 else None  # LoRA: adapter off
    pad = pad_id(tokenizer)
    engine = policy_engine(cfg.policy, model, tokenizer, seed=cfg.seed)
    chunk = cfg.rollout_batch or cfg.dialogues // ranks.world
    width = cfg.group_size * (cfg.future_samples if cfg.credit == "turn" else 1)
    rollin = make_vec(cfg.env, chunk, task=task)
    branches = make_vec(cfg.env, width * chunk, task=task, reward_mode="terminal")
    evaluator = Evaluator(cfg.env, cfg.eval, cfg.sampling, run_dir, resume=cfg.resume) if ranks.main else None
    n_rows = rollin.num_rows
    # with steps=0 the schedule assumes no tied group; dropped ties leave it short of its end (docs/agents/grpo.md)
    per_iteration = cfg.steps or cfg.optim.epochs * math.ceil(cfg.dialogues * cfg.group_size / cfg.optim.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.iterations * per_iteration)
    logger = MetricLogger(run_dir, resume=cfg.resume) if ranks.main else None

    start, _ = begin(cfg, engine, model, logger, evaluator,
                     lambda: load_checkpoint(run_dir, model, optimizer, scheduler))

    name = f"GRPO ({cfg.credit})"
    done_here = 0
    for t in track(range(start, cfg.iterations), total=cfg.iterations, initial=start, desc=f"{name} iterations",
                   unit="iteration"):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, t])  # everything an iteration draws comes from (seed, t)
        trees = collect_groups(rollin, branches, engine, cfg, rng, n_rows, ranks)
        first = (cfg.dialogues // ranks.world) * ranks.rank * cfg.group_size
        samples, returns, stats = group_samples(trees, cfg.credit, cfg.baseline, cfg.scale, first)
        t_roll = time.time() - t0
        fill_logprobs(model, reference, samples, cfg, pad)  # each process its own samples, then all of them
        samples, returns = gather(samples, ranks), gather(returns, ranks)
        stats = {k: float(np.mean(gather([v], ranks))) for k, v in stats.items()}
        stats["env/policy_samples"] *= ranks.world  # a count: the sum over the processes' equal shares
        _, group_stats = group_advantages(torch.tensor(returns, dtype=torch.float64), cfg.baseline, cfg.scale)
        stats.update({"env/groups": group_stats["groups"], "env/equal_groups": group_stats["equal_groups"],
                      "env/return_std": group_stats["return_std"], "env/trained_replies": float(len(samples))})
        if not samples:
            log.warning("iteration %d: every group's returns were equal; no update", t + 1)
        history = grpo_update(model, optimizer, scheduler, samples, cfg, pad, np.random.default_rng([cfg.seed, t, 1]),
                              ranks)
        t_sync = time.time()
        sync_policy(engine, model)  # a vLLM policy engine loads the new adapter or weights; HF samples the model
        t_sync = time.time() - t_sync
        metrics = {**stats, "perf/rollout_s": t_roll, "perf/sync_s": t_sync, "perf/iteration_s": time.time() - t0,
                   "perf/policy_tokens": float(engine.tokens_generated),
                   "perf/user_calls": float(rollin.usage.user_calls + branches.usage.user_calls),
                   "perf/reward_calls": float(rollin.usage.reward_calls + branches.usage.reward_calls)}
        done_here += 1
        if end_iteration(cfg, t, done_here, metrics, history, logger, evaluator, engine,  # one process saves
                         (lambda state: save_checkpoint(run_dir, model, optimizer, scheduler, state))
                         if ranks.main else None):
            return {"stopped_at": t + 1}

    return finish(name, cfg, evaluator, engine, model, tokenizer, run_dir, logger)


Config = GrpoConfig  # the contract with the leaderboard: an agent exports its Config schema and run(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="grpo")
def main(raw: DictConfig) -> None:
    launch(raw, GrpoConfig, run)


if __name__ == "__main__":
    main()
