"""DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) and online iterative DPO, the RLHF Workflow
recipe (Dong et al., 2024, https://arxiv.org/abs/2405.07863), in the multi-turn dialogue env.

Run:
    python -m agents.dpo                                   # online iterative DPO, embedded default env
    python -m agents.dpo mode=online +env=arithmetic future=true reference=previous
    python -m agents.dpo mode=offline                      # fixed pairs sampled once from the initial policy
    python -m agents.dpo mode=offline data.source=file data.path=prefs.jsonl   # pairs from a JSON-lines file
    python -m agents.dpo mode=offline data.source=hub data.hub_id=trl-internal-testing/hh-rlhf-trl-style
    python -m agents.dpo mode=online +experiment=smoke     # tiny model, a handful of steps

Loss (β = 0.1, cDPO label smoothing ε):
    loss = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ),
    Δ = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)],
summed over the tokens of the final assistant reply only (its end-of-turn token included); x is the whole
multi-turn context rendered by the chat template. π_ref's log-probs are computed once per iteration, before any
update, for every pair.

mode=offline: fixed pairs, trained for ``iterations`` passes (each ``optim.epochs`` epochs). data.source:
  - task: at ``dialogues`` task rows (the rows' own prefixes; with ``data.prefix=on_policy`` the initial policy's
    roll-in to the turn ``turn_sampling`` draws, e.g. ``last``: the paper's last-turn DPO), sample n replies each
    from the initial policy; the env scores every reply (a fork of n branches that end right after the reply),
    best vs worst is the pair;
  - file / hub: (context, chosen, rejected) records, see agents/dpo/data.py for the layouts.
mode=online, each iteration t (the recipe's loop, multi-turn):
  1. for each of ``dialogues`` task rows (drawn without replacement) draw (H', h) (``turn_sampling``) and roll in
     with π_t to s_h (the shared branching primitive, agents/common/branching.py, as REFUEL);
  2. fork s_h into n branches and sample a turn-h reply on each from π_t;
  3. the env scores each reply: its immediate reward (default), or with ``future=true`` the terminal score after
     completing the branch to H' with π_t and the user (REFUEL's Q estimate);
  4. pair best vs worst by reward − λ·characters (select_best_worst); ties are dropped;
  5. DPO on the new pairs only; π_{t+1} warm-starts from the result. The reference is the initial (SFT) policy,
     or with ``reference=previous`` π_t itself (the recipe's later code).

Deviations from the paper and its reference code:
  1. LoRA by default (full fine-tuning with policy.lora_r=0); π_ref = the adapter-disabled model (or a frozen copy).
  2. Defaults are sized for a 2-core CPU (16 contexts per iteration, lr 5e-5 for LoRA, short replies); the
     recipe's values are 20k prompts per iteration, lr 5e-7 full fine-tuning, warm-up 0.03, batch 128.
  3. Multi-turn: the recipe optimises the final reply of dataset contexts; here (online) the context is s_h of an
     on-policy dialogue and the env's reward model scores the reply in context.
  4. n replies at one temperature (``sampling.temperature``, 1.0 here); the paper mixes T=1.0 and T=0.7.
  5. Pairs whose two replies are token-identical are dropped (possible only with future=true).
  6. One cosine schedule across all iterations (the recipe restarts it per iteration); the step count assumes
     one pair per context, so the schedule does not quite reach 0 when ties are dropped.
  7. Evaluation is in-run: fixed held-out states and user seeds, win rate per turn vs the initial policy judged by
     the env's reward (the paper uses AlpacaEval 2, MT-Bench and Arena-Hard).
  8. ``future=true future_samples=m`` (m > 1): each reply is scored by the mean final score of m continuations
     forked after it (CollabLLM's multiturn-aware reward, arXiv 2502.00640), not by one; every continuation's
     turns count toward the budget. Default m = 1 (one continuation, as before).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agents.common.batching import values_like
from agents.common.checkpoint import load_checkpoint, save_checkpoint
from agents.common.config import OptimSettings, build_task_early
from agents.common.distributed import SINGLE, Ranks, check_processes, combine_stats, gather, setup
from agents.common.logging import MetricLogger
from agents.common.losses import dpo_loss
from agents.common.policy import (
    frozen_reference,
    load_policy,
    reference_mode,
)
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
from agents.common.train import Pair, fill_reference_logprobs, make_optimizer, pair_update, steps_per_iteration
from agents.dpo.config import DpoConfig, validate
from agents.dpo.data import load_preferences, tokenize_pair
from dialogue_gym.progress import track

log = logging.getLogger("agents.dpo")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
LOGPROB_TEMPERATURE = 1.0  # DPO's implicit reward is β·log π/π_ref of the model's own distribution
DATA_STREAM = 2**31 - 1  # rng stream of offline pair generation (iterations use streams 0, 1, ...)


def preference_update(model: Any, optimizer: Any, scheduler: Any, pairs: Sequence[Pair], beta: float,
                      label_smoothing: float, pad_id: int, optim: OptimSettings, rng: np.random.Generator,
                      ranks: Ranks = SINGLE, steps: int = 0) -> list[dict[str, float]]:
    """``optim.epochs`` passes of minibatch DPO over the pairs (``a`` chosen, ``b`` rejected, ``ref_*`` filled), or
    exactly ``steps`` minibatches when > 0: the shared pair update of agents.common.train with the DPO loss.
    Returns one metrics dict per step."""

    def loss(logp_a: torch.Tensor, logp_b: torch.Tensor, mb: Sequence[Pair]) -> tuple[torch.Tensor, dict]:
        return dpo_loss(logp_a, logp_b, values_like([p.ref_a for p in mb], logp_a),
                        values_like([p.ref_b for p in mb], logp_a), beta, label_smoothing)

    return pair_update(model, optimizer, scheduler, pairs, loss, pad_id, LOGPROB_TEMPERATURE, optim, rng, ranks,
                       steps)


def reference_logprobs(model: Any, reference: Any | None, pairs: Sequence[Pair], use_sft: bool, pad: int,
                       optim: OptimSettings) -> None:
    """Fill ``ref_a``/``ref_b`` once: the initial (SFT) policy, or the current weights (π_t, ``previous``)."""
    if use_sft:
        with reference_mode(model, reference) as ref:
            fill_reference_logprobs(ref, pairs, pad, LOGPROB_TEMPERATURE, optim)
    else:
        fill_reference_logprobs(model, pairs, pad, LOGPROB_TEMPERATURE, optim)


def run(cfg: DpoConfig) -> dict:
    """Train and evaluate (offline or online, see the module docstring)."""
    validate(cfg)
    online, from_task = cfg.mode == "online", cfg.mode == "online" or cfg.data.source == "task"
    prefs, dropped = [], {}
    if not from_task:  # parse the whole file (or hub set) now: a bad record fails before any model loads
        prefs, dropped = load_preferences(cfg.data.source, cfg.data.path, cfg.data.hub_id, cfg.data.hub_split,
                                          cfg.data.max_pairs)
        log.info("%d preference pairs from %s (dropped: %s)", len(prefs), cfg.data.path or cfg.data.hub_id,
                 dropped or "none")
    elif online and cfg.data.source != "task":
        log.warning("mode=online samples its pairs through the env; data.source=%s is ignored", cfg.data.source)
    ranks = setup()  # under `accelerate launch`: this process's share (agents/common/distributed.py)
    check_processes(cfg.dialogues if from_task else 0, ranks, cfg.policy.engine)  # file pairs: any count
    check_sharding(ranks.sharded, cfg.policy, "DPO")
    # a missing dataset, or too few rows in the evaluation split, fails here, before any model loads
    task = build_task_early(cfg.env, cfg.eval.dialogues, cfg.eval.split)
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    if ranks.device:  # one GPU per process under a launcher
        cfg.policy.device = ranks.device
    model, tokenizer = load_policy(cfg.policy, seed=cfg.seed)
    pad = pad_id(tokenizer)
    sft = cfg.reference == "sft"
    reference = frozen_reference(model) if sft and cfg.policy.lora_r == 0 else None  # LoRA: adapter disabled
    model, trainer = split_for_training(model, ranks.sharded)  # trainer: the model, or its FSDP root
    engine = policy_engine(cfg.policy, model, tokenizer, seed=cfg.seed)
    params = sampling_params(cfg.sampling)
    if from_task:
        chunk = cfg.rollout_batch or cfg.dialogues // ranks.world
        rollin = make_vec(cfg.env, chunk, task=task)
        branches = make_vec(cfg.env, cfg.n * cfg.future_samples * chunk, task=task, reward_mode="terminal")
        n_rows = rollin.num_rows
    evaluator = Evaluator(cfg.env, cfg.eval, cfg.sampling, run_dir, resume=cfg.resume) if ranks.main else None

    fixed: list[Pair] = []
    data_stats: dict[str, float] = {}
    if not online:  # the fixed pairs, before any checkpoint is restored (so a resumed run rebuilds the same ones)
        if from_task:
            fixed, data_stats = collect_pairs(
                rollin, branches, engine, params, np.random.default_rng([cfg.seed, DATA_STREAM]), cfg.dialogues,
                n_rows, cfg.turn_sampling, future=False, prefix=cfg.data.prefix, k=cfg.n, pairing="best_worst",
                length_penalty=cfg.length_penalty, ranks=ranks)
            reference_logprobs(model, reference, fixed, True, pad, cfg.optim)  # π_ref = SFT: once for the run
            fixed, data_stats = gather(fixed, ranks), combine_stats(data_stats, ranks)
            if not fixed:
                raise RuntimeError(f"every one of the {cfg.dialogues} sampled contexts was a tie; no pair to train on "
                                   "(raise dialogues or n)")
        else:
            fixed = [tokenize_pair(p, tokenizer) for p in prefs]
            data_stats = {"env/pairs": float(len(fixed)), **{f"env/dropped_{k}": float(v) for k, v in dropped.items()}}
            reference_logprobs(model, reference, fixed, True, pad, cfg.optim)  # π_ref = SFT: once for the run
    per_iteration = cfg.steps or steps_per_iteration(len(fixed) if fixed else cfg.dialogues, cfg.optim)
    optimizer, scheduler = make_optimizer(trainer, cfg.optim, cfg.iterations * per_iteration)
    logger = MetricLogger(run_dir, resume=cfg.resume) if ranks.main else None

    start, _ = begin(cfg, engine, model, logger, evaluator,  # sharded: every process loads its shards
                     lambda: load_checkpoint(run_dir, model, optimizer, scheduler, trainer))

    name = "DPO" if online else "offline DPO"
    done_here = 0
    for t in track(range(start, cfg.iterations), total=cfg.iterations, initial=start, desc=f"{name} iterations",
                   unit="iteration"):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, t])  # everything an iteration draws comes from (seed, t)
        if online:
            pairs, stats = collect_pairs(rollin, branches, engine, params, rng, cfg.dialogues, n_rows,
                                         cfg.turn_sampling, cfg.future, "on_policy", k=cfg.n, pairing="best_worst",
                                         length_penalty=cfg.length_penalty, ranks=ranks,
                                         futures=cfg.future_samples)
            reference_logprobs(trainer, reference, pairs, sft, pad, cfg.optim)
            pairs, stats = gather(pairs, ranks), combine_stats(stats, ranks)  # every process: all pairs, plan order
        else:
            pairs, stats = fixed, dict(data_stats)
        t_roll = time.time() - t0
        if not pairs:
            log.warning("iteration %d: no pair (every context was a tie); no update", t + 1)
        history = preference_update(trainer, optimizer, scheduler, pairs, cfg.beta, cfg.label_smoothing, pad,
                                    cfg.optim, np.random.default_rng([cfg.seed, t, 1]), ranks, cfg.steps)
        refresh_copy(model, trainer)  # FSDP: the plain copy gets the updated weights
        t_sync = time.time()
        sync_policy(engine, model)  # a vLLM policy engine loads the new adapter or weights; HF samples the model
        t_sync = time.time() - t_sync
        metrics = {**stats, "perf/rollout_s": t_roll, "perf/sync_s": t_sync, "perf/iteration_s": time.time() - t0,
                   "perf/policy_tokens": float(engine.tokens_generated)}
        if from_task:
            metrics["perf/user_calls"] = float(rollin.usage.user_calls + branches.usage.user_calls)
            metrics["perf/reward_calls"] = float(rollin.usage.reward_calls + branches.usage.reward_calls)
        done_here += 1
        saves = ranks.main or ranks.sharded  # one process saves (all hold the same weights); sharded: each its shards
        if end_iteration(cfg, t, done_here, metrics, history, logger, evaluator, engine,
                         (lambda state: save_checkpoint(run_dir, model, optimizer, scheduler, state, trainer))
                         if saves else None):
            return {"stopped_at": t + 1}

    return finish(name, cfg, evaluator, engine, model, tokenizer, run_dir, logger)


Config = DpoConfig  # the contract with the leaderboard: an agent exports its Config schema and run(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="dpo")
def main(raw: DictConfig) -> None:
    launch(raw, DpoConfig, run)


if __name__ == "__main__":
    main()
