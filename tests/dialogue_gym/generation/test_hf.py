"""HFEngine: per-row reproducible sampling in one batched operation, devices and dtypes, the static cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dialogue_gym.generation import SamplingParams
from dialogue_gym.generation.hf import (
    CACHE_ENV,
    HFEngine,
    RowSampler,
    exponential_noise,
    resolve_cache,
    sample_rows,
    static_shape,
)
from dialogue_gym.models import DeviceError, resolve_device, resolve_dtype

CHATS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "Write a haiku about the sea and the long summer evenings."}],
    [{"role": "user", "content": "2 + 2 = ?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Why is the sky blue? Explain it to a child, in two sentences at most."}],
]


@pytest.fixture(scope="module")
def engine():
    return HFEngine("tiny", max_batch_size=8)


# ---- the noise: a pure function of (seed, position, token) ----------------------------------------------------


def test_noise_is_a_function_of_seed_position_and_token_only():
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**63 - 1], dtype=torch.long)
    e = exponential_noise(seeds, 3, 100)
    assert e.dtype == torch.float32 and e.shape == (4, 100)
    assert bool((e > 0).all()) and bool(torch.isfinite(e).all())
    # the same row alone, or next to other rows, gets the same draws
    for i in range(4):
        assert torch.equal(exponential_noise(seeds[i : i + 1], 3, 100)[0], e[i])
    assert torch.equal(exponential_noise(seeds[[3, 0]], 3, 100), e[[3, 0]])
    # the first 100 tokens of a larger vocabulary draw the same numbers
    assert torch.equal(exponential_noise(seeds, 3, 500)[:, :100], e)
    # other positions and other seeds give other numbers
    assert not torch.equal(exponential_noise(seeds, 4, 100), e)
    assert len({tuple(row.tolist()) for row in e}) == 4


def test_noise_is_exponential_and_uncorrelated():
    e = exponential_noise(torch.arange(200, dtype=torch.long), 0, 1000).double()
    assert abs(e.mean().item() - 1.0) < 0.01 and abs(e.var().item() - 1.0) < 0.03  # Exp(1): mean 1, variance 1
    u = torch.exp(-e).flatten().numpy()
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 19000 and counts.max() < 21000  # 20,000 per bin expected
    # neighbouring rows (seeds 0, 1, ...), positions and tokens are not correlated
    assert abs(np.corrcoef(u.reshape(200, 1000)[:-1].ravel(), u.reshape(200, 1000)[1:].ravel())[0, 1]) < 0.01
    nxt = torch.exp(-exponential_noise(torch.arange(200, dtype=torch.long), 1, 1000)).flatten().numpy()
    assert abs(np.corrcoef(u, nxt)[0, 1]) < 0.01
    assert abs(np.corrcoef(u.reshape(200, 1000)[:, :-1].ravel(), u.reshape(200, 1000)[:, 1:].ravel())[0, 1]) < 0.01


# ---- sampling by the exponential race -------------------------------------------------------------------------


def test_sample_rows_hand_computed():
    probs = torch.tensor([[0.2, 0.5, 0.3]] * 3)
    noise = torch.tensor([[1.0, 1.0, 1.0],  # ratios 0.2, 0.5, 0.3 -> 1
                          [0.1, 1.0, 1.0],  # 2.0, 0.5, 0.3 -> 0
                          [1.0, 2.0, 0.5]])  # 0.2, 0.25, 0.6 -> 2
    assert sample_rows(probs, noise).tolist() == [1, 0, 2]


def test_sample_rows_never_returns_a_zero_weight_index():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    for position in range(50):
        got = sample_rows(probs, exponential_noise(torch.tensor([3, 4]), position, 6)).tolist()
        assert got[0] in (1, 3) and got[1] == 2


def test_sample_rows_frequencies_match_the_distribution():
    p = torch.tensor([0.1, 0.6, 0.0, 0.3])
    noise = exponential_noise(torch.arange(20000, dtype=torch.long), 5, 4)
    got = sample_rows(p.expand(20000, 4), noise)
    freq = torch.bincount(got, minlength=4).double() / 20000
    assert freq[2] == 0
    assert torch.allclose(freq, p.double(), atol=0.015)


def _sample(scores: torch.Tensor, seeds: list[int], params: SamplingParams, position: int = 0) -> torch.Tensor:
    sampler = RowSampler(params, torch.tensor(seeds, dtype=torch.long), prompt_len=0)
    out = sampler(torch.zeros((len(seeds), position), dtype=torch.long), scores)
    return out.argmax(-1)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.05, 0.3]))  # sorted: 1 (0.6), 3 (0.3), 0, 2
    n = 4000
    seeds = list(range(n))
    only_top = _sample(logits.expand(n, 4).clone(), seeds, SamplingParams(temperature=1.0, top_p=0.5))
    assert set(only_top.tolist()) == {1}
    two = _sample(logits.expand(n, 4).clone(), seeds, SamplingParams(temperature=1.0, top_p=0.8))
    assert set(two.tolist()) == {1, 3}
    share = (two == 1).double().mean().item()
    assert abs(share - 0.6 / 0.9) < 0.03  # renormalised over the nucleus


def test_sampler_rows_do_not_depend_on_batch_mates():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g)
    params = SamplingParams(temperature=0.9, top_p=0.9)
    together = _sample(scores.clone(), [11, 12, 13, 14, 15, 16], params, position=7)
    for i in range(6):
        alone = _sample(scores[i : i + 1].clone(), [11 + i], params, position=7)
        assert alone.item() == together[i].item()


# ---- the engine -----------------------------------------------------------------------------------------------


def test_engine_row_equals_row_alone_in_any_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12)
    seeds = [101, 102, 103, 104, 105]
    batch = engine.generate(CHATS, params, seeds=seeds, return_logprobs=True)
    for i in range(len(CHATS)):
        alone = engine.generate([CHATS[i]], params, seeds=[seeds[i]], return_logprobs=True)[0]
        assert alone.token_ids == batch[i].token_ids
        assert np.allclose(alone.logprobs, batch[i].logprobs, atol=1e-4)
    # another batch size and other batch-mates
    small = HFEngine((engine.model, engine.tokenizer), max_batch_size=2)
    reordered = small.generate([CHATS[4], CHATS[0], CHATS[2]], params, seeds=[105, 101, 103])
    assert [g.token_ids for g in reordered] == [batch[4].token_ids, batch[0].token_ids, batch[2].token_ids]


def test_engine_seeds_change_samples_and_repeat(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    a = engine.generate(CHATS[:1] * 4, params, seeds=[1, 2, 3, 1])
    assert a[0].token_ids == a[3].token_ids
    assert len({tuple(g.token_ids) for g in a[:3]}) > 1


def test_engine_logprobs_are_the_sampled_tokens_logprobs(engine):
    params = SamplingParams(temperature=0.7, max_new_tokens=6)
    g = engine.generate(CHATS[:1], params, seeds=[5], return_logprobs=True)[0]
    ids = torch.tensor([g.prompt_token_ids + g.token_ids], device=engine.device)
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float()
    start = len(g.prompt_token_ids)
    want = [torch.log_softmax(logits[start - 1 + j] / 0.7, -1)[t].item() for j, t in enumerate(g.token_ids)]
    assert np.allclose(g.logprobs, want, atol=1e-4)


def test_static_cache_gives_the_dynamic_cache_tokens(engine):
    static = HFEngine((engine.model, engine.tokenizer), max_batch_size=8, cache="static")
    for params in (SamplingParams(temperature=0.0, max_new_tokens=8), SamplingParams(temperature=1.0,
                                                                                      max_new_tokens=8)):
        want = engine.generate(CHATS[:3], params, seeds=[7, 8, 9])
        got = static.generate(CHATS[:3], params, seeds=[7, 8, 9])  # 3 rows padded to 8, the width to 64
        assert [g.token_ids for g in got] == [g.token_ids for g in want]
        assert [g.prompt_token_ids for g in got] == [g.prompt_token_ids for g in want]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_query_attention_without_the_copy_samples_the_same_tokens(monkeypatch, dtype):
    """On CPU generate runs with SDPA's own grouped-query attention (no repeated key/value heads): the same tokens
    and log-probs as transformers' sdpa, on left-padded rows of different lengths (the padding mask is kept)."""
    import contextlib

    import dialogue_gym.generation.hf as hf

    eng = HFEngine("tiny", dtype=dtype, device="cpu", max_batch_size=8)
    cfg = eng.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the tiny model has grouped heads: a real check
    assert hf.gqa_attention(eng.model, torch.device("cpu")).swap
    assert not hf.gqa_attention(eng.model, torch.device("meta")).swap  # only on CPU
    seen = []
    real = hf.sdpa_gqa_attention

    def counting(*a, **k):
        seen.append(a[2].shape[1] != a[1].shape[1])  # grouped: fewer key heads than query heads
        return real(*a, **k)

    monkeypatch.setattr(hf, "sdpa_gqa_attention", counting)
    monkeypatch.setattr(hf, "_SDPA_GQA_REGISTERED", False)  # register the counting function
    monkeypatch.setattr(hf, "LOW_PRECISION", ())  # bfloat16 as well: the kernel's own dtype (the upcast: below)
    params = [SamplingParams(temperature=0.0, max_new_tokens=8), SamplingParams(temperature=1.0, max_new_tokens=8)]
    try:
        fast = [eng.generate(CHATS, p, seeds=[1, 2, 3, 4, 5], return_logprobs=True) for p in params]
    finally:
        from transformers import AttentionInterface

        AttentionInterface.register(hf.SDPA_GQA, real)  # later tests get the real function again
    assert seen and all(seen) and cfg._attn_implementation == "sdpa"  # used, and the model's setting restored
    monkeypatch.setattr(hf, "gqa_attention", lambda model, device: contextlib.nullcontext())
    plain = [eng.generate(CHATS, p, seeds=[1, 2, 3, 4, 5], return_logprobs=True) for p in params]
    for f, p in zip(fast, plain):
        assert [g.token_ids for g in f] == [g.token_ids for g in p]
        assert [g.logprobs for g in f] == [g.logprobs for g in p]


