"""Batched generation with HF transformers: left padding, one long-lived model, per-row seeded sampling.

Sampling runs inside ``model.generate`` (KV cache, padding, stopping all transformers' own) through a logits
processor that picks every row's token in one batched operation per position and hands ``generate`` a one-hot
score, so greedy selection takes the picked token.

Per-row reproducible sampling without a loop over rows (:func:`exponential_noise`, :func:`sample_rows`): row
``r`` at generated position ``t`` gets one Exp(1) draw per token id ``v``, ``E = -log(u)`` with ``u =
hash(seed_r, t, v)`` from a counter-based integer hash (integer arithmetic only, so the bits are identical on
every device), and takes ``argmax_v p_v / E_v`` (the exponential race, i.e. Gumbel-max: ``log p_v - log E_v``
is ``log p_v`` plus Gumbel noise), which picks ``v`` with probability ``p_v``. Top-p zeroes the tokens outside
the nucleus first. Why not inverse-CDF sampling with one uniform per row: its pick moves whenever rounding
moves the cumulative sum across ``u``, which with a 49k-token vocabulary happens every few dozen tokens when
left padding perturbs the logits; the race changes only when the best two ratios are within rounding.
Consequences:

- a row's sample depends only on its prompt, its seed and its own logits, not on which rows share the batch or
  on the batch size (up to float rounding differences that left padding introduces), so a vector env equals N
  single envs and forks are reproducible;
- the log-probability of every sampled token under ``logits / temperature`` comes for free;
- CPU and CUDA draw the *same* noise bits for the same seed, but they do not in general give the same tokens:
  the logits differ between devices (other kernels, and bfloat16 weights by default on CUDA), and the noise
  goes through ``log``, whose last bit may differ between device libraries. Same device, same dtype, same
  seed: same tokens.

The engine runs on the model's device; every tensor it builds for the model is made there. The KV cache
(:func:`resolve_cache`): on CUDA the default (``cache="auto"``) is transformers' static cache, which ``generate``
compiles with ``torch.compile`` (several times more tokens per second than the dynamic cache once compiled);
elsewhere it is the dynamic cache. With the static cache, batch sizes and prompt widths are rounded up to a few
buckets (:func:`static_shape`) so a handful of compiled graphs serve a whole run; each new shape's first call,
compilation included, is logged with its duration.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dialogue_gym.generation.base import Generation, Prompt, SamplingParams, prompts_token_ids

log = logging.getLogger("dialogue_gym.generation")

# Grouped-query attention without the copy, for CPU generation. transformers' "sdpa" attention repeats every layer's
# key/value heads to the query heads' count (`repeat_kv`) whenever an attention mask is passed, which the engine
# always does (left padding): on a CPU that copy is most of a decoding step's attention (benchmarks/results/
# demo_profile.md). torch's scaled_dot_product_attention takes the grouped heads itself (`enable_gqa`); on CPU its
# output is bit-identical to the repeated-heads call. Registered under its own name with transformers' sdpa mask
# (a name without a mask function would make transformers drop the padding mask), and used only inside generate.
SDPA_GQA = "dialogue_gym_sdpa_gqa"
# Low-precision weights on CPU: attention inside generate runs in float32 (inputs upcast, output cast back; the
# matmuls stay bfloat16). On the AMD EPYC (AVX512-BF16, no AMX) of benchmarks/results/demo.md, SDPA's bfloat16 path
# is 4-7x slower than float32's on decoding shapes (one query position over 100-300 cached ones), and the upcast
# costs far less than that: generation 0.81x the wall time, the demo 0.86x. Not bit-identical to bfloat16 SDPA.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def sdpa_gqa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, q, dim) in, (batch, q, heads, dim) out."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    dtype = query.dtype
    if dtype in LOW_PRECISION and query.device.type == "cpu":  # see LOW_PRECISION
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.to(dtype).transpose(1, 2).contiguous(), None


_SDPA_GQA_REGISTERED = False


def _register_sdpa_gqa() -> None:
    global _SDPA_GQA_REGISTERED
    if not _SDPA_GQA_REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(SDPA_GQA, sdpa_gqa_attention)
        AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)
        _SDPA_GQA_REGISTERED = True


class gqa_attention:  # noqa: N801 (a context manager used like a function)
    """Within the block, a CPU model with transformers' "sdpa" attention uses :func:`sdpa_gqa_attention`; any other
    model (CUDA, eager, flash) is left alone. The model's setting is restored on exit."""

    def __init__(self, model: Any, device: torch.device):
        self.config = getattr(model, "config", None)
        self.swap = device.type == "cpu" and getattr(self.config, "_attn_implementation", None) == "sdpa"

    def __enter__(self) -> None:
        if self.swap:
            _register_sdpa_gqa()
            self.config._attn_implementation = SDPA_GQA

    def __exit__(self, *exc: Any) -> None:
        if self.swap:
            self.config._attn_implementation = "sdpa"

