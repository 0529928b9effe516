"""Checkpoints: an exact round trip of weights, optimizer, scheduler and RNG states (one process, and sharded over a
process group of one); saves are atomic (a half-written temporary checkpoint is ignored, a crash between the two
renames resumes from the previous checkpoint, a failed save leaves the last one); a tampered file is refused without
running its code; the non-tensor state is JSON; a checkpoint that does not fit the run is refused by name."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from agents.common.checkpoint import completed_iterations, last_checkpoint, load_checkpoint, save_checkpoint
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


# ---- atomicity ---------------------------------------------------------------------------------------------------

def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def test_a_half_written_temporary_checkpoint_is_ignored_on_resume_and_removed_by_the_next_save(tmp_path):
    model, optimizer, scheduler = _trained()
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 1})
    want = _weights(model)
    # what a job killed while writing iteration 2's checkpoint leaves: a temporary directory with some files
    partial = tmp_path / "checkpoints" / ".tmp-last-crashed"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\x00" * 100)
    (partial / "state.json").write_text('{"iteration": 2}')
    fresh, opt2, sched2 = _trained(seed=1)
    assert load_checkpoint(tmp_path, fresh, opt2, sched2) == {"iteration": 1}
    assert all(torch.equal(p, want[n]) for n, p in _weights(fresh).items())
    assert completed_iterations(tmp_path) == 1
    save_checkpoint(tmp_path, fresh, opt2, sched2, {"iteration": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]  # the leftover is gone


def test_a_crash_between_the_two_renames_resumes_from_the_previous_checkpoint(tmp_path):
    """A save moves ``last`` to ``.last-old`` and then the new checkpoint to ``last``; killed in between, only
    ``.last-old`` (complete) and the temporary directory are left."""
    model, optimizer, scheduler = _trained()
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 4})
    want = _weights(model)
    root = tmp_path / "checkpoints"
    (root / "last").rename(root / ".last-old")
    (root / ".tmp-last-unfinished").mkdir()
    assert last_checkpoint(tmp_path) == root / ".last-old" and completed_iterations(tmp_path) == 4
    fresh, opt2, sched2 = _trained(seed=1)
    assert load_checkpoint(tmp_path, fresh, opt2, sched2) == {"iteration": 4}
    assert all(torch.equal(p, want[n]) for n, p in _weights(fresh).items())
    save_checkpoint(tmp_path, fresh, opt2, sched2, {"iteration": 5})
    assert sorted(p.name for p in root.iterdir()) == ["last"] and completed_iterations(tmp_path) == 5


def test_a_leftover_old_checkpoint_does_not_block_the_next_save(tmp_path):
    """Killed while removing ``.last-old`` after a save: ``last`` is complete, ``.last-old`` half deleted. The next
    save must still replace ``last`` (renaming onto a non-empty directory fails)."""
    model, optimizer, scheduler = _trained()
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 1})
    (tmp_path / "checkpoints" / ".last-old").mkdir()
    (tmp_path / "checkpoints" / ".last-old" / "trainable.safetensors").write_bytes(b"partly deleted")
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 2})
    assert completed_iterations(tmp_path) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_directory(tmp_path):
    model, optimizer, scheduler = _trained()
    save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(tmp_path, model, optimizer, scheduler, {"iteration": 2, "bad": object()})
    assert completed_iterations(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]
    fresh, opt2, sched2 = _trained(seed=1)
    assert load_checkpoint(tmp_path, fresh, opt2, sched2) == {"iteration": 1}  # still resumable


# ---- sharded (FSDP) checkpoints, over a process group of one in this process --------------------------------------

@pytest.fixture
def group_of_one():
    """A gloo process group of one process (what FSDP and DCP need; two processes: tests/agents/test_distributed.py)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded(seed: int, steps: int):
    """A tiny full fine-tuned policy sharded with FSDP2: (plain copy, root, optimizer, scheduler) after ``steps``
    AdamW steps on a fixed batch."""
    from agents.common.sharding import refresh_copy, split_for_training

    model, _ = load_policy(PolicySettings(model="tiny", lora_r=0, device="cpu"), seed=seed)
    plain, trainer = split_for_training(model, True)
    optimizer, scheduler = make_optimizer(trainer, OptimSettings(lr=1e-2), total_steps=10)
    for _ in range(steps):
        _sharded_step(trainer, optimizer, scheduler)
    refresh_copy(plain, trainer)
    return plain, trainer, optimizer, scheduler