@pytest.mark.parametrize("mask", [False, True])
def test_low_precision_attention_runs_in_float32_on_cpu(mask):
    """bfloat16 queries, keys and values: the output is float32 attention over the upcast inputs (grouped heads
    repeated by hand, the reference), cast back to bfloat16; float32 inputs are used as they are."""
    import dialogue_gym.generation.hf as hf

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 5, 16, generator=g)
    k, v = torch.randn(3, 2, 5, 16, generator=g), torch.randn(3, 2, 5, 16, generator=g)
    attn = None
    if mask:  # left padding: row 0 has 2 pad positions, row 1 one
        attn = torch.ones(3, 1, 5, 5, dtype=torch.bool).tril()
        attn[0, :, :, :2] = False
        attn[1, :, :, :1] = False
        attn[0, :, :2, 0] = attn[0, :, :2, 1] = True  # pad queries see something (no all-masked row)
        attn[1, :, 0, 0] = True

    def reference(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=attn,
            is_causal=attn is None)
        return out.transpose(1, 2)

    low = [x.to(torch.bfloat16) for x in (q, k, v)]
    out, _ = hf.sdpa_gqa_attention(None, *low, attn)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 6, 16)
    assert torch.equal(out, reference(*[x.float() for x in low]).to(torch.bfloat16))
    out32, _ = hf.sdpa_gqa_attention(None, q, k, v, attn)
    assert out32.dtype == torch.float32 and torch.equal(out32, reference(q, k, v))


