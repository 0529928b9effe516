"""PPO agent: one forward gives log-probs and values at the right positions, an update moves every trainable
parameter (shared and separate critic), bad configuration fails before any model loads, and end-to-end smoke
runs in a subprocess (finite losses, parameters changed, eval.json, resume equals an uninterrupted run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents.common.batching import Reply, collate_on
from agents.common.config import ConfigError, merge_schema
from agents.common.logging import read_metrics
from agents.common.logprobs import decoder_hidden_states, token_logprobs
from agents.common.policy import PolicySettings, load_policy, trainable_parameters
from agents.ppo.__main__ import (
    Turn,
    assign_advantages,
    build_agent,
    policy_and_values,
    ppo_update,
    score_turns,
)
from agents.ppo.config import PpoConfig
from tests.kill import run_killed_after

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
TINY = PolicySettings(model="tiny", lora_r=4, lora_alpha=8)


def _cfg(*overrides: str) -> PpoConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose(config_name="ppo", overrides=list(overrides))
    return merge_schema(raw, PpoConfig)


def _turns(n_dialogues: int = 2, seed: int = 0) -> list[Turn]:
    """Synthetic two-turn dialogues: random prompt and reply ids, a score on each turn."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n_dialogues):
        for k in range(2):
            prompt = [int(x) for x in rng.integers(5, 500, size=6 + 4 * k)]
            reply = [int(x) for x in rng.integers(5, 500, size=3 + k)]
            out.append(Turn(Reply(prompt, reply, "r"), d, float(rng.normal())))
    return out


def test_one_forward_gives_token_logprobs_and_values_read_one_position_earlier():
    model, _ = load_policy(TINY, seed=0)
    cfg = PpoConfig(policy=TINY)
    agent = build_agent(cfg, model)
    with torch.no_grad():
        agent["value_head"].weight.normal_()  # a non-zero head, so positions matter
        agent["value_head"].bias.fill_(0.5)
        ids, attention, mask = collate_on([t.reply for t in _turns()[:3]], 0, 256, next(model.parameters()).device)
        logp, values = policy_and_values(agent, ids, attention, mask, temperature=0.8)
        assert torch.allclose(logp, token_logprobs(model, ids, attention, mask, 0.8), atol=1e-6)
        hidden = decoder_hidden_states(model, ids, attention)
        head = agent["value_head"](hidden.float()).squeeze(-1)  # (B, T)
        rows, cols = mask.nonzero(as_tuple=True)
        assert torch.allclose(values[rows, cols], head[rows, cols - 1], atol=1e-6)  # V(state before token t)
        assert bool((values[mask == 0] == 0).all())


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_update_moves_every_trainable_parameter(critic):
    torch.manual_seed(0)
    model, _ = load_policy(TINY, seed=0)
    cfg = PpoConfig(policy=TINY, critic=critic)
    cfg.optim.batch_size, cfg.optim.micro_batch_size, cfg.optim.epochs, cfg.optim.lr = 1, 2, 2, 1e-3
    agent = build_agent(cfg, model)
    assert ("critic" in agent) == (critic == "separate")
    before = {n: p.detach().clone() for n, p in trainable_parameters(agent).items()}
    turns = _turns()
    score_turns(agent, None, turns, pad=0, temperature=cfg.sampling.temperature, max_length=256, micro_batch_size=2)
    # at the start the policy is the reference: no KL
    assert all(torch.allclose(t.logp, t.ref, atol=1e-5) for t in turns)
    assert all(bool((t.value == 0).all()) for t in turns)  # the value head starts at 0
    assign_advantages(turns, 2, kl_coef=0.05, gamma=1.0, lam=0.95, whiten=True)
    from agents.common.train import make_optimizer

    optimizer, scheduler = make_optimizer(agent, cfg.optim, total_steps=4)
    history = ppo_update(agent, optimizer, scheduler, turns, 2, cfg, 0, np.random.default_rng(0))
    assert len(history) == 4  # 2 epochs x 2 minibatches of one dialogue
    assert all(math.isfinite(h["loss/loss"]) for h in history)
    assert history[0]["loss/approx_kl"] == pytest.approx(0.0, abs=1e-6)  # first step: π_θ = π_old
    unchanged = [n for n, p in trainable_parameters(agent).items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"


# ---- bad configuration: clear, and before any model loads -----------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import agents.ppo.__main__ as ppo_main

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the configuration was validated")

    monkeypatch.setattr(ppo_main, "load_policy", forbidden)
    monkeypatch.setattr("dialogue_gym.models.load_model", forbidden)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["critic=twin"], "critic is 'twin'; allowed: shared, separate"),
        (["critic_model=tiny"], "critic_model='tiny' needs critic=separate"),
        (["gamma=1.5"], "gamma must be in [0, 1]"),
        (["lam=-0.1"], "lam must be in [0, 1]"),
        (["clip=0"], "clip must be > 0"),
        (["vf_clip=0"], "vf_clip must be > 0 or null"),
        (["vf_coef=0"], "vf_coef must be > 0"),
        (["kl_coef=-1"], "kl_coef must be >= 0"),
        (["kl_target=0"], "kl_target must be > 0 or null"),
        (["dialogues=0"], "dialogues must be >= 1"),
        (["rollout_batch=5"], "rollout_batch must be 0 or divide dialogues (16)"),
        (["env.reward_mode=sparse"], "env.reward_mode is 'sparse'"),
        (["optim.epochs=0"], "optim.epochs must be >= 1"),
        (["eval.dialogues=100000"], "eval.dialogues is 100000 but the test split"),
    ],
)
def test_bad_configuration_fails_before_any_model_loads(overrides, fragment, no_model_loads, tmp_path):
    from agents.ppo.__main__ import run

    cfg = _cfg(*overrides)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert fragment in str(e.value)


