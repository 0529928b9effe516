"""Checkpoints for resuming a run: weights (adapter or full), optimizer, scheduler, RNG states, counters.

Written to a temporary directory and renamed into place, so an interrupted save never leaves a broken
checkpoint: ``<run>/checkpoints/last`` is always complete.
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
        state: JSON-able counters (iteration, rollout cursor, budgets, ...).
    """
    target = Path(run_dir) / "checkpoints" / "last"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".last-", dir=target.parent))
    try:
        weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                    "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate()}, tmp / "training_state.pt")
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
            p.copy_(weights[n])
    blob = torch.load(target / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    np.random.set_state(blob["numpy_rng"])
    random.setstate(blob["python_rng"])
    return json.loads((target / "state.json").read_text())


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