def test_bfloat16_weights_sample_with_fp32_logprobs():
    eng = HFEngine("tiny", dtype="bfloat16", device="cpu")
    assert next(eng.model.parameters()).dtype == torch.bfloat16
    g = eng.generate(CHATS[:2], SamplingParams(temperature=1.0, max_new_tokens=5), seeds=[1, 2],
                     return_logprobs=True)
    assert all(len(x.logprobs) == len(x.token_ids) and all(lp <= 0 for lp in x.logprobs) for x in g)


# ---- devices and dtypes ----------------------------------------------------------------------------------------


def test_dtype_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    if torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float8"}, "dtype is 'float8'; allowed: auto"),
    ({"device": "gpu"}, "device is 'gpu'; allowed"),
    ({"device": "cuda:64"}, "cuda:64"),
])
def test_bad_device_or_dtype_fails_before_loading(monkeypatch, kwargs, match):
    import dialogue_gym.models as models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_pretrained", no_load)
    monkeypatch.setattr(models, "load_tokenizer", no_load)
    with pytest.raises(DeviceError, match=match):
        HFEngine("embedded", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="no usable CUDA device"):
        resolve_device("cuda")


def test_device_environment_variable_picks_auto(monkeypatch):
    monkeypatch.setenv("DIALOGUE_GYM_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("DIALOGUE_GYM_DEVICE", "nonsense")
    with pytest.raises(DeviceError, match="nonsense"):
        resolve_device("auto")


def test_env_with_bad_device_or_dtype_fails_at_construction():
    import gymnasium as gym

    import dialogue_gym  # noqa: F401
    from dialogue_gym.conversation import DialogueError

    with pytest.raises(DialogueError, match="dtype is 'int8'"):
        gym.make("MultiTurnDialogue-v0", task="arithmetic", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(DialogueError, match="no usable CUDA device"):
            gym.make("MultiTurnDialogue-v0", task="arithmetic", device="cuda")


# ---- the KV cache default and the static cache's shape buckets --------------------------------------------------


def test_cache_auto_is_static_on_cuda_dynamic_elsewhere_and_the_env_overrides(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert resolve_cache("auto", torch.device("cuda", 0)) == "static"
    assert resolve_cache("auto", torch.device("cuda")) == "static"
    assert resolve_cache("auto", torch.device("cpu")) == "dynamic"
    assert resolve_cache("auto", "mps") == "dynamic"
    assert resolve_cache("dynamic", torch.device("cuda")) == "dynamic"  # an explicit choice is taken as given
    assert resolve_cache("static", torch.device("cpu")) == "static"
    monkeypatch.setenv(CACHE_ENV, "dynamic")  # the test suite's opt-out (tests/conftest.py)
    assert resolve_cache("auto", torch.device("cuda")) == "dynamic"
    assert resolve_cache("static", torch.device("cuda")) == "static"
    monkeypatch.setenv(CACHE_ENV, " Static ")
    assert resolve_cache("auto", torch.device("cpu")) == "static"


def test_bad_cache_settings_name_the_field_and_what_is_allowed(monkeypatch, engine):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    with pytest.raises(ValueError, match="cache is 'fast'; allowed: auto, dynamic, static"):
        resolve_cache("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="cache is 'fast'; allowed: auto, dynamic, static"):
        HFEngine((engine.model, engine.tokenizer), cache="fast")
    monkeypatch.setenv(CACHE_ENV, "compiled")
    with pytest.raises(ValueError, match="DIALOGUE_GYM_HF_CACHE is 'compiled'; allowed: dynamic, static"):
        HFEngine("tiny")  # fails before any weights load
    monkeypatch.delenv(CACHE_ENV)
    assert engine.generate(CHATS[:1], SamplingParams(temperature=0.0, max_new_tokens=2))[0].token_ids  # still usable


def test_engine_default_cache_follows_the_device(monkeypatch, engine):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    eng = HFEngine((engine.model, engine.tokenizer))
    assert eng.cache == ("static" if eng.device.type == "cuda" else "dynamic")
    monkeypatch.setenv(CACHE_ENV, "static")
    assert HFEngine((engine.model, engine.tokenizer)).cache == "static"


def test_static_shapes_round_rows_to_a_few_buckets_and_widths_to_powers_of_two():
    assert [static_shape(n, 10, 256)[0] for n in (1, 2, 4, 5, 16, 17, 64, 65, 200, 256)] == \
        [1, 4, 4, 16, 16, 64, 64, 256, 256, 256]
    assert [static_shape(n, 10, 32)[0] for n in (1, 2, 3, 8, 9, 32)] == [1, 2, 8, 8, 32, 32]
    assert static_shape(300, 10, 256)[0] == 300  # above the cap (the engine splits before): kept
    assert [static_shape(4, w, 256)[1] for w in (1, 64, 65, 128, 129, 1000)] == [64, 64, 128, 128, 256, 1024]
    for n in range(1, 257):  # a bucket always holds the batch, at most 4x its rows
        rows, _ = static_shape(n, 10, 256)
        assert n <= rows <= 4 * n


def test_a_growing_run_meets_a_handful_of_static_shapes():
    """Every batch size 1..256 and every prompt width up to 2,000 tokens (dialogues growing over a long run):
    5 row buckets x 6 width buckets at most; one run of fixed width range meets far fewer."""
    shapes = {static_shape(n, w, 256) for n in range(1, 257) for w in range(1, 2001)}
    assert len(shapes) == 5 * 6
    one_run = {static_shape(n, w, 256) for n in (256, 240, 180, 60) for w in range(150, 900)}  # dialogues end
    assert len(one_run) <= 8


def test_the_first_call_of_each_static_shape_is_logged_with_its_seconds(engine, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="dialogue_gym.generation")
    static = HFEngine((engine.model, engine.tokenizer), max_batch_size=8, cache="static")
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    static.generate(CHATS[:3], params)
    static.generate(CHATS[2:5], params)  # 3 rows again, prompts under 64 tokens: the same shape, no new line
    static.generate(CHATS[:1], params)  # 1 row: a new shape
    assert [shape for shape, _ in static.compile_log] == [(8, 64, 3), (1, 64, 3)]
    assert all(s > 0 for _, s in static.compile_log)
    lines = [r.getMessage() for r in caplog.records if "static KV cache" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("static KV cache: new shape 8 rows x 64 prompt tokens + 3 new")
    assert engine.compile_log == [] and static.cache == "static"
