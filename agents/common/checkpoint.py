"""Checkpoints for resuming a run: weights (adapter or full), optimizer, scheduler, RNG states, counters.

Written to a temporary directory and renamed into place, so an interrupted save never leaves a broken
checkpoint: ``<run>/checkpoints/last`` is always complete.

Layout of ``checkpoints/last``: ``trainable.safetensors`` (the trained tensors), ``training_state.pt`` (the
optimizer's and scheduler's state dicts and the torch RNG states: tensors and plain numbers only, loaded with
``torch.load(weights_only=True)``, which refuses to run code a tampered file carries), ``rng.json`` (the numpy
and Python RNG states) and ``state.json`` (the run's counters). Tensors load on the CPU and are copied to the
device of the parameters they belong to, so a checkpoint written on a GPU resumes on a CPU and vice versa.
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


def save_checkpoint(run_dir: str | Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> Path:
    """Save everything needed to resume at ``<run_dir>/checkpoints/last`` (atomically).

    Args:
        optimizer: None for a run whose optimizer state cannot be saved here (FSDP: sharded); such a checkpoint
            holds the weights but cannot be resumed.
        state: JSON-able counters (iteration, rollout cursor, budgets, ...).
    """
    target = Path(run_dir) / "checkpoints" / "last"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".last-", dir=target.parent))
    try:
        weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        optim_state = optimizer.state_dict() if optimizer is not None else None
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict() if scheduler else None,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "training_state.pt")
        (tmp / "rng.json").write_text(json.dumps(host_rng_state()))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        old = target.with_name(".last-old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(run_dir: str | Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """Restore the last checkpoint of ``run_dir`` in place; returns its counters, or None when there is none."""
    target = Path(run_dir) / "checkpoints" / "last"
    if not (target / "state.json").is_file():
        return None
    weights = load_file(str(target / "trainable.safetensors"))
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {target} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                           "was it written by a run with a different model or LoRA setting?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])  # safetensors loads on the CPU; copy_ moves to the parameter's device
    # weights_only: tensors and plain containers only; a pickled object in a tampered file is refused, not run.
    blob = torch.load(target / "training_state.pt", map_location="cpu", weights_only=True)
    if blob["optimizer"] is None:
        raise RuntimeError(f"checkpoint {target} holds no optimizer state (an FSDP run does not save its sharded "
                           "state): it cannot be resumed")
    optimizer.load_state_dict(blob["optimizer"])  # moves each state tensor to its parameter's device
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    cuda_states = blob.get("cuda_rng") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    set_host_rng_state(json.loads((target / "rng.json").read_text()))
    return json.loads((target / "state.json").read_text())


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
# ---- a run's policy from its last checkpoint (what the leaderboard evaluates after a budget stop) -------------

def completed_iterations(run_dir: str | Path) -> int:
    """Whole iterations a run finished, from its last checkpoint (0 when it has none)."""
    path = Path(run_dir) / "checkpoints" / "last" / "state.json"
    return int(json.loads(path.read_text()).get("iteration", 0)) if path.is_file() else 0


def export_checkpoint_policy(run_dir: str | Path, settings: Any, seed: int) -> Path:
    """Rebuild the policy of ``run_dir``'s last checkpoint and export it to ``<run_dir>/policy`` (LoRA merged).

    The policy is built from ``settings`` (a :class:`~agents.common.policy.PolicySettings`) as the run built it;
    with no checkpoint yet it is the initial policy. A checkpoint keeps the trainable tensors under the policy's own
    parameter names, or under ``policy.<name>`` where an agent trains the policy inside a larger module (PPO's
    policy beside its value head); other tensors (the value head) are not the policy's and are left out.
    """
    from agents.common.policy import export_policy, load_policy

    model, tokenizer = load_policy(settings, seed=seed)
    path = Path(run_dir) / "checkpoints" / "last" / "trainable.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        with torch.no_grad():
            for n, p in trainable_parameters(model).items():
                tensor = saved.get(n, saved.get(f"policy.{n}"))
                if tensor is None:
                    raise RuntimeError(f"{path} has no tensor {n!r} (nor 'policy.{n}'); cannot rebuild the policy")
                p.copy_(tensor.to(p.device, p.dtype))
    return export_policy(model, tokenizer, Path(run_dir) / "policy")