def test_config_composes_with_smoke_and_every_env():
    assert _cfg("+experiment=smoke").policy.model == "tiny"
    assert _cfg("vf_clip=null", "kl_target=6.0").vf_clip is None
    for env_name in ("embedded", "arithmetic", "ultrainteract", "anthropic_hh"):
        assert _cfg(f"+env={env_name}").env.task == env_name


# ---- end to end, in a subprocess ------------------------------------------------------------------------------


def agent_command(run_dir: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "agents.ppo", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    return cmd, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_agent(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd, env = agent_command(run_dir, *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def strip_perf(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke run (2 iterations), shared by the smoke and resume tests."""
    run_dir = tmp_path_factory.mktemp("ppo_whole")
    run_agent(run_dir)
    return run_dir


@pytest.mark.slow
def test_smoke_run_trains_every_parameter_and_writes_outputs(smoke_run):
    rows = read_metrics(smoke_run)
    assert len(rows) == 2
    for r in rows:
        for k in ("loss/loss", "loss/policy_loss", "loss/value_loss", "loss/approx_kl", "loss/clip_fraction",
                  "policy/entropy", "policy/kl_ref", "env/mean_return"):
            assert math.isfinite(r[k]), k
        assert "loss/explained_variance" in r
    saved = load_file(str(smoke_run / "checkpoints" / "last" / "trainable.safetensors"))
    fresh, _ = load_policy(TINY, seed=0)
    initial = {f"policy.{n}": p for n, p in trainable_parameters(fresh).items()}
    assert set(saved) == set(initial) | {"value_head.weight", "value_head.bias"}
    unchanged = [n for n, p in initial.items() if torch.equal(p.detach().cpu(), saved[n])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    assert bool((saved["value_head.weight"] != 0).any()) and bool((saved["value_head.bias"] != 0).all())
    evals = json.loads((smoke_run / "eval.json").read_text())["evaluations"]
    assert [e["policy"].split()[0] for e in evals] == ["initial", "PPO"]
    assert len(evals[1]["win_rate"]) == 2 and all(0 <= w <= 1 for w in evals[1]["win_rate"])
    assert (smoke_run / "policy" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["stop_after", "sigkill"])
def test_resume_equals_an_uninterrupted_run(interruption, smoke_run, tmp_path):
    """Stopped by ``stop_after``, or killed with SIGKILL right after iteration 1's checkpoint (tests/kill.py)."""
    if interruption == "stop_after":
        run_agent(tmp_path, "stop_after=1", "export=false")
        assert len(read_metrics(tmp_path)) == 1
    else:
        cmd, env = agent_command(tmp_path, "export=false")
        run_killed_after(cmd, tmp_path, 1, env, ROOT)
    run_agent(tmp_path, "resume=true", "export=false")
    assert strip_perf(read_metrics(tmp_path)) == strip_perf(read_metrics(smoke_run))
    final = [json.loads((d / "eval.json").read_text())["evaluations"][-1]["scores"] for d in (smoke_run, tmp_path)]
    assert final[0] == final[1]
