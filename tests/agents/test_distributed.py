"""Data-parallel training under `accelerate launch` (2 CPU processes, gloo): the update equals the single-process
update on the same data, one process logs and evaluates; bad launches fail at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.common.config import ConfigError
from agents.common.distributed import Ranks, check_processes, combine_stats, gather, setup, share
from agents.common.policy import PolicySettings, load_policy
from tests.kill import run_killed_after

ROOT = Path(__file__).resolve().parents[2]


def command(agent: str, run_dir: Path, processes: int, *overrides: str,
            config: str = "cpu2.yaml") -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a smoke run of ``agent`` in ``processes`` processes."""
    # On the CPU whatever the suite's device: two processes on one GPU is not a launch NCCL accepts (one GPU per
    # process), and the comparison is of the gloo CPU path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "DIALOGUE_GYM_DEVICE": "cpu"}
    args = ["-m", f"agents.{agent}", "+experiment=smoke", f"hydra.run.dir={run_dir}", "export=false", *overrides]
    if processes == 1:
        return [sys.executable, *args], env
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "conf" / "accelerate" / config), *args], env


def run(agent: str, run_dir: Path, processes: int, *overrides: str, config: str = "cpu2.yaml") -> str:
    cmd, env = command(agent, run_dir, processes, *overrides, config=config)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["refuel", "ppo"])
def test_two_processes_take_the_single_process_step(agent, tmp_path):
    """Same dialogues, same pairs, same step. Tolerances: each process runs the env's user and judge on half the
    batch, and batched fp32 forwards round differently for other batch shapes (rewards differ by ~1e-7, summed
    log-probs by ~1e-6), which moves the LoRA weights by ~1e-6 after two iterations."""
    log = run(agent, tmp_path / "two", 2, "dialogues=4")
    run(agent, tmp_path / "one", 1, "dialogues=4")
    assert "process 0 of 2" in log and "process 1 of 2" in log
    one, two = (load_file(str(tmp_path / d / "checkpoints" / "last" / "trainable.safetensors")) for d in ("one", "two"))
    assert set(one) == set(two) and len(one) > 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m2) == 2 and [sorted(r) for r in m1] == [sorted(r) for r in m2]  # one process logged, every key
    for r1, r2 in zip(m1, m2):
        assert all(r2[k] == r1[k] for k in r1 if k in ("env/pairs", "env/policy_samples", "env/mean_turns"))
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-2, abs=1e-5), k
    evals = json.loads((tmp_path / "two" / "eval.json").read_text())["evaluations"]
    assert len(evals) == 2  # evaluated once before and once after, by the main process only


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["refuel", "dpo"])
def test_two_sharded_processes_take_the_single_process_full_fine_tuning_step(agent, tmp_path):
    """FSDP (conf/accelerate/cpu2_fsdp.yaml): every weight of the tiny policy, split over 2 processes, ends where
    one process's full fine-tuning puts it after two iterations (tolerances as above), and the plain copy the
    policy samples with is what the checkpoint holds. DPO: online, with the frozen SFT reference beside."""
    full_ft = ("dialogues=4", "policy.lora_r=0")
    log = run(agent, tmp_path / "two", 2, *full_ft, config="cpu2_fsdp.yaml")
    run(agent, tmp_path / "one", 1, *full_ft)
    assert "process 1 of 2 (cpu, backend gloo, FSDP)" in log
    one, two = (load_file(str(tmp_path / d / "checkpoints" / "last" / "trainable.safetensors")) for d in ("one", "two"))
    assert set(one) == set(two) and any("layers.1.mlp" in k for k in one) and any("embed_tokens" in k for k in one)
    initial, _ = load_policy(PolicySettings(model="tiny", lora_r=0, device="cpu"), seed=0)  # where the runs ran
    moved = [k for k, p in initial.state_dict().items() if k in one and not torch.equal(p, one[k])]
    assert len(moved) == len(one)  # full fine-tuning moved every weight
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for r1, r2 in zip(m1, m2, strict=True):
        losses = [k for k in r1 if k.startswith("loss/") and k != "loss/grad_norm"]
        assert losses and all(r2[k] == pytest.approx(r1[k], rel=1e-3, abs=1e-6) for k in losses)


