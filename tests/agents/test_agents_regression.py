"""REFUEL and REBEL: smoke runs in a subprocess, parameters change, resume equals an uninterrupted run,
bad configuration fails at start-up before any model loads, Hydra composition with every env config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents.common.config import ConfigError, merge_schema
from agents.common.logging import read_metrics
from agents.common.policy import PolicySettings, load_policy, trainable_parameters
from tests.kill import run_killed_after

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def agent_command(agent: str, run_dir: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", f"agents.{agent}", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    return cmd, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_agent(agent: str, run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd, env = agent_command(agent, run_dir, *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def strip_perf(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["refuel", "rebel"])
def test_smoke_run_trains_every_parameter_and_writes_outputs(agent, tmp_path):
    run_agent(agent, tmp_path)
    rows = read_metrics(tmp_path)
    assert len(rows) == 2  # two iterations
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and r["env/pairs"] >= 1
    saved = load_file(str(tmp_path / "checkpoints" / "last" / "trainable.safetensors"))
    fresh, _ = load_policy(PolicySettings(model="tiny", lora_r=4, lora_alpha=8), seed=0)
    initial = trainable_parameters(fresh)
    assert set(saved) == set(initial) and len(saved) > 0
    unchanged = [n for n, p in initial.items() if torch.equal(p.detach().cpu(), saved[n])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    evals = json.loads((tmp_path / "eval.json").read_text())["evaluations"]
    assert [e["policy"].split()[0] for e in evals] == ["initial", agent.upper()]
    assert len(evals[1]["win_rate"]) == 2 and all(0 <= w <= 1 for w in evals[1]["win_rate"])
    assert (tmp_path / "policy" / "config.json").is_file()  # exported, loadable as model=<path>
    assert (tmp_path / ".hydra" / "config.yaml").is_file()  # the resolved config
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def refuel_whole(tmp_path_factory):
    """One uninterrupted REFUEL smoke run (2 iterations), shared by the resume tests."""
    whole = tmp_path_factory.mktemp("refuel_whole")
    run_agent("refuel", whole, "export=false")
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["stop_after", "sigkill"])
def test_resume_equals_an_uninterrupted_run(interruption, refuel_whole, tmp_path):
    """Stopped by ``stop_after`` (files closed), or killed with SIGKILL right after iteration 1's checkpoint (no
    handler runs): the resumed run's metrics, final evaluation and weights equal the uninterrupted run's exactly."""
    whole, parts = refuel_whole, tmp_path / "parts"
    if interruption == "stop_after":
        run_agent("refuel", parts, "stop_after=1", "export=false")
    else:
        cmd, env = agent_command("refuel", parts, "export=false")
        run_killed_after(cmd, parts, 1, env, ROOT)
    assert len(read_metrics(parts)) >= 1
    run_agent("refuel", parts, "resume=true", "export=false")
    assert strip_perf(read_metrics(parts)) == strip_perf(read_metrics(whole))
    final = [json.loads((d / "eval.json").read_text())["evaluations"][-1]["scores"] for d in (whole, parts)]
    assert final[0] == final[1]
    got, want = (load_file(str(d / "checkpoints" / "last" / "trainable.safetensors")) for d in (parts, whole))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


class Reached(Exception):
    pass


def test_rebel_pairs_use_immediate_reward_and_refuel_the_future(monkeypatch):
    """REBEL ends each branch right after the turn-h reply; REFUEL completes it to H' >= h."""
    import numpy as np

    import agents.common.rollout as rollout

    seen = {}

    def fake_grow(rollin, branches, engine, params, plan):
        seen["horizons"] = [max(hp, h) if plan.complete else h for hp, h in zip(plan.horizons, plan.turns)]
        seen["turns"], seen["k"] = list(plan.turns), plan.k
        raise Reached

    class Venv:
        num_envs = 6
        max_turns = 5  # the env's public horizon

    monkeypatch.setattr(rollout, "grow", fake_grow)
    for future in (True, False):
        with pytest.raises(Reached):
            rollout.collect_pairs(Venv(), None, None, None, np.random.default_rng(0), 6, 10, "reference", future,
                                  "on_policy")
        assert seen["k"] == 2
        if future:
            assert all(H >= h for H, h in zip(seen["horizons"], seen["turns"]))
            assert any(H > h for H, h in zip(seen["horizons"], seen["turns"]))
        else:
            assert seen["horizons"] == seen["turns"]


