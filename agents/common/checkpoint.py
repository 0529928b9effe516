"""Checkpoints for resuming a run: weights (adapter or full), optimizer, scheduler, RNG states, counters.

Atomic. A checkpoint is written to a temporary directory ``checkpoints/.tmp-last-*`` and renamed into place, so an
interrupted save (a killed job, a full disk) never leaves a broken checkpoint: ``checkpoints/last`` exists only
complete. Replacing it takes two renames (``last`` -> ``.last-old``, then the new one -> ``last``); a crash between
them leaves the previous checkpoint complete as ``.last-old``, which :func:`last_checkpoint` then returns. A
temporary directory is never read, and the next save removes any a crash left behind. Files are flushed to disk
(fsync) before the rename, so the rename never publishes data still in the page cache.

Layout of ``checkpoints/last``: ``trainable.safetensors`` (the trained tensors, full: what evaluation and export
read), ``training_state.pt`` (the optimizer's and scheduler's state dicts and the torch RNG states: tensors and
plain numbers only, loaded with ``torch.load(weights_only=True)``, which refuses to run code a tampered file
carries), ``rng.json`` (the numpy and Python RNG states) and ``state.json`` (the run's counters). Tensors load on
the CPU and are copied to the device of the parameters they belong to, so a checkpoint written on a GPU resumes on
a CPU and vice versa.

Sharded runs (FSDP full fine-tuning, agents/common/sharding.py) add ``sharded/``: the model and optimizer shards of
every process, written by all processes at once with ``torch.distributed.checkpoint`` (DCP; the state dicts of
``get_state_dict``, restored with ``set_state_dict``), and ``processes/<rank>.json``: each process's RNG states.
``training_state.pt`` then holds ``"optimizer": "sharded"`` and ``state.json`` the number of processes, which a
resumed launch must match (each process draws its share of an iteration from its rank). The directory must be on a
file system every process sees (the run directory of the main process is everyone's). ``trainable.safetensors``
still holds the full weights (the main process's plain copy), so evaluation and export read every checkpoint alike.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from agents.common.policy import trainable_parameters

SHARDED = "sharded"  # training_state.pt's "optimizer" of a sharded checkpoint: the state is in sharded/ (DCP)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint to resume ``run_dir`` from: ``checkpoints/last``, or ``checkpoints/.last-old`` when
    a crash came between the two renames of a save (see the module docstring); None when there is none. Temporary
    directories (``.tmp-last-*``, perhaps half written) are never returned."""
    root = Path(run_dir) / "checkpoints"
    for name in ("last", ".last-old"):
        if (root / name / "state.json").is_file():
            return root / name
    return None


