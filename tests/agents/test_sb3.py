"""Stable-Baselines3 on the wrappers: PPO with the tiny LM as its policy (token level), and the agents.sb3 entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
from stable_baselines3 import PPO  # noqa: E402

from agents.sb3.policy import LMActorCriticPolicy  # noqa: E402
from dialogue_gym.models import load_model  # noqa: E402
from dialogue_gym.wrappers import TokenLevel, make_dialogue_vec  # noqa: E402
from dialogue_gym.wrappers.sb3 import DialogueSB3VecEnv  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARITH = dict(task="arithmetic", user="critic", reward="verifier", max_turns=2)


def test_ppo_with_the_tiny_lm_policy_runs_and_changes_every_parameter():
    lm, tokenizer = load_model("tiny", shared=False, dtype="float32")  # fp32: logits compared to 1e-4
    batched = TokenLevel(make_dialogue_vec(2, **ARITH), tokenizer, window=48, max_reply_tokens=3)
    venv = DialogueSB3VecEnv(batched, seed=0)
    torch.manual_seed(0)
    model = PPO(LMActorCriticPolicy, venv, policy_kwargs={"lm": lm}, n_steps=8, batch_size=8, n_epochs=1,
                learning_rate=1e-3, seed=0, device="cpu")
    assert model.policy.action_net.head is lm.get_output_embeddings()  # the actor's logits are the LM's head
    before = {k: v.detach().clone() for k, v in lm.named_parameters()}
    obs = venv.reset()
    with torch.no_grad():  # the policy's logits at reset are the LM's next-token logits at the window's end
        t = torch.as_tensor(obs["tokens"][:1])
        n = int(obs["length"][0, 0])
        want = lm(input_ids=t[:, :n]).logits[0, -1]
        dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0])
        got = dist.distribution.logits[0]
        torch.testing.assert_close(got, torch.log_softmax(want, -1), atol=1e-4, rtol=1e-4)
    model.learn(total_timesteps=16)
    assert model.num_timesteps == 16
    changed = [k for k, v in lm.named_parameters() if not torch.equal(v, before[k])]
    assert changed == list(before), f"unchanged: {sorted(set(before) - set(changed))}"
    assert batched.venv.core.user_calls >= 1  # turns ended (the cap is 3 tokens) and the user answered


# ---- the agents.sb3 entry ----------------------------------------------------------------------------------


def test_compare_reports_solved_shares_and_paired_differences():
    from agents.sb3.__main__ import compare, format_comparison

    trained = {"returns": np.array([1.0, 1.0, 0.0, -1.0]), "turns": np.array([1, 2, 2, 1])}
    baseline = {"returns": np.array([0.0, 1.0, 0.0, 0.0]), "turns": np.array([2, 1, 2, 2])}
    out = compare(trained, baseline, threshold=1.0, n_boot=500)
    assert out["trained"]["solved"] == 0.5 and out["baseline"]["solved"] == 0.25
    assert out["trained"]["return"] == pytest.approx(0.25) and out["baseline"]["return"] == pytest.approx(0.25)
    assert out["solved_difference"] == pytest.approx(0.25)  # rows: +1, 0, 0, 0
    assert out["return_difference"] == pytest.approx(0.0)  # rows: +1, 0, 0, -1
    lo, hi = out["solved_difference_ci"]
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0
    assert out["trained"]["turns"] == 1.5
    table = format_comparison(out, "trained", "candidate 0")
    assert "| candidate 0 | 0.250 [" in table and "| difference (paired) | +0.250 [" in table


@pytest.mark.parametrize("override, message", [
    (["algo=sac"], "algo is 'sac'; allowed: ppo, a2c, dqn"),
    (["wrapper=words"], "wrapper is 'words'; allowed: choice, token"),
    (["algo=dqn", "wrapper=token"], "algo=dqn needs wrapper=choice"),
    (["choice.k=1"], "choice.k must be >= 2"),
    (["num_envs=0"], "num_envs must be >= 1"),
    (["eval.dialogues=5000", "+env=arithmetic"], "eval.dialogues is 5000 but the test split"),
])
def test_bad_config_is_a_config_error_before_models_load(override, message, tmp_path):
    from hydra import compose, initialize_config_dir

    from agents.common.config import ConfigError, merge_schema
    from agents.sb3.__main__ import run
    from agents.sb3.config import Sb3Config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        raw = compose(config_name="sb3", overrides=override)
    cfg = merge_schema(raw, Sb3Config)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(cfg)
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algo, wrapper", [("ppo", "choice"), ("dqn", "choice"), ("a2c", "token")])
def test_sb3_agent_smoke_run(algo, wrapper, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIALOGUE_GYM_PROGRESS": "log"}
    proc = subprocess.run([sys.executable, "-m", "agents.sb3", "+experiment=sb3_smoke", "+env=arithmetic",
                           f"algo={algo}", f"wrapper={wrapper}", f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["dialogues"] == 4 and len(result["per_row"]["trained_returns"]) == 4
    assert result["baseline_policy"] == ("always candidate 0" if wrapper == "choice" else "initial policy")
    assert 0.0 <= result["trained"]["solved"] <= 1.0
    assert (tmp_path / "model.zip").exists() == (wrapper == "choice")
    assert f"SB3 {algo} ({wrapper}): 16/16 step (100%)" in proc.stderr  # plain progress lines, not a bar
    assert "\r" not in proc.stderr.split("Loading weights")[-1]
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 16 and "eval/solved" in metrics[-1]


def test_a_bf16_lm_gives_fp32_logits_and_values_and_trains():
    """On CUDA the LM loads in bf16 by default: SB3's fp32 value head once crashed on its bf16 features."""
    lm, tokenizer = load_model("tiny", shared=False, dtype="bfloat16", device="cpu")
    batched = TokenLevel(make_dialogue_vec(2, **ARITH), tokenizer, window=32, max_reply_tokens=2)
    venv = DialogueSB3VecEnv(batched, seed=0)
    model = PPO(LMActorCriticPolicy, venv, policy_kwargs={"lm": lm}, n_steps=4, batch_size=4, n_epochs=1,
                learning_rate=1e-3, seed=0, device="cpu")
    obs = model.policy.obs_to_tensor(venv.reset())[0]
    with torch.no_grad():
        dist = model.policy.get_distribution(obs)
        values = model.policy.predict_values(obs)
    assert dist.distribution.logits.dtype == torch.float32 and values.dtype == torch.float32
    head = lm.get_output_embeddings().weight
    before = head.detach().clone()
    model.learn(total_timesteps=8)
    assert head.dtype == torch.bfloat16 and not torch.equal(head, before)  # trained through the fp32 read
