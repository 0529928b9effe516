"""OpenAIEngine against vLLM's real OpenAI server (one per test session, tiny model) and the env over HTTP,
side by side with the in-process vLLM engine and the HF judge on the same model.

Expected equalities: the server and the in-process engine run the same vLLM code on the same weights and
receive the same token ids and seeds, so they sample the same tokens; the only possible difference is float
rounding when the server batches the concurrent requests differently from the in-process call (none was seen).
The HF judge runs the tiny model with 16-wide heads where vLLM runs the equivalent 32-wide copy
(``widen_attention_heads``): equal up to float rounding.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import dialogue_gym  # noqa: F401  (registers the env)
from dialogue_gym.generation.base import SamplingParams
from dialogue_gym.generation.openai import OpenAIEngine, ServerError
from dialogue_gym.rewards.judge import LLMJudge

pytestmark = pytest.mark.vllm

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for staying focused while studying."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Explain photosynthesis in one sentence."}],
]
CONVERSATIONS = [c + [{"role": "assistant", "content": reply}] for c, reply in
                 zip(CHATS, ["Paris.", "Sleep, plan, and put the phone away.", "Plants make sugar from light."])]
TINY_VLLM = {"gpu_memory_utilization": 0.08}  # as generation/test_vllm.py: one shared in-process engine


@pytest.fixture(scope="module")
def http(vllm_server):
    with OpenAIEngine("tiny", vllm_server) as eng:
        yield eng


@pytest.fixture(scope="module")
def local():
    from dialogue_gym.generation import make_engine

    return make_engine("vllm", "tiny", **TINY_VLLM)  # shared; shut down at the end of the session


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, max_new_tokens=20),
                                    SamplingParams(temperature=0, max_new_tokens=20)])
def test_generation_over_http_equals_in_process_vllm(http, local, params):
    seeds = [11, 12, 11]
    over_http = http.generate(CHATS, params, seeds=seeds, return_logprobs=True)
    in_process = local.generate(CHATS, params, seeds=seeds, return_logprobs=True)
    for h, v in zip(over_http, in_process):
        assert h.prompt_token_ids == v.prompt_token_ids
        assert h.token_ids == v.token_ids and h.text == v.text and h.finished == v.finished
        np.testing.assert_allclose(h.logprobs, v.logprobs, atol=1e-5)
    if params.temperature > 0:
        assert over_http[0].token_ids != over_http[1].token_ids


def test_judge_over_http_and_on_vllm_equals_the_hf_judge(http, local):
    hf = LLMJudge("tiny")
    on_vllm, over_http = LLMJudge("tiny", engine=local), LLMJudge("tiny", engine=http)
    ids = [hf.prompt_ids(c) for c in CONVERSATIONS]
    with torch.no_grad():  # the HF reference: full-vocabulary log-softmax at the digit tokens
        logits = [hf.model(torch.tensor([x], device=hf.model.device)).logits[0, -1] for x in ids]
        ref = np.stack([torch.log_softmax(z.double(), -1)[hf.digit_ids].cpu().numpy() for z in logits])
    np.testing.assert_allclose(local.next_token_logprobs(ids, hf.digit_ids), ref, atol=1e-4)
    np.testing.assert_allclose(http.next_token_logprobs(ids, hf.digit_ids), ref, atol=1e-4)
    expected = hf.score(CONVERSATIONS)
    np.testing.assert_allclose(on_vllm.score(CONVERSATIONS), expected, atol=1e-3)
    np.testing.assert_allclose(over_http.score(CONVERSATIONS), expected, atol=1e-3)
    assert len(set(np.round(expected, 6))) == 3  # the three conversations are told apart


def test_env_over_http_equals_the_env_on_in_process_vllm(vllm_server, local):
    """The user and the judge through the server vs both on the in-process engine: same seeds, same dialogues,
    same scores."""
    common = dict(num_envs=3, autoreset_mode="Disabled", model="tiny", reward="judge", reward_mode="per_turn",
                  max_turns=3, user_max_new_tokens=16)
    runs = []
    for kw in ({"engine": "openai", "base_url": vllm_server}, {"engine": "vllm", "engine_options": TINY_VLLM}):
        venv = gym.make_vec("MultiTurnDialogue-v0", **common, **kw)
        obs, _ = venv.reset(seed=3)
        scores = []
        for s in range(2):
            obs, reward, term, trunc, info = venv.step([f"Reply {s} to dialogue {i}." for i in range(3)])
            scores.append(info["score"])
        runs.append(([s.messages for s in venv.get_states()], np.array(scores), venv.core))
    (http_msgs, http_scores, http_core), (vllm_msgs, vllm_scores, vllm_core) = runs
    assert http_core.reward.engine is http_core.engine()  # judge and user share the HTTP engine
    assert vllm_core.reward.engine.llm is vllm_core.engine().llm is local.llm  # and the vLLM engine
    assert http_msgs == vllm_msgs
    assert all(m[-1]["role"] == "user" and m[-1]["content"] for m in http_msgs)
    np.testing.assert_allclose(http_scores, vllm_scores, atol=1e-4)


def test_chat_api_on_the_real_server(http, vllm_server):
    """The chat API renders the same template server-side here, so it samples what the completions API does."""
    params = SamplingParams(temperature=0.8, max_new_tokens=12)
    with OpenAIEngine("tiny", vllm_server, api="chat") as chat:
        (c,) = chat.generate(CHATS[:1], params, seeds=[5])
    (t,) = http.generate(CHATS[:1], params, seeds=[5])
    assert c.text == t.text


def test_wrong_model_on_the_real_server(vllm_server):
    with pytest.raises(ServerError, match=r"serves \['tiny'\], not 'embedded'"):
        OpenAIEngine("embedded", vllm_server)