def save_checkpoint(run_dir: str | Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    trainer: Any = None) -> Path:
    """Save everything needed to resume at ``<run_dir>/checkpoints/last`` (atomically).

    Args:
        model: the model whose trainable tensors go to ``trainable.safetensors`` (a sharded run: its plain copy).
        optimizer: the optimizer of the trainable parameters (of ``trainer`` when sharded).
        state: JSON-able counters (iteration, rollout cursor, budgets, ...).
        trainer: a sharded run's FSDP root (:func:`agents.common.sharding.split_for_training`): then every process
            must call this (the shards are written collectively); None (one process, or the main process of a
            data-parallel launch): only the caller writes.

    Returns:
        The path of the checkpoint (``checkpoints/last``).
    """
    from agents.common.sharding import is_sharded

    sharded = trainer is not None and is_sharded(trainer)
    rank, world = _rank_world() if sharded else (0, 1)
    root = Path(run_dir) / "checkpoints"
    target = root / "last"
    tmp: Path | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-last-*"):  # what a crash during an earlier save left behind
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-last-", dir=root))
        if sharded:
            tmp = Path(_broadcast(str(tmp) if tmp else None))
            _save_shards(tmp, trainer, optimizer, rank)
        if rank == 0:
            _save_main(tmp, model, SHARDED if sharded else optimizer, scheduler,
                       {**state, "processes": world} if sharded else state)
        if sharded:
            _barrier()  # every process's files are written
        if rank == 0:
            _fsync_tree(tmp)
            old = root / ".last-old"
            if target.exists():  # complete (only renames make it): the previous checkpoint, kept as .last-old
                shutil.rmtree(old, ignore_errors=True)  # a leftover of an interrupted clean-up
                os.replace(target, old)
            os.replace(tmp, target)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        if sharded:
            _barrier()  # no process goes on before the checkpoint is in place
    except BaseException:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_main(tmp: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """The main process's files: full trainable tensors, optimizer (or the ``"sharded"`` marker), scheduler, RNG,
    counters (``state.json`` last)."""
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()}
    save_file(weights, str(tmp / "trainable.safetensors"))
    optim_state = optimizer if isinstance(optimizer, str) else optimizer.state_dict()
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict() if scheduler else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "training_state.pt")
    (tmp / "rng.json").write_text(json.dumps(host_rng_state()))
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def _save_shards(tmp: Path, trainer: Any, optimizer: Any, rank: int) -> None:
    """Every process: its model and optimizer shards into ``sharded/`` (DCP, collective) and its RNG states into
    ``processes/<rank>.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainer, optimizer)  # this process's shards (DTensors)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / "sharded")
    (tmp / "processes").mkdir(exist_ok=True)
    (tmp / "processes" / f"{rank}.json").write_text(json.dumps(process_rng_state()))


def load_checkpoint(run_dir: str | Path, model: Any, optimizer: Any, scheduler: Any,
                    trainer: Any = None) -> dict[str, Any] | None:
    """Restore the last complete checkpoint of ``run_dir`` in place (:func:`last_checkpoint`).

    Args:
        model: the model whose trainable tensors are restored (a sharded run: its plain copy, refreshed from the
            restored shards).
        optimizer: the optimizer of the trainable parameters (of ``trainer`` when sharded).
        trainer: a sharded run's FSDP root: then every process must call this (the shards load collectively).

    Returns:
        The checkpoint's counters (``state.json``), or None when there is no checkpoint.

    Raises:
        RuntimeError: the checkpoint does not fit the run (other model or LoRA setting, sharded vs not, another
            number of processes); nothing is restored then.
    """
    from agents.common.sharding import is_sharded

    sharded = trainer is not None and is_sharded(trainer)
    target = last_checkpoint(run_dir)
    if sharded:  # every process resumes from the checkpoint the main process sees
        target = _broadcast(target)
    if target is None:
        return None
    state = json.loads((target / "state.json").read_text())
    # weights_only: tensors and plain containers only; a pickled object in a tampered file is refused, not run.
    blob = torch.load(target / "training_state.pt", map_location="cpu", weights_only=True)
    if sharded:
        if blob["optimizer"] != SHARDED:
            raise RuntimeError(f"checkpoint {target} was written without sharding (one process or LoRA "
                               "data-parallel): resume it without the FSDP launch config")
        world = _rank_world()[1]
        if state.get("processes") != world:
            raise RuntimeError(f"checkpoint {target} was written by {state.get('processes')} processes, this launch "
                               f"has {world}: relaunch with num_processes={state.get('processes')} (each process "
                               "plays its share of an iteration by rank)")
        _load_shards(target, trainer, optimizer)
        from agents.common.sharding import load_full_weights

        load_full_weights(model, trainer)  # the plain copy that samples, evaluates and exports
    else:
        if blob["optimizer"] is None:
            raise RuntimeError(f"checkpoint {target} holds no optimizer state (an FSDP run before sharded "
                               "checkpoints existed): it cannot be resumed")
        if blob["optimizer"] == SHARDED:
            raise RuntimeError(f"checkpoint {target} holds sharded (FSDP) model and optimizer states: resume it "
                               f"with the FSDP launch config it was written with ({state.get('processes')} processes, "
                               "e.g. conf/accelerate/fsdp_gpu8.yaml)")
        _load_weights(target, model)
        optimizer.load_state_dict(blob["optimizer"])  # moves each state tensor to its parameter's device
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if sharded:
        set_process_rng_state(json.loads((target / "processes" / f"{_rank_world()[0]}.json").read_text()))
    else:
        torch.set_rng_state(blob["torch_rng"])
        cuda_states = blob.get("cuda_rng") or []
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        set_host_rng_state(json.loads((target / "rng.json").read_text()))
    return state


def _load_weights(target: Path, model: Any) -> None:
    weights = load_file(str(target / "trainable.safetensors"))
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {target} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                           "was it written by a run with a different model or LoRA setting?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])  # safetensors loads on the CPU; copy_ moves to the parameter's device


def _load_shards(target: Path, trainer: Any, optimizer: Any) -> None:
    """Every process: its model and optimizer shards from ``sharded/`` (DCP reads into the state dicts'
    DTensors in place; ``set_state_dict`` puts them into the model and the optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The optimizer has no state before its first step: get_state_dict gives it one (a zero-gradient step at
    # learning rate 0, which moves no weight), so that DCP knows every tensor to read.
    model_state, optim_state = get_state_dict(trainer, optimizer)
    shards = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(shards, checkpoint_id=target / "sharded")
    except Exception as e:  # DCP names the missing keys; say what it means
        raise RuntimeError(f"checkpoint {target} does not fit this run's sharded model and optimizer (was it written "
                           f"by a run with another model?): {e}") from e
    set_state_dict(trainer, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])


# ---- RNG states -------------------------------------------------------------------------------------------------

def host_rng_state() -> dict[str, Any]:
    """numpy's global and Python's ``random`` states as JSON-able data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}


def set_host_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`host_rng_state` returned."""
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def process_rng_state() -> dict[str, Any]:
    """This process's host, torch CPU and CUDA RNG states as JSON-able data (the RNG byte states as lists)."""
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {**host_rng_state(), "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_process_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`process_rng_state` returned (CUDA states only where the device count matches)."""
    set_host_rng_state(state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# ---- helpers of the sharded save -------------------------------------------------------------------------------

def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _broadcast(value: Any) -> Any:
    """The main process's ``value`` on every process."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directories) to disk."""
    for d, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- a run's policy from its last checkpoint (what the leaderboard evaluates after a budget stop) -------------

def completed_iterations(run_dir: str | Path) -> int:
    """Whole iterations a run finished, from its last complete checkpoint (0 when it has none)."""
    target = last_checkpoint(run_dir)
    return int(json.loads((target / "state.json").read_text()).get("iteration", 0)) if target else 0


def export_checkpoint_policy(run_dir: str | Path, settings: Any, seed: int) -> Path:
    """Rebuild the policy of ``run_dir``'s last checkpoint and export it to ``<run_dir>/policy`` (LoRA merged).

    The policy is built from ``settings`` (a :class:`~agents.common.policy.PolicySettings`) as the run built it;
    with no checkpoint yet it is the initial policy. A checkpoint keeps the trainable tensors under the policy's own
    parameter names, or under ``policy.<name>`` where an agent trains the policy inside a larger module (PPO's
    policy beside its value head); other tensors (the value head) are not the policy's and are left out.
    """
    from agents.common.policy import export_policy, load_policy

    model, tokenizer = load_policy(settings, seed=seed)
    target = last_checkpoint(run_dir)
    if target is not None:
        path = target / "trainable.safetensors"
        saved = load_file(str(path))
        with torch.no_grad():
            for n, p in trainable_parameters(model).items():
                tensor = saved.get(n, saved.get(f"policy.{n}"))
                if tensor is None:
                    raise RuntimeError(f"{path} has no tensor {n!r} (nor 'policy.{n}'); cannot rebuild the policy")
                p.copy_(tensor.to(p.device, p.dtype))
    return export_policy(model, tokenizer, Path(run_dir) / "policy")