# ---- bad configuration: clear, and before any model loads -----------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import agents.refuel.__main__ as refuel_main

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the configuration was validated")

    monkeypatch.setattr(refuel_main, "load_policy", forbidden)
    monkeypatch.setattr("dialogue_gym.models.load_model", forbidden)


def _cfg(*overrides: str, name: str = "refuel"):
    from agents.rebel.config import RebelConfig
    from agents.refuel.config import RefuelConfig

    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose(config_name=name, overrides=list(overrides))
    return merge_schema(raw, RebelConfig if name == "rebel" else RefuelConfig)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["eta=0"], "eta must be > 0"),
        (["eta=-1"], "eta must be > 0"),
        (["env.max_turns=0"], "env.max_turns must be a positive integer"),
        (["iterations=0"], "iterations must be >= 1"),
        (["turn_sampling=last"], "turn_sampling is 'last'"),
        (["env.task=chess"], "env.task is 'chess'"),
        (["+env=ultrainteract"], "UltraInteract"),
        (["sampling.temperature=0"], "sampling.temperature must be > 0"),
        (["eval.dialogues=100000"], "eval.dialogues is 100000 but the test split"),
        (["eval.split=train"], "eval.split must be one of ['test', 'validation'], got 'train'"),
        (["env.task=embedded", "eval.split=validation"], "task 'embedded' has no validation rows; use eval.split=test"),
        (["env.task=arithmetic", "eval.split=validation", "eval.dialogues=101"],
         "eval.dialogues is 101 but the validation split of task 'arithmetic' has 100 rows"),
        (["policy.dtype=int8"], "policy.dtype: dtype is 'int8'; allowed: auto"),
        (["env.dtype=fp8"], "env.dtype is 'fp8'"),
        (["policy.device=gpu0"], "policy.device: device is 'gpu0'; allowed"),
        pytest.param(["policy.device=cuda"], "policy.device: device is 'cuda' but this machine has no usable CUDA",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")),
        pytest.param(["env.device=cuda:0"], "env.device is 'cuda:0' but this machine has no usable CUDA",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")),
    ],
)
def test_bad_configuration_fails_before_any_model_loads(overrides, fragment, no_model_loads, tmp_path):
    from agents.refuel.__main__ import run

    cfg = _cfg(*overrides)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert fragment in str(e.value)


def test_rebel_bad_prefix(no_model_loads, tmp_path):
    from agents.rebel.__main__ import run

    cfg = _cfg("prefix=imagined", name="rebel")
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="prefix is 'imagined'"):
        run(cfg)


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match="etaa"):
        _cfg("+etaa=1")
    with pytest.raises(ConfigError, match="iterations"):
        _cfg("iterations=many")


def test_unknown_env_config_is_a_clear_hydra_error(tmp_path):
    proc = run_agent("refuel", tmp_path, "+env=nonexistent", check=False)
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr and "env" in proc.stderr


@pytest.mark.parametrize("agent", ["refuel", "rebel"])
@pytest.mark.parametrize("env_name", ["embedded", "arithmetic", "ultrainteract", "anthropic_hh"])
def test_every_env_config_composes_with_the_agent(agent, env_name):
    cfg = _cfg(f"+env={env_name}", name=agent)
    assert cfg.env.task == env_name
    assert cfg.policy.model == "embedded"


def test_paper_preset_composes_and_validates():
    from agents.refuel.config import validate

    cfg = _cfg("+env=ultrainteract", "+experiment=refuel_paper")
    validate(cfg)
    assert cfg.policy.model == "meta-llama/Meta-Llama-3-8B-Instruct" and cfg.policy.lora_r == 0
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.eta, cfg.env.engine) == (3e-7, 128, 1000.0, "vllm")
    assert cfg.dialogues % cfg.rollout_batch == 0
