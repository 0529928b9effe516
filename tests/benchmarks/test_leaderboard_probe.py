"""The turn-1 probe: the initial policy's own replies, sorted by the task's behaviour test and scored by forward
passes, checked against plain full forwards and a hand-computed log-odds change."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import pytest
import torch

import dialogue_gym  # noqa: F401
from benchmarks.leaderboard.probe import (
    check_states,
    has_probe,
    probe_from_logprobs,
    probe_values,
    replies_digest,
    sample_probe_replies,
)
from dialogue_gym.models import load_model
from dialogue_gym.rollouts import make_states
from dialogue_gym.tasks import ClarifyTask


def clarify_states(n: int):
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", split="test",
                        reward_mode="per_turn", task="clarify", max_turns=2, model="tiny",
                        task_kwargs={"steps": 0, "n_train": 5, "n_validation": 5, "n_test": 5})
    return venv.core.task, make_states(venv.core, n, seed=3)


def by_hand(model, prompt: list[int], reply: list[int], temperature: float = 1.0) -> float:
    """Summed log-prob of ``reply`` after ``prompt`` (softmax of logits / temperature) from one full forward pass."""
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(ids).logits.float()[0, :-1] / temperature  # (T-1, V) predicts tokens 1..T-1
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1:].sum())


def test_replies_are_the_initial_policys_own_sorted_by_the_behaviour_test_with_their_log_probs():
    task, states = clarify_states(3)
    assert has_probe(task) and not has_probe(object())
    # a stand-in behaviour test that splits the tiny model's random replies: "asks" = an even number of characters
    probe = sample_probe_replies("tiny", states, lambda text: len(text) % 2 == 0, 1.0, 8, seed=5, samples=6, keep=2)
    assert (probe["samples"], probe["keep"], len(probe["states"])) == (6, 2, 3)
    model, _ = load_model("tiny", shared=False)
    for st in probe["states"]:
        assert len(st["ask"]) <= 2 and len(st["guess"]) <= 2 and st["sampled"] == 6
        assert all(len(y["text"]) % 2 == 0 for y in st["ask"]) and all(len(y["text"]) % 2 for y in st["guess"])
        assert len(st["ask"]) == min(2, st["asked"]) and len(st["guess"]) == min(2, 6 - st["asked"])
        texts = [y["text"] for y in st["ask"] + st["guess"]]
        assert len(set(texts)) == len(texts)  # each sample its own seed: distinct replies
        for y in st["ask"] + st["guess"]:
            assert y["logp0"] == pytest.approx(by_hand(model, st["prompt_token_ids"], y["token_ids"]), abs=1e-3)
    # seeded: the same replies again; the initial policy's own probe is 0 where both classes exist
    again = sample_probe_replies("tiny", states, lambda text: len(text) % 2 == 0, 1.0, 8, seed=5, samples=6, keep=2)
    assert [[y["token_ids"] for y in st["ask"]] for st in again["states"]] == \
        [[y["token_ids"] for y in st["ask"]] for st in probe["states"]]
    # the digest that pooled run directories are checked by: the replies' token ids, not pi_0's log-probs
    assert replies_digest(again) == replies_digest(probe)
    copy = json.loads(json.dumps(probe))
    reply = next(y for st in copy["states"] for y in st["ask"] + st["guess"])
    reply["logp0"] += 0.5  # each directory's probe change is taken against its own log-probs
    assert replies_digest(copy) == replies_digest(probe)
    reply["token_ids"][-1] += 1
    assert replies_digest(copy) != replies_digest(probe)
    moved = json.loads(json.dumps(probe))  # the same replies sorted into the other class
    st = next(st for st in moved["states"] if st["ask"] or st["guess"])
    st["ask"], st["guess"] = st["guess"], st["ask"]
    assert replies_digest(moved) != replies_digest(probe)
    other = sample_probe_replies("tiny", states, lambda text: len(text) % 2 == 0, 1.0, 8, seed=6, samples=6, keep=2)
    assert replies_digest(other) != replies_digest(probe)
    values = probe_values("tiny", probe)
    for st, v in zip(probe["states"], values):
        assert (v is None) == (not st["ask"] or not st["guess"])
        assert v is None or abs(v) < 1e-3
    assert [st["id"] for st in probe["states"]] == [s.id for s in states]
    check_states(probe, states)
    with pytest.raises(ValueError, match="delete probe_replies.json"):
        check_states(probe, states[:2])


def test_log_probs_are_taken_at_the_sampling_temperature():
    """The kept replies are draws from the initial policy at T, so pi_0's and every policy's log-probs are at T."""
    _, states = clarify_states(1)
    probe = sample_probe_replies("tiny", states, lambda text: len(text) % 2 == 0, 0.5, 6, seed=5, samples=4, keep=2)
    model, _ = load_model("tiny", shared=False)
    st = probe["states"][0]
    for y in st["ask"] + st["guess"]:
        assert y["logp0"] == pytest.approx(by_hand(model, st["prompt_token_ids"], y["token_ids"], 0.5), abs=1e-3)
        assert y["logp0"] != pytest.approx(by_hand(model, st["prompt_token_ids"], y["token_ids"], 1.0), abs=1e-2)


def test_the_probe_is_the_change_of_the_ask_vs_guess_log_odds_by_hand():
    probe = {"states": [
        {"ask": [{"logp0": -3.0}, {"logp0": -5.0}], "guess": [{"logp0": -2.0}]},
        {"ask": [{"logp0": -1.0}], "guess": []},  # no guess sampled: left out
    ]}
    # the policy: the first ask reply 2 nats likelier, the second unchanged; the guess 1 nat less likely
    got = probe_from_logprobs(probe, [[-1.0, -5.0, -3.0], [-0.5]])
    want = math.log((math.exp(2.0) + 1.0) / 2) - (-1.0)
    assert got[0] == pytest.approx(want) and got[1] is None


def test_bad_probe_settings_are_named():
    _, states = clarify_states(1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_probe_replies("tiny", states, ClarifyTask(steps=0, n_train=5, n_validation=5, n_test=5).asks, 0.0, 8, 0)
    with pytest.raises(ValueError, match="samples and keep must be >= 1"):
        sample_probe_replies("tiny", states, lambda t: True, 1.0, 8, 0, samples=0)
