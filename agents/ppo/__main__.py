"""Token-level PPO (Schulman et al., 2017, https://arxiv.org/abs/1707.06347) for a language-model policy in the
multi-turn dialogue env, in the RLHF form of Ziegler et al. (2019, https://arxiv.org/abs/1909.08593) and
Ouyang et al. (2022, https://arxiv.org/abs/2203.02155): a value head, a per-token KL penalty to a frozen
reference policy, GAE, clipped policy and value losses.

Run:
    python -m agents.ppo                                  # embedded default env
    python -m agents.ppo +env=arithmetic                  # verifiable arithmetic task
    python -m agents.ppo env.reward_mode=delta kl_target=6.0 critic=separate
    python -m agents.ppo +experiment=smoke                # tiny model, a handful of steps

Each iteration:
  1. roll out ``dialogues`` full dialogues (train split, horizon H = env.max_turns) with the current policy and
     the simulated user, through the env only (the shared branching primitive with k=1 from each row's own
     prefix, agents/common/branching.py; rows drawn without replacement);
  2. for every assistant turn, one forward pass over (the turn's prompt ids, its sampled ids) gives the old
     log-probs and values of its tokens; the reference policy's log-probs come from the adapter-disabled model;
  3. per-token rewards: −β·(log π − log π_ref) on every assistant token, plus the env's reward after each turn on
     that turn's last token (env.reward_mode: terminal = final score only, per_turn = every turn's score,
     delta = score increments, which sum to the final score);
  4. GAE (γ, λ) over each dialogue's assistant tokens in order: the last token of turn k is followed by the first
     token of turn k+1 (the user's reply in between is the env's transition); advantages whitened over the batch;
  5. ``optim.epochs`` epochs of minibatches (``optim.batch_size`` dialogues each, all their turns) of the clipped
     policy loss + vf_coef · the clipped value loss; then β is adapted toward ``kl_target`` (or kept fixed).

How a dialogue becomes tokens. Only the policy's tokens are actions. Each assistant turn is its own row: the
prompt ids the generation engine rendered for it (the whole conversation so far through the chat template, with
the generation prompt: user and system tokens, and the earlier assistant replies as the template re-renders them)
followed by the ids the policy actually sampled. So every action token is scored in exactly the context it was
sampled from; the rows of one dialogue are chained only in GAE (step 4). One long sequence per dialogue (the final
turn's prompt + its reply) would be cheaper, but the template's re-rendering of earlier replies need not equal the
sampled ids, so earlier actions would be trained on tokens the policy never produced.

Values. ``critic=shared``: a linear value head (initialised to 0) on the policy's decoder hidden states, trained
jointly with the policy through its LoRA weights (one forward gives log-probs and values); ``critic=separate``:
its own model (``critic_model``, with its own LoRA) and value head. The value of action token t is read at
position t − 1, the state the token is sampled from (the same position that predicts it).

Logged: loss/approx_kl (k3 estimator of KL(π_old ‖ π_new)), loss/clip_fraction, loss/value_clip_fraction,
loss/explained_variance (rollout values vs returns), policy/entropy (−mean log-prob of the sampled tokens, at the
sampling temperature), policy/kl_ref (per-dialogue KL to the reference), policy/kl_coef.

Deviations from the references:
  1. LoRA by default (full fine-tuning with policy.lora_r=0, the reference then being a frozen copy).
  2. Defaults are sized for a 2-core CPU (16 dialogues per iteration, short replies, lr 5e-5 for LoRA).
  3. Log-probs of the policy and the reference are taken at the sampling temperature (logits / T), so the
     ratio and the KL penalty refer to the distribution the tokens were drawn from.
  4. The turns of a dialogue are separate rows (see above), not one packed sequence.
  5. One cosine schedule across all iterations (the step count is exact: minibatches are counted in dialogues).
  6. Evaluation is in-run: fixed held-out states and user seeds, win rate per turn vs the initial policy judged
     by the env's reward.
"""

from __future__ import annotations

import dataclasses
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

from agents.common.batching import Reply, collate_on, pack_right, unpack_right
from agents.common.checkpoint import load_checkpoint, save_checkpoint
from agents.common.config import build_task_early
from agents.common.distributed import (
    SINGLE,
    Ranks,
    check_processes,
    combine_stats,
    gather,
    setup,
    share,
)
from agents.common.logging import MetricLogger
from agents.common.logprobs import decoder_hidden_states, logprobs_from_hidden, token_logprobs
from agents.common.losses import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_kl,
)
from agents.common.policy import (
    frozen_reference,
    load_policy,
    reference_mode,
    trainable_parameters,
)
from agents.common.policy_engine import sync_policy
from agents.common.rollout import collect_dialogues
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
from agents.common.train import make_optimizer, optimizer_step
from agents.ppo.config import PpoConfig, validate
from dialogue_gym.progress import track