def _sharded_step(trainer, optimizer, scheduler) -> None:
    ids = torch.arange(3, 19).view(2, 8)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, 0] = 0  # the first token has no context
    trainer(ids, torch.ones_like(ids), loss_mask).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _full(trainer, optimizer) -> dict[str, torch.Tensor]:
    """The sharded model's and optimizer's full tensors, by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(trainer, optimizer, options=StateDictOptions(full_state_dict=True))
    out = {f"model.{k}": v for k, v in model_state.items()}
    for k, st in optim_state["state"].items():
        out.update({f"optimizer.{k}.{name}": v for name, v in st.items()})
    return {k: v.detach().clone() for k, v in out.items()}  # over one process the full tensors are the shards


def test_sharded_round_trip_restores_shards_optimizer_scheduler_rng_and_the_plain_copy(tmp_path, group_of_one):
    plain, trainer, optimizer, scheduler = _sharded(seed=0, steps=2)
    torch.manual_seed(7)
    np.random.seed(7)
    target = save_checkpoint(tmp_path, plain, optimizer, scheduler, {"iteration": 3}, trainer)
    want_rng = (torch.rand(3).tolist(), np.random.rand(2).tolist())
    assert (target / "sharded" / ".metadata").is_file() and (target / "processes" / "0.json").is_file()
    assert json.loads((target / "state.json").read_text()) == {"iteration": 3, "processes": 1}
    want, want_plain, want_lr = _full(trainer, optimizer), _weights(plain), scheduler.get_last_lr()
    assert len(want) > 3 * len(want_plain)  # weights, step, exp_avg and exp_avg_sq of every parameter

    plain2, trainer2, opt2, sched2 = _sharded(seed=1, steps=0)  # other weights, an optimizer without state
    torch.manual_seed(99)
    assert load_checkpoint(tmp_path, plain2, opt2, sched2, trainer2) == {"iteration": 3, "processes": 1}
    got = _full(trainer2, opt2)
    assert sorted(got) == sorted(want) and [k for k in want if not torch.equal(got[k], want[k])] == []
    assert all(torch.equal(p, want_plain[n]) for n, p in _weights(plain2).items())  # the copy that samples
    assert sched2.get_last_lr() == want_lr
    assert (torch.rand(3).tolist(), np.random.rand(2).tolist()) == want_rng
    for args in ((trainer, optimizer, scheduler), (trainer2, opt2, sched2)):  # the next step is the same step
        _sharded_step(*args)
    after, after2 = _full(trainer, optimizer), _full(trainer2, opt2)
    assert [k for k in after if not torch.equal(after[k], after2[k])] == []
    assert not torch.equal(after["model.lm.lm_head.weight"], want["model.lm.lm_head.weight"])  # it did step


def test_a_checkpoint_that_does_not_fit_the_launch_is_refused_by_name(tmp_path, group_of_one):
    plain, trainer, optimizer, scheduler = _sharded(seed=0, steps=1)
    save_checkpoint(tmp_path / "sharded", plain, optimizer, scheduler, {"iteration": 1}, trainer)
    single, opt1, sched1 = _trained()
    with pytest.raises(RuntimeError, match="holds sharded \\(FSDP\\) model and optimizer states: resume it with"):
        load_checkpoint(tmp_path / "sharded", single, opt1, sched1)
    save_checkpoint(tmp_path / "single", single, opt1, sched1, {"iteration": 1})
    with pytest.raises(RuntimeError, match="written without sharding .* resume it without the FSDP launch config"):
        load_checkpoint(tmp_path / "single", plain, optimizer, scheduler, trainer)
    state = tmp_path / "sharded" / "checkpoints" / "last" / "state.json"
    state.write_text(json.dumps({"iteration": 1, "processes": 8}))
    with pytest.raises(RuntimeError, match="written by 8 processes, this launch has 1: relaunch with num_processes=8"):
        load_checkpoint(tmp_path / "sharded", plain, optimizer, scheduler, trainer)