# A 32-bit integer mixer (xor-shift-multiply rounds; multipliers from the "lowbias32" search by C. Wellons) on
# int32 tensors. int32 multiplication wraps modulo 2**32 on CPU and CUDA alike; right shifts are masked so they
# act as logical shifts on negative values. int32, not int64: 64-bit integer multiplies are several times
# slower on CPUs (no 64-bit SIMD multiply), and the noise is computed for every (row, token) at each position.
_MUL_A = 0x7FEB352D
_MUL_B = 0x846CA68B - (1 << 32)  # the same multiplier, as a signed 32-bit value
_SALT = 0x1E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mixer of 32-bit words held in int32 tensors."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL_A
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL_B
    return x ^ ((x >> 16) & 0xFFFF)


def _vocab_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """(V,) int32: the mixed token ids, one per vocabulary entry (cached per size and device)."""
    key = (vocab, str(device))
    if key not in _VOCAB_KEYS:
        _VOCAB_KEYS[key] = _mix32(torch.arange(vocab, dtype=torch.int32, device=device) + _SALT)
    return _VOCAB_KEYS[key]


_VOCAB_KEYS: dict[tuple[int, str], torch.Tensor] = {}


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as int32 words with the same 32 bits."""
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def row_keys(seeds: torch.Tensor, position: int) -> torch.Tensor:
    """(B,) int32 keys, a pure function of (row seed, generated position).

    Args:
        seeds: (B,) int64 row seeds in [0, 2**63).
        position: the index of the generated token (0 for the first new token).
    """
    lo = _as_int32(seeds & 0xFFFFFFFF)
    hi = _as_int32((seeds >> 32) & 0xFFFFFFFF)
    pos = _as_int32(torch.full_like(seeds, (position * 0x9E3779B9 + 1) & 0xFFFFFFFF))
    key = _mix32(hi ^ _mix32(pos))
    return _mix32(lo ^ _mix32(key ^ _SALT))


def exponential_noise(seeds: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(B, V) float32 Exp(1) draws, one per (row, token), a pure function of (row seed, position, token id).

    Each draw is ``-log(u)`` with ``u = (24 hash bits + 0.5) / 2**24`` strictly inside (0, 1). The hash uses
    integer operations only, so CPU and CUDA compute bit-identical ``u``.
    """
    bits = _mix32(row_keys(seeds, position)[:, None] ^ _vocab_keys(vocab, seeds.device)[None, :])  # (B, V)
    u = (((bits >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


def sample_rows(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One index per row by the exponential race: ``argmax_v probs[v] / noise[v]``.

    With ``noise`` i.i.d. Exp(1) this picks index v with probability ``probs[v] / sum(probs)`` (it is the
    Gumbel-max trick: ``log p - log E`` is ``log p`` plus Gumbel noise). Unlike inverse-CDF sampling, rounding
    differences in ``probs`` change the pick only when the two best ratios are within rounding of each other.

    Args:
        probs: (B, V) non-negative weights (each row needs a positive entry); zero weights are never picked.
        noise: (B, V) positive Exp(1) draws.

    Returns:
        (B,) int64 indices.
    """
    return (probs / noise).argmax(dim=-1)


class RowSampler:
    """A logits processor that samples every row from its own seed in one batched operation per position and
    records the sampled token's log-prob (under ``logits / temperature``, full vocabulary, before top-p)."""

    def __init__(self, params: SamplingParams, seeds: torch.Tensor | None, prompt_len: int):
        self.params = params
        self.seeds = seeds  # (B,) int64 on the model's device, or None for greedy
        self.prompt_len = prompt_len
        self.logprobs: list[torch.Tensor] = []  # one (B,) tensor per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()  # (B, V)
        if self.params.temperature == 0:
            chosen = scores.argmax(dim=-1)
            logp = torch.log_softmax(scores, dim=-1)
        else:
            assert self.seeds is not None
            logp = torch.log_softmax(scores / self.params.temperature, dim=-1)
            probs = logp.exp()
            if self.params.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
                # keep the smallest prefix whose mass reaches top_p (the first token always stays)
                drop = sorted_p.cumsum(dim=-1) - sorted_p >= self.params.top_p
                probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
            noise = exponential_noise(self.seeds, input_ids.shape[1] - self.prompt_len, probs.shape[-1])
            chosen = sample_rows(probs, noise)  # (B,): one batched operation for all rows
        self.logprobs.append(logp.gather(-1, chosen[:, None])[:, 0])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen[:, None], 0.0)
        return out


CACHES = ("auto", "dynamic", "static")
CACHE_ENV = "DIALOGUE_GYM_HF_CACHE"  # what cache="auto" means when set: dynamic or static (the test suite: dynamic)
MIN_WIDTH = 64  # static cache: prompt widths are rounded up to a power of two, at least this many tokens
ROW_STEP = 4  # static cache: row buckets are the batch cap divided by powers of 4 (256: 1, 4, 16, 64, 256)


def resolve_cache(cache: str, device: torch.device) -> str:
    """The KV cache an HF engine on ``device`` uses: ``"dynamic"`` or ``"static"``.

    ``"auto"`` is ``$DIALOGUE_GYM_HF_CACHE`` when set (``dynamic`` or ``static``; the test suite sets ``dynamic``
    so it compiles nothing), else ``"static"`` on CUDA (compiled decoding: on an H200 the env's user made 6x the
    tokens/s of the dynamic cache at 256 dialogues) and ``"dynamic"`` on any other device (on a CPU the static
    cache is not compiled and gains nothing). ``"dynamic"`` and ``"static"`` are taken as given.

    Raises:
        ValueError: ``cache`` or ``$DIALOGUE_GYM_HF_CACHE`` is not one of the allowed values.
    """
    if cache not in CACHES:
        raise ValueError(f"cache is {cache!r}; allowed: {', '.join(CACHES)}")
    if cache != "auto":
        return cache
    forced = os.environ.get(CACHE_ENV, "").strip().lower()
    if forced:
        if forced not in ("dynamic", "static"):
            raise ValueError(f"{CACHE_ENV} is {forced!r}; allowed: dynamic, static (or unset: static on CUDA, "
                             "dynamic elsewhere)")
        return forced
    return "static" if torch.device(device).type == "cuda" else "dynamic"


def _bucket(n: int, cap: int) -> int:
    """The row bucket of a batch of ``n`` prompts: the smallest ``cap / 4**k`` (rounded up) that holds ``n``.

    A batch cap of 256 gives the buckets 1, 4, 16, 64, 256; 32 gives 1 (32 / 64 rounded up), 2, 8, 32. Coarser
    than powers of two (at most 4x the rows, which cost a GPU little at these sizes) so that a run compiles
    few graphs. A batch above ``cap`` (never made by :class:`HFEngine`, which splits at its cap) keeps its size.
    """
    if n >= cap:
        return n
    b = cap
    while b > 1:
        smaller = -(-b // ROW_STEP)
        if smaller < n:
            break
        b = smaller
    return b


def static_shape(n: int, width: int, cap: int) -> tuple[int, int]:
    """``(rows, width)`` of a static-cache batch of ``n`` prompts at most ``width`` tokens long under a batch cap
    ``cap``: rows to :func:`_bucket`, the width to a power of two of at least ``MIN_WIDTH`` tokens. The cache's
    length is that width plus ``max_new_tokens``, so with one ``max_new_tokens`` per engine the compiled graphs
    are one per (row bucket, width bucket) met: a handful per run
    (tests/dialogue_gym/generation/test_hf.py counts them)."""
    return _bucket(n, cap), max(MIN_WIDTH, 1 << (max(1, width) - 1).bit_length())


RECOMPILE_LIMIT = 64  # compiled graphs kept per function with a static cache (torch's default is 8)


def _allow_recompiles() -> None:
    """Let ``torch.compile`` keep one graph per (rows, width) bucket. Past dynamo's default of 8 graphs per
    function it stops compiling new shapes and runs them eagerly, with only a warning: a long run whose
    dialogues grow through more buckets would slow down without saying why. Raised, never lowered."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT


class HFEngine:
    """A generation engine on an HF transformers causal LM.

    Args:
        model: a model name for :func:`dialogue_gym.models.load_model` (``"embedded"``, ``"tiny"``, a path,
            a hub id) or a ``(model, tokenizer)`` pair to use as is (e.g. a policy being trained).
        device: where a named model loads (``"auto"``: ``$DIALOGUE_GYM_DEVICE``, else CUDA when available,
            else CPU); for a given pair, None leaves it where it is and a device string moves it there.
        dtype: weight dtype of a named model: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``,
            ``"bfloat16"``, ``"float16"``. Sampling and log-probs are computed in fp32 either way.
        max_batch_size: prompts per ``generate`` call; larger batches are split. Default: 32 on CPU (where
            batching beyond that gains little), 256 on CUDA (a GPU needs wide batches to be busy).
        seed: seeds the engine's own stream, used for rows that come without a seed.
        cache: ``"auto"`` (default: static on CUDA, dynamic elsewhere, ``$DIALOGUE_GYM_HF_CACHE`` overrides;
            :func:`resolve_cache`), ``"dynamic"`` (transformers' default KV cache) or ``"static"`` (a
            preallocated cache that ``generate`` compiles with ``torch.compile`` on CUDA: several times faster
            per token there once compiled; on CPU it runs uncompiled and gains nothing). With the static cache
            every batch is padded to a row bucket (rows copied, results dropped) and its prompt width to a power
            of two (:func:`static_shape`), so a handful of compiled graphs serve every call as dialogues grow;
            each new shape compiles once (tens of seconds on a GPU), and its first call is logged with its
            duration (``compile_log``). The tokens are the same as with ``"dynamic"`` up to float rounding.

    Raises:
        DeviceError: the device is not available or the dtype is unknown (before any weights load).
        ValueError: a bad ``max_batch_size`` or ``cache``.
    """

    def __init__(self, model: str | tuple[Any, Any] = "embedded", device: str | None = None,
                 max_batch_size: int | None = None, seed: int = 0, dtype: str | torch.dtype = "auto",
                 cache: str = "auto"):
        from dialogue_gym.models import load_model, resolve_device, resolve_dtype

        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be a positive integer (or None for the device default), got "
                             f"{max_batch_size!r}")
        if cache not in CACHES:
            raise ValueError(f"cache is {cache!r}; allowed: {', '.join(CACHES)}")
        resolve_cache(cache, torch.device("cpu"))  # a bad $DIALOGUE_GYM_HF_CACHE fails before the weights load
        if isinstance(model, str):
            dev = resolve_device(device or "auto")
            resolve_dtype(dtype, dev)  # an unknown dtype fails before the weights load
            self.name = model
            self.model, self.tokenizer = load_model(model, dtype=dtype, device=dev)
        else:
            self.model, self.tokenizer = model
            self.name = getattr(self.model.config, "_name_or_path", "custom") or "custom"
            if device is not None:
                self.model.to(resolve_device(device))
        self.max_batch_size = max_batch_size or (256 if self.device.type == "cuda" else 32)
        self.cache = resolve_cache(cache, self.device)
        # static cache: the first call of each (rows, width, max_new_tokens) shape and its seconds (compilation
        # included on CUDA), in the order met
        self.compile_log: list[tuple[tuple[int, int, int], float]] = []
        if self.cache == "static":
            _allow_recompiles()
        self._rng = np.random.default_rng(seed)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.tokenizer.eos_token_id
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
        self.eos_ids = sorted(ids)
        self.tokens_generated = 0  # running count of sampled tokens, for benchmarks and budgets

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {"engine": "hf", "model": self.name}

    def close(self) -> None:
        """Nothing to release: the model is an ordinary module, freed with the engine."""

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int] | None = None,
                 return_logprobs: bool = False) -> list[Generation]:
        """Generate one continuation per prompt (see :class:`GenerationEngine`)."""
        if seeds is None:
            seeds = [int(s) for s in self._rng.integers(0, 2**63 - 1, size=len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        ids = prompts_token_ids(self.tokenizer, prompts)
        # Similar lengths share a batch (less padding); results go back in the caller's order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[Generation | None] = [None] * len(ids)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            outs = self._generate_batch([ids[i] for i in chunk], params, [int(seeds[i]) for i in chunk])
            for i, g in zip(chunk, outs):
                if not return_logprobs:
                    g.logprobs = None
                results[i] = g
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        from transformers import GenerationConfig, LogitsProcessorList

        n = len(batch)
        rows, row_seeds = list(batch), list(seeds)
        width = max(len(x) for x in batch)
        if self.cache == "static":  # a few shapes for the compiled graphs: pad rows and width to buckets
            n_rows, width = static_shape(n, width, self.max_batch_size)
            rows += [batch[0]] * (n_rows - n)
            row_seeds += [seeds[0]] * (n_rows - n)
        # Built on the host row by row, then moved to the model's device in one transfer each.
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, x in enumerate(rows):
            input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            attention[r, width - len(x) :] = 1
        device = self.device
        seed_t = None
        if params.temperature > 0:
            seed_t = torch.tensor([s % (2**63) for s in row_seeds], dtype=torch.long, device=device)
        sampler = RowSampler(params, seed_t, width)
        stop = sorted(set(self.eos_ids) | set(params.stop_token_ids))
        extra_cfg: dict[str, Any] = {"cache_implementation": "static"} if self.cache == "static" else {}
        config = GenerationConfig(do_sample=False, max_new_tokens=params.max_new_tokens, eos_token_id=stop,
                                  pad_token_id=self.pad_id, bos_token_id=self.tokenizer.bos_token_id, **extra_cfg)
        shape = (len(rows), width, params.max_new_tokens)
        first = self.cache == "static" and all(shape != s for s, _ in self.compile_log)
        t0 = time.perf_counter()
        with gqa_attention(self.model, device):
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                      generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        if first:
            seconds = time.perf_counter() - t0
            self.compile_log.append((shape, seconds))
            log.info("static KV cache: new shape %d rows x %d prompt tokens + %d new (shape %d of this engine); its "
                     "first generate took %.1f s%s", *shape, len(self.compile_log), seconds,
                     ", torch.compile included" if device.type == "cuda" else " (not compiled off CUDA)")
        new = out[:n, width:].cpu()  # (n, T_new): one transfer back to the host
        logps = torch.stack(sampler.logprobs, dim=1)[:n].cpu() if sampler.logprobs else torch.zeros(n, 0)
        gens = []
        stop_set = set(stop)
        for r in range(n):
            toks = new[r].tolist()
            end = next((j for j, t in enumerate(toks) if t in stop_set), None)
            finished = end is not None
            kept = toks[: end + 1] if finished else toks[: params.max_new_tokens]
            body = kept[:-1] if finished else kept
            self.tokens_generated += len(kept)
            gens.append(Generation(
                text=self.tokenizer.decode(body, skip_special_tokens=True),
                token_ids=kept,
                logprobs=logps[r, : len(kept)].tolist(),
                finished=finished,
                prompt_token_ids=list(batch[r]),
            ))
        return gens