log = logging.getLogger("agents.ppo")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@dataclass
class Turn:
    """One assistant turn of a rolled-out dialogue and the rollout quantities of its L tokens, each (L,).

    Attributes:
        reply: the prompt ids the policy answered and the ids it sampled.
        dialogue: which dialogue of the batch the turn belongs to (turns are stored in dialogue order).
        score: the env's reward after this turn, placed on the turn's last token.
    """

    reply: Reply
    dialogue: int
    score: float
    logp: torch.Tensor | None = None  # log π_old of the sampled tokens
    ref: torch.Tensor | None = None  # log π_ref
    value: torch.Tensor | None = None  # V_old of the state each token is sampled from
    advantage: torch.Tensor | None = None
    ret: torch.Tensor | None = None  # GAE return, the value target


def build_agent(cfg: PpoConfig, model: Any) -> torch.nn.ModuleDict:
    """The policy, the value head and (``critic=separate``) the critic model, as one module (for the optimizer and
    the checkpoint); the value head starts at 0."""
    modules: dict[str, Any] = {"policy": model}
    if cfg.critic == "separate":
        settings = dataclasses.replace(cfg.policy, model=cfg.critic_model or cfg.policy.model)
        modules["critic"], _ = load_policy(settings, seed=cfg.seed + 1)
    hidden = modules.get("critic", model).get_input_embeddings().embedding_dim
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    modules["value_head"] = head.to(next(model.parameters()).device)
    return torch.nn.ModuleDict(modules)


def dialogue_turns(branches: Sequence[Any], first: int = 0) -> tuple[list[Turn], dict[str, float]]:
    """Every assistant turn of the played dialogues (one branch each, dialogue indices from ``first``), in dialogue
    order, and rollout statistics."""
    turns = [Turn(reply, first + d, score) for d, b in enumerate(branches)
             for reply, score in zip(b.replies, b.rewards)]
    stats = {"env/mean_return": float(np.mean([sum(b.rewards) for b in branches])),
             "env/mean_final_reward": float(np.mean([b.reward for b in branches])),
             "env/mean_turns": float(np.mean([b.turns for b in branches])),
             "env/mean_reply_tokens": float(np.mean([len(t.reply.token_ids) for t in turns])),
             "env/cut_replies": float(np.mean([not t.reply.finished for t in turns]))}
    return turns, stats


