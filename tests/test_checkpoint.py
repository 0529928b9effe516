"""Checkpoints: an exact round trip of weights, optimizer, scheduler and RNG states; a tampered file is refused
without running its code; the non-tensor state is JSON."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from agents.common.checkpoint import load_checkpoint, save_checkpoint
from agents.common.config import OptimSettings
from agents.common.policy import PolicySettings, load_policy, trainable_parameters
from agents.common.train import make_optimizer

TINY = PolicySettings(model="tiny", lora_r=4, lora_alpha=8)


def _trained(seed: int = 0):
    model, _ = load_policy(TINY, seed=seed)
    optimizer, scheduler = make_optimizer(model, OptimSettings(lr=1e-2), total_steps=10)
    device = next(model.parameters()).device
    ids = torch.arange(3, 19, device=device).view(2, 8)
    for _ in range(2):
        loss = model(input_ids=ids).logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _trained()
    np.random.seed(7)
    random.seed(7)
    torch.manual_seed(7)
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 3})
    want = (np.random.rand(3).tolist(), [random.random() for _ in range(3)], torch.rand(3).tolist())
    saved_weights = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    saved_opt = optimizer.state_dict()

    fresh, opt2, sched2 = _trained(seed=1)  # different weights and optimizer moments
    np.random.seed(99)
    random.seed(99)
    state = load_checkpoint(tmp_path, fresh, opt2, sched2)
    assert state == {"iteration": 3}
    for n, p in trainable_parameters(fresh).items():
        assert torch.equal(p.detach(), saved_weights[n]), n
    for k, st in opt2.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value.cpu(), saved_opt["state"][k][name].cpu()), (k, name)
    assert sched2.get_last_lr() == scheduler.get_last_lr()
    got = (np.random.rand(3).tolist(), [random.random() for _ in range(3)], torch.rand(3).tolist())
    assert got == want  # numpy, python and torch streams continue where they were saved


def test_training_state_loads_with_weights_only_and_rng_is_json(tmp_path):
    model, optimizer, scheduler = _trained()
    target = save_checkpoint(tmp_path, model, optimizer, scheduler, {})
    blob = torch.load(target / "training_state.pt", map_location="cpu", weights_only=True)
    assert set(blob) == {"optimizer", "scheduler", "torch_rng", "cuda_rng"}
    rng = json.loads((target / "rng.json").read_text())
    assert rng["numpy"]["kind"] == "MT19937" and len(rng["numpy"]["keys"]) == 624
    assert len(rng["python"]["internal"]) == 625


class _Payload:
    """Unpickling this object runs ``open(path, "w")``: what a tampered checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_tampered_training_state_is_refused_without_running_its_code(tmp_path):
    model, optimizer, scheduler = _trained()
    target = save_checkpoint(tmp_path / "run", model, optimizer, scheduler, {"iteration": 1})
    marker = tmp_path / "code-ran"
    blob = torch.load(target / "training_state.pt", weights_only=True)
    blob["scheduler"] = _Payload(str(marker))
    torch.save(blob, target / "training_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "run", model, optimizer, scheduler)
    assert not marker.exists()
