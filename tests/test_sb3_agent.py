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

ROOT = Path(__file__).resolve().parents[1]
ARITH = dict(task="arithmetic", user="critic", reward="verifier", max_turns=2)


def test_ppo_with_the_tiny_lm_policy_runs_and_changes_every_parameter():
    lm, tokenizer = load_model("tiny", shared=False)
    batched = TokenLevel(make_dialogue_vec(2, **ARITH), tokenizer, window=48, max_reply_tokens=3)
    venv = DialogueSB3VecEnv(batched, seed=0)
    torch.manual_seed(0)
    model = PPO(LMActorCriticPolicy, venv, policy_kwargs={"lm": lm}, n_steps=8, batch_size=8, n_epochs=1,
                learning_rate=1e-3, seed=0, device="cpu")
    assert model.policy.action_net is lm.get_output_embeddings()  # the actor's logits are the LM's head
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
