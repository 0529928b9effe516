"""REFUEL — Regressing the Relative Future (Gao et al., 2024, https://arxiv.org/abs/2410.04612).

Run:
    python -m agents.refuel                      # embedded default env (SmolLM2-135M user and judge)
    python -m agents.refuel +env=arithmetic      # verifiable arithmetic task
    python -m agents.refuel +env=ultrainteract env.task_kwargs.path=/data/ultrainteract_pair.jsonl
    python -m agents.refuel +experiment=smoke    # tiny model, a handful of steps

Each iteration t:
  1. roll in with pi_t and the simulated user; for each dialogue draw (H', h) (reference: H' ~ U{1..H},
     h ~ U{1..H'}) and stop at s_h (all turns before h plus the user message of turn h);
  2. reset the vector env to s_h twice (a fork: each branch gets its own user random stream);
  3. sample two turn-h replies from pi_t and complete both branches to H' with pi_t and the user;
  4. the env scores each branch once at its horizon (terminal reward of the whole conversation);
  5. compute pi_t's log-probs of both turn-h replies once, then regress
     (log-ratio_a - log-ratio_b) onto eta * (Q_a - Q_b) on the turn-h tokens only;
  6. pi_{t+1} <- pi_theta.

Deviations from the paper and its reference code:
  1. LoRA by default (full fine-tuning with policy.lora_r=0): CPU budgets.
  2. Defaults are sized for a 2-core CPU (16 dialogues per iteration, lr 1e-4 for LoRA, short replies);
     `+experiment=refuel_paper` holds the paper's values (lr 3e-7, batch 128, eta 1e3, 1024 new tokens).
  3. One long-lived engine per role for the whole run (the reference starts 18 engines per iteration), one
     batched user call and one batched reward call per step, branches stop at their horizon H'.
  4. Pairs whose two turn-h replies are token-identical are dropped (their regression target is 0 = 0 anyway);
     a reply cut at max_new_tokens is kept (the reference's setting two penalises it; not applied here).
  5. Evaluation is in-run: fixed held-out states and user seeds, win rate per turn vs the initial policy judged
     by the env's reward (the paper uses GPT-4 as judge).
  6. Optimizer steps follow a cosine schedule across all iterations (the reference restarts it per iteration).
  7. The task rows of an iteration are drawn without replacement, and every dialogue carries its own env and
     policy seeds (agents/common/branching.py), so the pairs do not depend on rollout_batch or on how many
     processes share the iteration (accelerate launch, agents/common/distributed.py).
  8. ``future_samples=m > 1`` (CollabLLM's multiturn-aware reward, arXiv 2502.00640): each turn-h reply's Q is
     the mean final score of m continuations forked after it (agents/common/branching.py), a lower-variance
     estimate than the paper's one rollout; every continuation's turns count toward the budget. Default m = 1.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agents.common.checkpoint import load_checkpoint, save_checkpoint
from agents.common.config import ConfigError, build_task_early
from agents.common.distributed import check_processes, combine_stats, gather, setup
from agents.common.logging import MetricLogger
from agents.common.policy import load_policy
from agents.common.policy_engine import sync_policy
from agents.common.rollout import collect_pairs
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
from agents.common.sharding import check_sharding, refresh_copy, split_for_training
from agents.common.train import fill_reference_logprobs, make_optimizer, regression_update, steps_per_iteration
from agents.refuel.config import RefuelConfig, validate
from dialogue_gym.progress import track

log = logging.getLogger("agents.refuel")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def run(cfg: RefuelConfig, future: bool = True, prefix: str = "on_policy", name: str = "REFUEL") -> dict:
    """Train and evaluate. REBEL reuses this loop with ``future=False`` (immediate reward, no completion)."""
    validate(cfg)
    if not future and cfg.future_samples > 1:
        raise ConfigError(f"future_samples={cfg.future_samples} needs a future to sample: {name} scores the immediate "
                          "reward of the turn-h reply; set future_samples=1 (or train REFUEL)")
    ranks = setup()  # under `accelerate launch`: this process's share (agents/common/distributed.py)
    check_processes(cfg.dialogues, ranks, cfg.policy.engine)
    check_sharding(ranks.sharded, cfg.policy, name)
    # a missing dataset, or too few rows in the evaluation split, fails here, before any model loads
    task = build_task_early(cfg.env, cfg.eval.dialogues, cfg.eval.split)
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    if ranks.device:  # one GPU per process under a launcher
        cfg.policy.device = ranks.device
    model, tokenizer = load_policy(cfg.policy, seed=cfg.seed)
    model, trainer = split_for_training(model, ranks.sharded)  # trainer: the model, or its FSDP root
    engine = policy_engine(cfg.policy, model, tokenizer, seed=cfg.seed)
    chunk = cfg.rollout_batch or cfg.dialogues // ranks.world
    rollin = make_vec(cfg.env, chunk, task=task)
    branches = make_vec(cfg.env, 2 * cfg.future_samples * chunk, task=task, reward_mode="terminal")
    evaluator = Evaluator(cfg.env, cfg.eval, cfg.sampling, run_dir, resume=cfg.resume) if ranks.main else None
    n_rows = rollin.num_rows
    total_steps = cfg.iterations * steps_per_iteration(cfg.dialogues, cfg.optim)
    optimizer, scheduler = make_optimizer(trainer, cfg.optim, total_steps)
    logger = MetricLogger(run_dir, resume=cfg.resume) if ranks.main else None

    start, _ = begin(cfg, engine, model, logger, evaluator,  # sharded: every process loads its shards
                     lambda: load_checkpoint(run_dir, model, optimizer, scheduler, trainer))

    done_here = 0
    for t in track(range(start, cfg.iterations), total=cfg.iterations, initial=start, desc=f"{name} iterations",
                   unit="iteration"):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, t])  # everything an iteration draws comes from (seed, t)
        pairs, stats = collect_pairs(rollin, branches, engine, sampling_params(cfg.sampling), rng, cfg.dialogues,
                                     n_rows, cfg.turn_sampling, future=future, prefix=prefix, ranks=ranks,
                                     futures=cfg.future_samples)
        t_roll = time.time() - t0
        fill_reference_logprobs(trainer, pairs, pad_id(tokenizer), cfg.sampling.temperature, cfg.optim)
        pairs, stats = gather(pairs, ranks), combine_stats(stats, ranks)  # every process: all pairs, plan order
        history = regression_update(trainer, optimizer, scheduler, pairs, cfg.eta, pad_id(tokenizer),
                                    cfg.sampling.temperature, cfg.optim, np.random.default_rng([cfg.seed, t, 1]),
                                    ranks)
        refresh_copy(model, trainer)  # FSDP: the plain copy gets the updated weights
        t_sync = time.time()
        sync_policy(engine, model)  # a vLLM policy engine loads the new adapter or weights; HF samples the model
        t_sync = time.time() - t_sync
        metrics = {**stats, "perf/rollout_s": t_roll, "perf/sync_s": t_sync, "perf/iteration_s": time.time() - t0,
                   "perf/policy_tokens": float(engine.tokens_generated),
                   "perf/user_calls": float(rollin.usage.user_calls + branches.usage.user_calls),
                   "perf/reward_calls": float(rollin.usage.reward_calls + branches.usage.reward_calls)}
        done_here += 1
        saves = ranks.main or ranks.sharded  # one process saves (all hold the same weights); sharded: each its shards
        if end_iteration(cfg, t, done_here, metrics, history, logger, evaluator, engine,
                         (lambda state: save_checkpoint(run_dir, model, optimizer, scheduler, state, trainer))
                         if saves else None):
            return {"stopped_at": t + 1}

    return finish(name, cfg, evaluator, engine, model, tokenizer, run_dir, logger)


Config = RefuelConfig  # the contract with the leaderboard: an agent exports its Config schema and run(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="refuel")
def main(raw: DictConfig) -> None:
    launch(raw, RefuelConfig, run)


if __name__ == "__main__":
    main()
