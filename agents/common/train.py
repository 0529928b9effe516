"""Optimizer set-up and the pairwise update loop shared by REFUEL, REBEL (regression loss) and DPO (DPO loss)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents.common.batching import Reply, reply_logprobs, values_like
from agents.common.config import OptimSettings
from agents.common.distributed import SINGLE, Ranks, all_reduce_gradients, all_reduce_sums
from agents.common.losses import regression_loss
from agents.common.policy import trainable_parameters
from agents.common.sharding import dummy_logprob, forwards, is_sharded, lockstep


@dataclass
class Pair:
    """Two replies at the same state with their returns; ``ref_*`` are π_t's log-probs (filled once)."""

    a: Reply
    b: Reply
    reward_a: float
    reward_b: float
    turn: int
    ref_a: float = 0.0
    ref_b: float = 0.0


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

    Warm-up steps ``0 .. warmup - 1`` get ``(step + 1) / (warmup + 1)``, so the first step already moves the
    weights (a warm-up from 0, as transformers' ``get_cosine_schedule_with_warmup`` does, wastes the first step:
    with 5 optimizer steps in a run, a fifth of the training). Then ``0.5 * (1 + cos(pi * k / n))`` for the
    ``k``-th of the ``n = total - warmup`` remaining steps: 1 at the first of them, above 0 at the last.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    k, n = step - warmup, max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(k, n - 1) / n))