def policy_and_values(agent: torch.nn.ModuleDict, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probs of the action tokens and (B, T) values of the states they are sampled from (0 elsewhere)."""
    policy = agent["policy"]
    hidden = decoder_hidden_states(policy, ids, attention)  # (B, T, H)
    logp = logprobs_from_hidden(policy, hidden, ids, mask, temperature)
    critic_hidden = decoder_hidden_states(agent["critic"], ids, attention) if "critic" in agent else hidden
    v = agent["value_head"](critic_hidden.float()).squeeze(-1)  # (B, T): value of the prefix ending at t
    values = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)  # token t is sampled from the state at t − 1
    return logp, torch.where(mask.bool(), values, torch.zeros_like(values))


@torch.no_grad()
def score_turns(agent: torch.nn.ModuleDict, reference: Any | None, turns: Sequence[Turn], pad: int,
                temperature: float, max_length: int, micro_batch_size: int) -> None:
    """Fill ``logp``, ``ref`` and ``value`` of every turn (before any update)."""
    agent.eval()
    device = next(agent.parameters()).device
    for start in range(0, len(turns), micro_batch_size):
        chunk = turns[start:start + micro_batch_size]
        ids, attention, mask = collate_on([t.reply for t in chunk], pad, max_length, device)
        logp, values = policy_and_values(agent, ids, attention, mask, temperature)
        with reference_mode(agent["policy"], reference) as ref:
            ref_logp = token_logprobs(ref, ids, attention, mask, temperature)
        lengths = [len(t.reply.token_ids) for t in chunk]
        for t, a, r, v in zip(chunk, unpack_right(logp, lengths), unpack_right(ref_logp, lengths),
                              unpack_right(values, lengths)):
            t.logp, t.ref, t.value = a, r, v


def assign_advantages(turns: Sequence[Turn], dialogues: int, kl_coef: float, gamma: float, lam: float,
                      whiten: bool) -> dict[str, float]:
    """KL-penalised per-token rewards and GAE over each dialogue's assistant tokens (module docstring, 3-4).

    Lays the batch out as (dialogues, assistant tokens in order), fills ``advantage`` and ``ret`` of every turn,
    and returns rollout statistics.
    """
    groups = [[t for t in turns if t.dialogue == d] for d in range(dialogues)]
    width = max(1, max(sum(len(t.reply.token_ids) for t in g) for g in groups))
    scores, logp, ref, values, mask = (torch.zeros(dialogues, width) for _ in range(5))  # each (D, W)
    spans: list[tuple[Turn, int, int, int]] = []
    for d, group in enumerate(groups):
        pos = 0
        for t in group:
            n = len(t.reply.token_ids)
            logp[d, pos:pos + n], ref[d, pos:pos + n], values[d, pos:pos + n] = t.logp, t.ref, t.value
            mask[d, pos:pos + n] = 1
            scores[d, pos + n - 1] = t.score
            spans.append((t, d, pos, pos + n))
            pos += n
    rewards = kl_penalized_rewards(scores, logp, ref, mask, kl_coef)  # (D, W)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    for t, d, a, b in spans:
        t.advantage, t.ret = advantages[d, a:b].clone(), returns[d, a:b].clone()
    return {"policy/kl_ref": float(sequence_kl(logp, ref, mask).mean()),
            "policy/entropy": float(-masked_mean(logp, mask)),
            "policy/kl_coef": float(kl_coef),
            "loss/explained_variance": explained_variance(values, returns, mask),
            "loss/value_mean": float(masked_mean(values, mask)),
            "loss/return_mean": float(masked_mean(returns, mask))}


def ppo_update(agent: torch.nn.ModuleDict, optimizer: Any, scheduler: Any, turns: Sequence[Turn], dialogues: int,
               cfg: PpoConfig, pad: int, rng: np.random.Generator, ranks: Ranks = SINGLE) -> list[dict[str, float]]:
    """``optim.epochs`` epochs of minibatches of ``optim.batch_size`` dialogues (all their turns).

    Micro-batches of ``optim.micro_batch_size`` turns accumulate gradients weighted by their share of the
    minibatch's action tokens, so each step minimises the token mean over the minibatch. Returns one metrics dict
    per optimizer step. Data-parallel (``ranks.world > 1``, every process holding all turns): process ``r`` takes
    dialogues ``r, r + W, ...`` of each minibatch and the gradients are summed across processes before clipping
    (agents/common/distributed.py), so every process takes the single-process step.
    """
    optim = cfg.optim
    agent.train()
    device = next(agent.parameters()).device
    params = list(trainable_parameters(agent).values())
    groups = [[t for t in turns if t.dialogue == d] for d in range(dialogues)]
    history = []
    for _ in range(optim.epochs):
        order = rng.permutation(dialogues)
        for start in range(0, dialogues, optim.batch_size):
            picked = order[start:start + optim.batch_size]
            tokens = sum(len(t.reply.token_ids) for d in picked for t in groups[d])  # the whole minibatch's
            batch = [t for d in picked[ranks.rank::ranks.world] for t in groups[d]]  # this process's dialogues
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for m in range(0, len(batch), optim.micro_batch_size):
                mb = batch[m:m + optim.micro_batch_size]
                ids, attention, mask = collate_on([t.reply for t in mb], pad, optim.max_length, device)
                logp, values = policy_and_values(agent, ids, attention, mask, cfg.sampling.temperature)
                pg_loss, pg = ppo_policy_loss(logp, pack_right([t.logp for t in mb], mask),
                                              pack_right([t.advantage for t in mb], mask), mask, cfg.clip)
                vf_loss, vf = ppo_value_loss(values, pack_right([t.value for t in mb], mask),
                                             pack_right([t.ret for t in mb], mask), mask, cfg.vf_clip)
                share = float(mask.sum()) / tokens
                ((pg_loss + cfg.vf_coef * vf_loss) * share).backward()
                parts = {"policy_loss": pg["loss"], "approx_kl": pg["approx_kl"], "clip_fraction": pg["clip_fraction"],
                         "ratio": pg["ratio"], "value_loss": vf["loss"], "value_clip_fraction": vf["clip_fraction"]}
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * share
            row = optimizer_step(params, optimizer, scheduler, optim.max_grad_norm, sums, ranks)
            history.append({**row, "loss/loss": row["loss/policy_loss"] + cfg.vf_coef * row["loss/value_loss"]})
    agent.eval()
    return history


def run(cfg: PpoConfig) -> dict:
    """Train and evaluate."""
    validate(cfg)
    ranks = setup()  # under `accelerate launch`: this process's share (agents/common/distributed.py)
    check_processes(cfg.dialogues, ranks, cfg.policy.engine)
    check_sharding(ranks.sharded, cfg.policy, "PPO")
    # a missing dataset, or too few rows in the evaluation split, fails here, before any model loads
    task = build_task_early(cfg.env, cfg.eval.dialogues, cfg.eval.split)
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    if ranks.device:  # one GPU per process under a launcher
        cfg.policy.device = ranks.device
    model, tokenizer = load_policy(cfg.policy, seed=cfg.seed)
    reference = frozen_reference(model) if cfg.policy.lora_r == 0 else None  # LoRA: the adapter-disabled model
    agent = build_agent(cfg, model)
    pad = pad_id(tokenizer)
    engine = policy_engine(cfg.policy, model, tokenizer, seed=cfg.seed)
    params = sampling_params(cfg.sampling)
    venv = make_vec(cfg.env, cfg.rollout_batch or cfg.dialogues // ranks.world, task=task)
    evaluator = Evaluator(cfg.env, cfg.eval, cfg.sampling, run_dir, resume=cfg.resume) if ranks.main else None
    n_rows = venv.num_rows
    total_steps = cfg.iterations * cfg.optim.epochs * math.ceil(cfg.dialogues / cfg.optim.batch_size)
    optimizer, scheduler = make_optimizer(agent, cfg.optim, total_steps)
    kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    logger = MetricLogger(run_dir, resume=cfg.resume) if ranks.main else None

    start, saved = begin(cfg, engine, model, logger, evaluator,
                         lambda: load_checkpoint(run_dir, agent, optimizer, scheduler))
    if saved is not None:
        kl.value = saved["kl_coef"]  # the adaptive KL controller's coefficient at the checkpoint

    done_here = 0
    for t in track(range(start, cfg.iterations), total=cfg.iterations, initial=start, desc="PPO iterations",
                   unit="iteration"):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, t])  # everything an iteration draws comes from (seed, t)
        played = collect_dialogues(venv, engine, params, rng, cfg.dialogues, n_rows, ranks)
        turns, stats = dialogue_turns(played, first=share(cfg.dialogues, ranks).start)
        t_roll = time.time() - t0
        score_turns(agent, reference, turns, pad, cfg.sampling.temperature, cfg.optim.max_length,
                    cfg.optim.micro_batch_size)
        turns, stats = gather(turns, ranks), combine_stats(stats, ranks)  # every process: all turns, in order
        stats.update(assign_advantages(turns, cfg.dialogues, kl.value, cfg.gamma, cfg.lam, cfg.whiten_advantages))
        history = ppo_update(agent, optimizer, scheduler, turns, cfg.dialogues, cfg, pad,
                             np.random.default_rng([cfg.seed, t, 1]), ranks)
        t_sync = time.time()
        sync_policy(engine, model)  # a vLLM policy engine loads the new adapter or weights; HF samples the model
        t_sync = time.time() - t_sync
        kl.update(stats["policy/kl_ref"], cfg.dialogues)
        metrics = {**stats, "perf/rollout_s": t_roll, "perf/sync_s": t_sync, "perf/iteration_s": time.time() - t0,
                   "perf/policy_tokens": float(engine.tokens_generated),
                   "perf/user_calls": float(venv.usage.user_calls), "perf/reward_calls": float(venv.usage.reward_calls)}
        done_here += 1
        if end_iteration(cfg, t, done_here, metrics, history, logger, evaluator, engine,  # one process saves
                         (lambda state: save_checkpoint(run_dir, agent, optimizer, scheduler,
                                                        {**state, "kl_coef": kl.value})) if ranks.main else None):
            return {"stopped_at": t + 1}

    return finish("PPO", cfg, evaluator, engine, model, tokenizer, run_dir, logger)


Config = PpoConfig  # the contract with the leaderboard: an agent exports its Config schema and run(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="ppo")
def main(raw: DictConfig) -> None:
    launch(raw, PpoConfig, run)


if __name__ == "__main__":
    main()
