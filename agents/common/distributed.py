"""Data-parallel training under ``accelerate launch``: each process collects its share of the dialogues, all
processes train on all the pairs with their gradients summed across processes, the main process logs.

Run (``conf/accelerate/*.yaml`` hold ready launcher configs):

    accelerate launch --config_file conf/accelerate/ddp_gpu8.yaml -m agents.refuel +env=arithmetic
    accelerate launch --config_file conf/accelerate/cpu2.yaml -m agents.refuel +experiment=smoke   # 2 CPU, gloo

How an iteration is split. Every process draws the same plan (agents/common/branching.py: rows, turns and seeds
per dialogue, from ``(seed, t)``) and plays its contiguous block of it (:func:`share`). Because every seed is per
dialogue, the union of the blocks is exactly the dialogues one process would play. Each process fills the
reference log-probs of its own pairs, then :func:`gather` gives every process all pairs in plan order. The update
walks the same minibatches on every process; process ``r`` takes rows ``r, r + W, ...`` of each minibatch, weights
each row's loss by ``1 / minibatch size`` (the single-process weight) and the gradients are summed across
processes before clipping (:func:`all_reduce_gradients`), so every process takes the step the single process
would take on the same data (tested on CPU with 2 processes).

Why not the DDP wrapper's forward hook. The log-prob path calls the decoder and the LM head separately (it never
materialises full-vocabulary logits; agents/common/logprobs.py), which bypasses a ``DistributedDataParallel``
wrapper's forward. The gradient synchronisation is therefore the collective DDP itself runs (one all-reduce of the
LoRA gradients per optimizer step, in one flat bucket), called explicitly. Full fine-tuning with an FSDP launcher
config shards the weights instead (agents/common/sharding.py; ``Ranks.sharded``); DeepSpeed is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# statistics summed across processes (the rest are averaged)
COUNT_KEYS = ("env/pairs", "env/ties_dropped", "env/identical_pairs_dropped", "env/policy_samples")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: ``rank`` of ``world`` processes (1 without a launcher)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the launcher's device for this process (None: leave the model where it loads)
    sharded: bool = False  # an FSDP launch: full fine-tuning with sharded weights (agents/common/sharding.py)

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks()  # one process, no launcher


def setup() -> Ranks:
    """Join the process group ``accelerate launch`` set up (gloo on CPU, NCCL on CUDA); one process otherwise.
    An FSDP launcher config gives ``sharded=True`` (checked against the run's settings by
    :func:`agents.common.sharding.check_sharding`)."""
    from agents.common.sharding import fsdp_requested

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        from agents.common.config import ConfigError

        raise ConfigError("the accelerate config asks for DeepSpeed, which the agents do not use: launch with "
                          "conf/accelerate/ddp_gpu8.yaml (LoRA) or fsdp_gpu8.yaml (full fine-tuning)")
    sharded = fsdp_requested()
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # a launcher (torchrun) set up a group
    # One process stays unlaunched, except an FSDP launch of one process (one GPU): sharding over a group of one
    # runs the same code path as eight, so it can be checked on a one-GPU machine.
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (sharded and launched):
        return Ranks()
    import torch.distributed as dist

    if dist.is_initialized():  # joined already (launch() and run() both ask)
        return Ranks(dist.get_rank(), dist.get_world_size(), _device(), sharded)
    if _on_cuda():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if local > torch.cuda.device_count():
            from agents.common.config import ConfigError

            raise ConfigError(f"{local} processes on this machine but {torch.cuda.device_count()} GPU(s): NCCL "
                              "needs one GPU per process; launch as many processes as GPUs (num_processes in the "
                              "accelerate config), or train on the CPU with DIALOGUE_GYM_DEVICE=cpu (gloo)")
        from accelerate import PartialState

        state = PartialState()  # NCCL, one GPU per process
        rank, world, device = state.process_index, state.num_processes, str(state.device)
    else:
        # accelerate's own CPU multi-process path needs mpirun; its torchrun launcher (MULTI_GPU config, as
        # conf/accelerate/cpu2.yaml) starts the processes, and without CUDA (or with DIALOGUE_GYM_DEVICE=cpu)
        # they join with gloo here
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        rank, world, device = dist.get_rank(), dist.get_world_size(), None
    logging.getLogger("agents").info("process %d of %d (%s, backend %s%s)", rank, world, device or "cpu",
                                     dist.get_backend(), ", FSDP" if sharded else "")
    return Ranks(rank, world, device, sharded)


def _on_cuda() -> bool:
    """Whether this launch trains on GPUs: the device ``"auto"`` resolves to (``$DIALOGUE_GYM_DEVICE``, else CUDA
    when available), so ``DIALOGUE_GYM_DEVICE=cpu`` launches a gloo CPU run on a GPU machine."""
    from dialogue_gym.models import resolve_device

    return resolve_device("auto").type == "cuda"


def _device() -> str | None:
    if _on_cuda():
        from accelerate import PartialState

        return str(PartialState().device)
    return None


def check_processes(dialogues: int, ranks: Ranks, policy_engine: str = "hf") -> None:
    """Start-up checks of a launch: the dialogues of an iteration split evenly over the processes; a vLLM policy
    engine per process only on CPU (on GPUs each process's engine would need its own device, not wired)."""
    from agents.common.config import ConfigError

    if ranks.world > 1 and policy_engine == "vllm" and _on_cuda():
        raise ConfigError("policy.engine=vllm with several processes on GPUs is not wired (every process would "
                          "start its engine on the same device): launch one process (conf/accelerate/gpu1.yaml) "
                          "or use policy.engine=hf")
    if dialogues % ranks.world:
        raise ConfigError(f"dialogues={dialogues} does not split evenly over the {ranks.world} launched processes: "
                          f"make dialogues a multiple of {ranks.world}")


def share(n: int, ranks: Ranks) -> slice:
    """This process's contiguous block of ``n`` dialogues (``n`` must divide evenly; checked at start-up)."""
    if n % ranks.world:
        raise ValueError(f"{n} dialogues do not split evenly over {ranks.world} processes")
    size = n // ranks.world
    return slice(ranks.rank * size, (ranks.rank + 1) * size)


def gather(items: Sequence[Any], ranks: Ranks) -> list[Any]:
    """Every process's items, concatenated in rank order (plan order when each holds its :func:`share`)."""
    if ranks.world == 1:
        return list(items)
    import torch.distributed as dist

    parts: list[Any] = [None] * ranks.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def broadcast(value: Any, ranks: Ranks) -> Any:
    """The main process's ``value`` on every process (e.g. the run directory)."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def combine_stats(stats: dict[str, float], ranks: Ranks) -> dict[str, float]:
    """Per-iteration ``env/`` statistics over all processes: counts summed, the rest averaged (equal shares)."""
    every = gather([stats], ranks)
    return {k: float(sum(s[k] for s in every)) if k in COUNT_KEYS else float(sum(s[k] for s in every) / len(every))
            for k in stats}


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], ranks: Ranks) -> None:
    """Sum the gradients of ``params`` across processes, in one flat bucket on the parameters' device."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sums(sums: dict[str, float], ranks: Ranks) -> dict[str, float]:
    """Metric sums (each already weighted by its share of the minibatch) added across processes; a process with no
    rows in the minibatch contributes nothing."""
    if ranks.world == 1:
        return sums
    out: dict[str, float] = {}
    for part in gather([sums], ranks):
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out