def make_optimizer(model: Any, optim: OptimSettings, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters and a cosine schedule with linear warm-up (per optimizer step; see
    :func:`lr_factor`: every step, the first included, has a learning rate above 0)."""
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    total = max(1, total_steps)
    warmup = math.ceil(optim.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
    return opt, sched


def steps_per_iteration(pairs: int, optim: OptimSettings) -> int:
    return optim.epochs * max(1, math.ceil(pairs / optim.batch_size))


def fill_reference_logprobs(model: Any, pairs: Sequence[Pair], pad_id: int, temperature: float,
                            optim: OptimSettings) -> None:
    """π_t log-probs of both replies of every pair, computed once per iteration before any update. Sharded
    (FSDP), every process runs as many forwards as the busiest one (dummy ones after its own), under no_grad
    (FSDP's gathered weights must not become inference tensors, which the next training step writes into)."""
    replies = [r for p in pairs for r in (p.a, p.b)]
    sharded = is_sharded(model)
    with torch.no_grad() if sharded else torch.inference_mode():
        logps = reply_logprobs(model, replies, pad_id, temperature, optim.micro_batch_size, optim.max_length)
        if sharded:
            mine = forwards(len(replies), optim.micro_batch_size)
            for _ in range(lockstep(mine, next(model.parameters()).device) - mine):
                dummy_logprob(model)
    for i, p in enumerate(pairs):
        p.ref_a, p.ref_b = float(logps[2 * i]), float(logps[2 * i + 1])


def minibatches(n: int, batch_size: int, epochs: int, steps: int, rng: np.random.Generator) -> list[list[int]]:
    """The indices of an update's minibatches over ``n`` items: ``epochs`` passes, each a fresh permutation cut
    into ``batch_size`` slices; with ``steps > 0`` exactly ``steps`` minibatches instead (passes repeated as needed,
    the last one cut short), so the update's size does not depend on how many items there are. None for n = 0."""
    out: list[list[int]] = []
    if n == 0:
        return out
    passes = epochs if steps <= 0 else math.ceil(steps / math.ceil(n / batch_size))
    for _ in range(passes):
        order = rng.permutation(n)
        out.extend([int(i) for i in order[start:start + batch_size]] for start in range(0, n, batch_size))
    return out[:steps] if steps > 0 else out


def optimizer_step(params: list[torch.Tensor], optimizer: Any, scheduler: Any, max_grad_norm: float,
                   sums: dict[str, float], ranks: Ranks = SINGLE, reduce_gradients: bool = True) -> dict[str, float]:
    """End one minibatch, for every agent's update: sum the processes' gradients (``reduce_gradients``; an FSDP root
    averages its own), sum the metric ``sums`` over processes, clip, step the optimizer and the schedule. Returns
    the step's metrics row (``loss/<name>`` of each sum, ``loss/grad_norm`` before clipping, ``loss/lr``)."""
    if reduce_gradients:
        all_reduce_gradients(params, ranks)
    sums = all_reduce_sums(sums, ranks)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return {**{f"loss/{k}": v for k, v in sums.items()}, "loss/grad_norm": float(grad_norm),
            "loss/lr": float(scheduler.get_last_lr()[0])}


def pair_update(model: Any, optimizer: Any, scheduler: Any, pairs: Sequence[Pair], pair_loss: Callable,
                pad_id: int, temperature: float, optim: OptimSettings, rng: np.random.Generator,
                ranks: Ranks = SINGLE, steps: int = 0) -> list[dict[str, float]]:
    """``optim.epochs`` passes of minibatch updates over pairs (exactly ``steps`` minibatches when > 0, see
    :func:`minibatches`), with gradient accumulation.

    ``pair_loss(logp_a, logp_b, pairs) -> (loss, metrics)`` gets the (M,) log-probs of each micro-batch's two
    replies under the current weights (``ref_*`` and rewards are on the pairs). REBEL/REFUEL and DPO differ only
    there. Returns one metrics dict per optimizer step.

    Data-parallel (``ranks.world > 1``, every process holding all ``pairs``): process ``r`` takes rows ``r, r + W,
    ...`` of each minibatch and the gradients are summed across processes before clipping, so every process takes
    the single-process step (agents/common/distributed.py). Sharded (``model`` an FSDP root, agents/common/
    sharding.py): FSDP averages the gradients itself, so each loss is scaled by ``W``, and every process runs the
    same number of micro-batches (a zero-weighted dummy where it has no rows left).
    """
    model.train()
    history = []
    params = list(trainable_parameters(model).values())
    sharded = is_sharded(model)
    scale = ranks.world if sharded else 1
    for picked in minibatches(len(pairs), optim.batch_size, optim.epochs, steps, rng):
        batch = [pairs[i] for i in picked]
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        micro = max(1, optim.micro_batch_size // 2)  # two sequences per pair
        mine = batch[ranks.rank::ranks.world]  # this process's rows of the minibatch (all of it in one process)
        for m in range(0, len(mine), micro):
            mb = mine[m:m + micro]
            logp = reply_logprobs(model, [r for p in mb for r in (p.a, p.b)], pad_id, temperature,
                                  optim.micro_batch_size, optim.max_length)
            loss, metrics = pair_loss(logp[0::2], logp[1::2], mb)
            (loss * (scale * len(mb) / len(batch))).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(mb) / len(batch)
        if sharded:  # as many micro-batches as the process with the most rows (same for every minibatch)
            busiest = forwards(len(batch[0::ranks.world]), micro)
            for _ in range(busiest - forwards(len(mine), micro)):
                (dummy_logprob(model) * 0.0).backward()
        history.append(optimizer_step(params, optimizer, scheduler, optim.max_grad_norm, sums, ranks,
                                      reduce_gradients=not sharded))
    model.eval()
    return history


def regression_update(model: Any, optimizer: Any, scheduler: Any, pairs: Sequence[Pair], eta: float,
                      pad_id: int, temperature: float, optim: OptimSettings, rng: np.random.Generator,
                      ranks: Ranks = SINGLE) -> list[dict[str, float]]:
    """REBEL/REFUEL: regress each pair's log-ratio difference onto ``eta`` times its reward difference."""

    def loss(logp_a: torch.Tensor, logp_b: torch.Tensor, mb: Sequence[Pair]) -> tuple[torch.Tensor, dict]:
        return regression_loss(logp_a, values_like([p.ref_a for p in mb], logp_a), logp_b,
                               values_like([p.ref_b for p in mb], logp_a),
                               values_like([p.reward_a for p in mb], logp_a),
                               values_like([p.reward_b for p in mb], logp_a), eta)

    return pair_update(model, optimizer, scheduler, pairs, loss, pad_id, temperature, optim, rng, ranks)
