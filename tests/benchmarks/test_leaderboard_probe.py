"""The turn-1 log-prob probe: canned replies scored by forward passes, checked against a plain full forward."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dialogue_gym  # noqa: F401
from benchmarks.leaderboard.probe import has_probe, probe_values
from dialogue_gym.generation import prompt_token_ids
from dialogue_gym.models import load_model
from dialogue_gym.rollouts import make_states
from dialogue_gym.tasks import ClarifyTask


def clarify_states(n: int):
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", split="test",
                        reward_mode="per_turn", task="clarify", max_turns=2, model="tiny",
                        task_kwargs={"steps": 0, "n_train": 5, "n_validation": 5, "n_test": 5})
    return venv.core.task, make_states(venv.core, n, seed=3)


def by_hand(model, tokenizer, messages, text: str) -> float:
    """Summed log-prob of ``text`` + EOS after the rendered prompt, from one full forward pass."""
    prompt = prompt_token_ids(tokenizer, messages)
    reply = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(ids).logits.float()[0, :-1]  # (T-1, V) predicts tokens 1..T-1
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1:].sum())


def test_the_probe_is_log_pi_ask_minus_log_pi_guess_on_fixed_replies():
    task, states = clarify_states(3)
    assert has_probe(task)
    ask, guess = task.probe_replies(states[0].state.profile)
    assert ask.endswith("?") and task.asks(ask) and not task.asks(guess) and guess.startswith("The answer is ")
    values = probe_values("tiny", states, task)
    model, tokenizer = load_model("tiny", shared=False)
    want = [by_hand(model, tokenizer, s.state.messages, task.probe_replies(s.state.profile)[0])
            - by_hand(model, tokenizer, s.state.messages, task.probe_replies(s.state.profile)[1]) for s in states]
    assert values.shape == (3,) and np.allclose(values, want, atol=1e-3)
    assert np.array_equal(values, probe_values("tiny", states, task))  # forward passes: no sampling noise


def test_the_guess_is_never_the_answer_and_a_task_without_probe_is_named():
    task = ClarifyTask(steps=0, n_train=5, n_validation=5, n_test=5)
    assert task.probe_replies({"answer": 10.0, "facts": [{"unknown": "x"}]})[1] == "The answer is 11."
    _, states = clarify_states(1)
    with pytest.raises(ValueError, match="has no probe_replies"):
        probe_values("tiny", states, object())
