"""Batched generation with HF transformers: left padding, one long-lived model, per-row seeded sampling.

Sampling runs inside ``model.generate`` (KV cache, padding, stopping all transformers' own) through a logits
processor that draws each row's token from that row's own ``torch.Generator`` and then hands ``generate`` a
one-hot score, so greedy selection picks the drawn token. Consequences:

- a row's sample depends only on its prompt and its seed, not on which rows share the batch (up to float
  rounding differences that left padding introduces), so a vector env equals N single envs and forks are
  reproducible;
- the log-probability of every sampled token under ``logits / temperature`` comes for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dialogue_gym.generation.base import Generation, Prompt, SamplingParams, prompt_token_ids


class _RowSampler:
    """A logits processor that samples row i with generator i and records the sampled token's log-prob."""

    def __init__(self, params: SamplingParams, generators: list[torch.Generator] | None, prompt_len: int):
        self.params = params
        self.generators = generators
        self.prompt_len = prompt_len
        self.logprobs: list[torch.Tensor] = []  # one (B,) tensor per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()  # (B, V)
        if self.params.temperature == 0:
            chosen = scores.argmax(dim=-1)
            logp = torch.log_softmax(scores, dim=-1)
        else:
            logp = torch.log_softmax(scores / self.params.temperature, dim=-1)
            probs = logp.exp()
            if self.params.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # keep the smallest prefix whose mass reaches top_p (the first token always stays)
                drop = sorted_p.cumsum(dim=-1) - sorted_p >= self.params.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            assert self.generators is not None
            chosen = torch.stack(
                [torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(self.generators)]
            )
        self.logprobs.append(logp.gather(-1, chosen[:, None])[:, 0])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen[:, None], 0.0)
        return out


class HFEngine:
    """A generation engine on an HF transformers causal LM.

    Args:
        model: a model name for :func:`dialogue_gym.models.load_model` (``"embedded"``, ``"tiny"``, a path,
            a hub id) or a ``(model, tokenizer)`` pair to use as is (e.g. a policy being trained).
        device: torch device; default the model's own.
        max_batch_size: prompts per forward batch; larger batches are split.
        seed: seeds the engine's own stream, used for rows that come without a seed.
    """

    def __init__(self, model: str | tuple[Any, Any] = "embedded", device: str | None = None,
                 max_batch_size: int = 32, seed: int = 0):
        if isinstance(model, str):
            from dialogue_gym.models import load_model

            self.name = model
            self.model, self.tokenizer = load_model(model)
        else:
            self.model, self.tokenizer = model
            self.name = getattr(self.model.config, "_name_or_path", "custom") or "custom"
        if device is not None:
            self.model.to(device)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
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

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, seeds: Sequence[int] | None = None,
                 return_logprobs: bool = False) -> list[Generation]:
        """Generate one continuation per prompt (see :class:`GenerationEngine`)."""
        if seeds is None:
            seeds = [int(s) for s in self._rng.integers(0, 2**63 - 1, size=len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        # Similar lengths share a batch (less padding); results go back in the caller's order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[Generation | None] = [None] * len(ids)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            outs = self._generate_batch([ids[i] for i in chunk], params, [seeds[i] for i in chunk])
            for i, g in zip(chunk, outs):
                if not return_logprobs:
                    g.logprobs = None
                results[i] = g
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            attention[r, width - len(x) :] = 1
        generators = None
        if params.temperature > 0:
            generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        sampler = _RowSampler(params, generators, width)
        stop = sorted(set(self.eos_ids) | set(params.stop_token_ids))
        config = GenerationConfig(do_sample=False, max_new_tokens=params.max_new_tokens, eos_token_id=stop,
                                  pad_token_id=self.pad_id, bos_token_id=self.tokenizer.bos_token_id)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                  generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        new = out[:, width:].cpu()  # (B, T_new)
        logps = torch.stack(sampler.logprobs, dim=1).cpu() if sampler.logprobs else torch.zeros(len(batch), 0)
        gens = []
        stop_set = set(stop)
        for r in range(len(batch)):
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