@pytest.mark.slow
def test_a_sharded_run_killed_after_an_iteration_resumes_to_the_uninterrupted_weights(tmp_path):
    """FSDP REFUEL (2 processes, full fine-tuning): SIGKILL every process right after the checkpoint of iteration 1
    is on disk, resume: the weights, the optimizer's shards, the metrics and the final evaluation equal an
    uninterrupted run's bit for bit. Exact, not within a tolerance: the resumed run repeats the same computations
    in the same order (same processes and shards, per-dialogue seeds, restored optimizer, scheduler and RNG
    states), so nothing rounds differently on the CPU."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    fsdp = ("dialogues=4", "policy.lora_r=0")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run("refuel", whole, 2, *fsdp, config="cpu2_fsdp.yaml")
    cmd, env = command("refuel", parts, 2, *fsdp, config="cpu2_fsdp.yaml")
    run_killed_after(cmd, parts, 1, env, ROOT)
    assert (parts / "checkpoints" / "last" / "sharded" / ".metadata").is_file()
    assert len(json.loads((parts / "eval.json").read_text())["evaluations"]) == 1  # the initial policy's
    log = run("refuel", parts, 2, *fsdp, "resume=true", config="cpu2_fsdp.yaml")
    assert log.count("at iteration 1") == 2  # both processes resumed from iteration 1's checkpoint
    got, want = (load_file(str(d / "checkpoints" / "last" / "trainable.safetensors")) for d in (parts, whole))
    assert set(got) == set(want) and any("layers.1.mlp" in k for k in got)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    shards = {}
    for d in (parts, whole):  # every process's model and optimizer shards, gathered into one file
        dcp_to_torch_save(d / "checkpoints" / "last" / "sharded", d / "full.pt")
        shards[d.name] = torch.load(d / "full.pt", weights_only=True)
    moments = [k for k, v in _flat(shards["whole"]).items() if "exp_avg_sq" in k]
    assert len(moments) == len(want)  # Adam's second moment of every weight
    flat_got, flat_want = _flat(shards["parts"]), _flat(shards["whole"])
    assert sorted(flat_got) == sorted(flat_want)
    assert [k for k in flat_want if not torch.equal(flat_got[k], flat_want[k])] == []
    assert metrics(parts) == metrics(whole)  # the row the killed run logged is not repeated
    final = [json.loads((d / "eval.json").read_text())["evaluations"][-1]["scores"] for d in (parts, whole)]
    assert final[0] == final[1]


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested state dict, keyed by their dotted path."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def test_sharded_launches_are_checked_at_start_up():
    from agents.common.policy import PolicySettings as P
    from agents.common.sharding import check_sharding

    check_sharding(False, P(lora_r=16), "PPO")  # not sharded: nothing to check
    check_sharding(True, P(lora_r=0), "REFUEL")
    check_sharding(True, P(lora_r=0), "DPO")
    check_sharding(True, P(lora_r=0, engine="vllm"), "REBEL")  # vLLM takes full weights from the plain copy
    for args, message in [((P(lora_r=0), "PPO"), "PPO does not train with sharded weights"),
                          ((P(lora_r=16), "REBEL"), "for full fine-tuning, but policy.lora_r=16")]:
        with pytest.raises(ConfigError, match=message):
            check_sharding(True, *args)


def test_one_process_is_the_identity():
    ranks = setup()
    assert ranks == Ranks() and ranks.main
    assert gather([1, 2], ranks) == [1, 2] and combine_stats({"env/pairs": 2.0}, ranks) == {"env/pairs": 2.0}
    assert share(6, Ranks(1, 3)) == slice(2, 4)


def test_an_fsdp_launch_of_one_process_joins_a_group_of_one(monkeypatch):
    """``torchrun --nproc_per_node 1`` with an FSDP config shards over a group of one (how FSDP is checked on a
    one-GPU machine); the same launch without FSDP, and a plain run with FSDP asked for, stay unlaunched."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launched = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DIALOGUE_GYM_DEVICE": "cpu"}
    for k, v in launched.items():
        monkeypatch.setenv(k, v)
    assert setup() == Ranks()  # launched, one process, no FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    try:
        assert setup() == Ranks(0, 1, None, True) and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for k in ("RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k)
    assert setup() == Ranks()  # FSDP asked for, but no launcher


def test_uneven_dialogues_and_sharding_launchers_fail_at_start_up(monkeypatch):
    with pytest.raises(ConfigError, match="dialogues=5 does not split evenly over the 2 launched processes"):
        check_processes(5, Ranks(0, 2))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="asks for DeepSpeed.*fsdp_gpu8.yaml"):
        setup()


def test_more_processes_than_gpus_is_refused_and_cpu_means_gloo(monkeypatch):
    import agents.common.distributed as d

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(d, "_on_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 GPU.*DIALOGUE_GYM_DEVICE=cpu"):
        setup()
    monkeypatch.undo()
    monkeypatch.setenv("DIALOGUE_GYM_DEVICE", "cpu")  # a CPU launch on a GPU machine: gloo, not NCCL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not d._on_cuda()


def test_a_vllm_policy_per_process_on_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="policy.engine=vllm with several processes on GPUs is not wired"):
        check_processes(4, Ranks(0, 2), "vllm")
    check_processes(4, Ranks(0, 1), "vllm")  # one process: fine
