"""The numeric wrappers (token level, candidate choice) and the Stable-Baselines3 VecEnv over the native batch."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from dialogue_gym.conversation import DialogueError
from dialogue_gym.wrappers import CandidateChoice, ChoiceEnv, TokenEnv, TokenLevel, make_dialogue_vec

sb3_env_checker = pytest.importorskip("stable_baselines3.common.env_checker")
from dialogue_gym.wrappers.sb3 import DialogueSB3VecEnv  # noqa: E402

ARITH = dict(task="arithmetic", user="critic", reward="verifier", max_turns=2)


@pytest.fixture(scope="module")
def tiny_engine():
    from dialogue_gym.generation.hf import HFEngine

    return HFEngine("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    from dialogue_gym.models import load_tokenizer

    return load_tokenizer("tiny")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- checkers ----------------------------------------------------------------------------------------------


def test_token_env_passes_both_checkers():
    env = TokenEnv(tokenizer="tiny", window=64, max_reply_tokens=6, **ARITH)
    gym_check_env(env, skip_render_check=True)
    sb3_env_checker.check_env(env)


def test_choice_env_passes_both_checkers(tiny_engine):
    env = ChoiceEnv(engine=tiny_engine, k=3, max_new_tokens=6, **ARITH)
    gym_check_env(env, skip_render_check=True)
    sb3_env_checker.check_env(env)


# ---- token level -------------------------------------------------------------------------------------------


def test_token_env_one_token_per_step_and_the_turn_ends_on_eos(tokenizer):
    env = TokenEnv(tokenizer=tokenizer, window=128, max_reply_tokens=40, **ARITH)
    obs, _ = env.reset(seed=0)
    conv = list(env.batched.conversations[0])
    prompt = tokenizer(tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    n0 = int(obs["length"][0])
    assert n0 == len(prompt) and obs["tokens"][:n0].tolist() == prompt
    assert (obs["tokens"][n0:] == env.batched.pad_id).all()
    answer = env.unwrapped.get_state().profile["answer"]
    reply = _ids(tokenizer, f"The answer is {answer:g}.")
    for j, t in enumerate(reply):
        obs, r, te, tr, info = env.step(t)
        assert r == 0.0 and not te and not tr and not info
        assert int(obs["length"][0]) == n0 + j + 1 and obs["tokens"][n0 + j] == t  # the action is appended
    obs, r, te, tr, info = env.step(tokenizer.eos_token_id)
    assert info["turn_ended"] and info["reply"] == f"The answer is {answer:g}."
    assert r == 1.0 and te and not tr  # the verifier's reward, the critic ends the chat on a correct answer


def test_token_env_user_tokens_are_observed_and_the_cap_ends_the_turn(tokenizer):
    env = TokenEnv(tokenizer=tokenizer, window=512, max_reply_tokens=3, **ARITH)
    env.reset(seed=1)
    word = _ids(tokenizer, " maybe")[0]
    for _ in range(2):
        _, r, te, tr, info = env.step(word)
        assert not info
    obs, r, te, tr, info = env.step(word)  # the third token reaches the cap
    assert info["turn_ended"] and info["reply"] == "maybe maybe maybe" and not te and not tr
    conv = env.batched.conversations[0]
    assert conv[-2] == {"role": "assistant", "content": "maybe maybe maybe"} and conv[-1]["role"] == "user"
    expected = tokenizer(tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    n = int(obs["length"][0])
    assert obs["tokens"][:n].tolist() == expected  # the user's reply is in the observation (not an action)
    user_ids = _ids(tokenizer, conv[-1]["content"])
    assert any(obs["tokens"][k:k + len(user_ids)].tolist() == user_ids for k in range(n))


def test_token_env_blank_reply_ends_the_episode_and_window_keeps_the_tail(tokenizer):
    env = TokenEnv(tokenizer=tokenizer, window=8, max_reply_tokens=3, blank_reward=-2.0, **ARITH)
    obs, _ = env.reset(seed=2)
    full = env.batched.prompts[0]
    assert int(obs["length"][0]) == 8 and obs["tokens"].tolist() == full[-8:]
    _, r, te, tr, info = env.step(tokenizer.eos_token_id)
    assert r == -2.0 and te and info["blank_reply"]
    with pytest.raises(DialogueError, match="episode has ended"):
        env.step(5)
    with pytest.raises(DialogueError, match="window must be a positive integer"):
        TokenEnv(tokenizer=tokenizer, window=0, **ARITH)


# ---- candidate choice --------------------------------------------------------------------------------------


def test_choice_env_sends_the_chosen_candidate_and_is_reproducible(tiny_engine):
    env = ChoiceEnv(engine=tiny_engine, k=3, max_new_tokens=6, **{**ARITH, "reward_mode": "per_turn"})
    obs, _ = env.reset(seed=5)
    cands = env.batched.candidate_texts(0)
    assert obs.shape == env.observation_space.shape == (4 * (64 + 3),) and len(cands) == 3
    again, _ = env.reset(seed=5)
    np.testing.assert_array_equal(obs, again)
    assert env.batched.candidate_texts(0) == cands
    feats = obs.reshape(4, 67)
    assert feats[0, -3] == 0.0 and 0 < feats[0, -2] <= 1  # turn 0 of 2, context share
    for c, g in enumerate(env.batched.candidates[0]):
        assert feats[c + 1, -3] == pytest.approx(np.mean(g.logprobs), rel=1e-5)
        assert feats[c + 1, -2] == pytest.approx(len(g.token_ids) / 6) and feats[c + 1, -1] == float(g.finished)
    obs2, r, te, tr, info = env.step(2)
    if not info.get("blank_reply"):
        assert info["reply"] == cands[2].strip()
        assert env.batched.conversations[0][-2] == {"role": "assistant", "content": cands[2].strip()}
    with pytest.raises(DialogueError, match=r"a candidate index in \[0, 2\]"):
        env.step(3)


def test_batched_choice_rows_equal_single_envs_seeded_seed_plus_i(tiny_engine):
    batched = CandidateChoice(make_dialogue_vec(2, **ARITH), tiny_engine, k=2, max_new_tokens=5)
    obs, _ = batched.reset(seed=10)
    for i in range(2):
        single = ChoiceEnv(engine=tiny_engine, k=2, max_new_tokens=5, **ARITH)
        o, _ = single.reset(seed=10 + i)
        assert single.batched.candidate_texts(0) == batched.candidate_texts(i)
        np.testing.assert_allclose(o, obs[i], atol=1e-4, rtol=1e-4)  # (rtol: log-probs of ~-10 round by ~3e-4
        # between batch shapes on CUDA; the candidate texts above are the exact check)


# ---- the SB3 VecEnv: one user call and one reward call per step for all sub-envs ---------------------------


def test_sb3_vec_env_choice_makes_one_user_and_one_reward_call_per_step(tiny_engine):
    batched = CandidateChoice(make_dialogue_vec(4, **{**ARITH, "max_turns": 5, "reward_mode": "per_turn"}),
                              tiny_engine, k=2, max_new_tokens=5)
    venv = DialogueSB3VecEnv(batched, seed=0)
    core = batched.venv.core
    obs = venv.reset()
    assert obs.shape == (4, 3 * 67)
    for _ in range(3):
        users, rewards, gens = core.user_calls, core.reward_calls, batched.generate_calls
        obs, r, dones, infos = venv.step(np.array([0, 1, 0, 1]))
        assert core.reward_calls - rewards == 1  # one batched reward call for all four sub-envs
        assert core.user_calls - users == (1 if not all(i.get("blank_reply") for i in infos) else 0)
        assert batched.generate_calls - gens == 1  # one batched candidate call (continuing + reset rows)
        assert obs.shape == (4, 3 * 67) and r.dtype == np.float32
        for i in np.flatnonzero(dones):
            assert infos[i]["terminal_observation"].shape == (3 * 67,)


def test_sb3_vec_env_token_level_calls_only_when_a_turn_ends(tokenizer):
    batched = TokenLevel(make_dialogue_vec(3, **{**ARITH, "reward_mode": "per_turn"}), tokenizer, window=64,
                         max_reply_tokens=2)
    venv = DialogueSB3VecEnv(batched, seed=0)
    core = batched.venv.core
    venv.reset()
    word = _ids(tokenizer, " hello")[0]
    venv.step(np.array([word] * 3))
    assert (core.user_calls, core.reward_calls) == (0, 0)  # no reply finished yet: no model call
    obs, r, dones, infos = venv.step(np.array([word] * 3))  # every reply reaches the cap together
    assert (core.user_calls, core.reward_calls) == (1, 1)
    assert all(i["turn_ended"] for i in infos) and obs["tokens"].shape == (3, 64)
    venv.step(np.array([word] * 3))
    obs, r, dones, infos = venv.step(np.array([word] * 3))  # turn 2 of 2: truncated, auto-reset
    assert dones.all() and all(i["TimeLimit.truncated"] for i in infos)
    assert all(int(i["terminal_observation"]["length"][0]) > 0 for i in infos)
    assert (core.user_calls, core.reward_calls) == (1, 2)  # truncated rows are scored, the user is not asked
