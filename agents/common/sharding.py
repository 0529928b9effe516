"""Full fine-tuning with sharded weights (FSDP2, ``torch.distributed.fsdp.fully_shard``) under ``accelerate launch``
(REFUEL, REBEL, DPO).

    accelerate launch --config_file conf/accelerate/fsdp_gpu8.yaml -m agents.refuel policy.lora_r=0 ...

What is sharded. Each decoder layer is one FSDP unit; the rest (embeddings, final norm, LM head: tied or not) is
the root unit, a :class:`LogProbModule` whose ``forward`` *is* the summed log-prob computation of
agents/common/logprobs.py. That path calls the decoder and the LM head separately (it never builds full-vocabulary
logits), which bypasses a wrapped model's own ``forward``; making it the root's forward is what lets FSDP gather
the root's weights around it and reduce-scatter their gradients after the backward pass. Parameters, gradients and
optimizer state are split over the processes; every process computes the full model one unit at a time.

How the update stays the single-process update. Every process holds all pairs (agents/common/distributed.py) and
takes rows ``r, r + W, ...`` of each minibatch with the single-process loss weight. FSDP *averages* gradients over
the processes, so each process's loss is multiplied by ``W`` (gloo cannot sum with a pre-scaling factor). FSDP's
collectives run inside every forward and backward, so all processes must run the same number of them: a process
with fewer rows in a minibatch (or fewer pairs to fill reference log-probs for) runs a dummy forward (and a
zero-weighted backward) to stay in step (:func:`dummy_logprob`, :func:`lockstep`).

Sampling. Generating with sharded weights would need every process to take the same number of decoding steps; the
policy instead samples (and the main process evaluates, checkpoints and exports) on a plain full copy of the
weights in each process, refreshed from the shards after every update (:func:`load_full_weights`): the same
"trainer -> sampler" weight sync as the vLLM policy engine, which (``policy.engine=vllm``) then takes its full
weights from that copy. It costs one full copy of the weights per device (16 GB for an 8B policy in bf16) beside
the shards.

Checkpoints and resume. Every process writes its model and optimizer shards with ``torch.distributed.checkpoint``
beside the main process's full weights, atomically (agents/common/checkpoint.py); ``resume=true`` restores the
shards, the scheduler and every process's RNG states, then refreshes the plain copy from the shards.

Not wired (refused at start-up by :func:`check_sharding`): LoRA under FSDP (LoRA trains with DDP-style replicas)
and PPO (its value head and the per-token loss path are not wired). DPO with the SFT reference keeps the frozen
reference as a second plain copy per process.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch

from agents.common.logprobs import sequence_logprobs

SHARDED_AGENTS = ("REFUEL", "REBEL", "DPO")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


class LogProbModule(torch.nn.Module):
    """The FSDP root unit around a causal LM: ``forward`` returns the (B,) fp32 summed log-probs of the masked
    tokens (:func:`agents.common.logprobs.sequence_logprobs`)."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
        return sequence_logprobs(self.lm, input_ids, attention_mask, loss_mask, temperature=temperature)


def shard_policy(model: Any, device: torch.device) -> LogProbModule:
    """Shard a (non-LoRA) causal LM over the launched processes, in place; returns the root unit to train.

    Honours accelerate's ``FSDP_RESHARD_AFTER_FORWARD`` (default true: free each layer's gathered weights after
    its forward, gather again for the backward).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true")
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder .layers to shard one by one")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    root = LogProbModule(model)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard)
    return root


def split_for_training(model: Any, sharded: bool) -> tuple[Any, Any]:
    """``(model, trainer)``: the model every other part of a run uses (samples, evaluates, checkpoints, exports)
    and what the updates train. One process or DDP: the same object twice. FSDP: a plain full copy, and the
    sharded root of the original (refresh the copy after each update with :func:`refresh_copy`)."""
    if not sharded:
        return model, model
    plain = copy.deepcopy(model)
    return plain, shard_policy(model, next(plain.parameters()).device)


def refresh_copy(model: Any, trainer: Any) -> None:
    """After an update: the plain copy gets the sharded weights (every process calls it); a no-op unsharded."""
    if is_sharded(trainer):
        load_full_weights(model, trainer)


def is_sharded(model: Any) -> bool:
    return isinstance(model, LogProbModule)


def dummy_logprob(model: LogProbModule) -> torch.Tensor:
    """A forward on a two-token dummy row (scalar output): keeps a process in step with the others' collectives."""
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    loss = torch.tensor([[0, 1]], dtype=torch.long, device=device)
    return model(ids, mask, loss).sum()


def lockstep(n: int, device: torch.device) -> int:
    """The largest ``n`` over the processes (the number of forwards every process must run); ``device``: the
    shards' (NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    box = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def forwards(n_rows: int, batch_size: int) -> int:
    return math.ceil(n_rows / batch_size) if n_rows else 0


def full_state_dict(model: LogProbModule) -> dict[str, torch.Tensor]:
    """The LM's full (unsharded) weights, on every process and on the shards' device, keyed as the plain model's
    ``state_dict``; a collective: every process must call it. (Not offloaded to the CPU: that option hands the full
    weights to process 0 only; transiently one more full copy on the device.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k.removeprefix("lm."): v for k, v in full.items()}


@torch.no_grad()
def load_full_weights(target: Any, model: LogProbModule) -> None:
    """Copy the sharded model's current weights into the plain copy ``target`` (every process calls it)."""
    full = full_state_dict(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(full))
    if missing:
        raise RuntimeError(f"the sharded model lacks {len(missing)} tensors of the sampling copy (e.g. {missing[0]})")
    for name, tensor in own.items():
        tensor.copy_(full[name])


def check_sharding(sharded: bool, policy: Any, agent: str) -> None:
    """Start-up checks of an FSDP launch (a ConfigError says what to change)."""
    if not sharded:
        return
    from agents.common.config import ConfigError

    if agent not in SHARDED_AGENTS:
        raise ConfigError(f"{agent} does not train with sharded weights (FSDP is wired for "
                          f"{', '.join(SHARDED_AGENTS)}): launch with conf/accelerate/ddp_gpu8.yaml and LoRA")
    if policy.lora_r > 0:
        raise ConfigError(f"an FSDP launch is for full fine-tuning, but policy.lora_r={policy.lora_r}: set "
                          "policy.lora_r=0, or train the LoRA adapter data-parallel with conf/accelerate/ddp_gpu8.yaml")
