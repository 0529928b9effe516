"""The embedded default reward: a language model as a zero-shot judge.

The judge model reads the conversation and is asked to rate the assistant's last reply from 1 to 9 with one
digit. The score is the expected rating under the model's next-token distribution restricted to the nine digit
tokens: one batched forward pass, no sampling, deterministic. The forward runs on the HF model in this process, or
on a generation engine that scores next tokens (``engine=``: the in-process vLLM engine, or an OpenAI-compatible
server through :class:`~dialogue_gym.generation.openai.OpenAIEngine`), which return the same numbers up to float
rounding. With the 135M embedded model it separates good
from bad replies only weakly (see README); point ``model`` at a stronger model or use a trained reward model for
real work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dialogue_gym.conversation import Message
from dialogue_gym.generation.base import prompts_token_ids
from dialogue_gym.users.llm import render_dialogue

JUDGE_PROMPT = (
    "Here is a conversation between a user and an AI assistant.\n\n{dialogue}\n\n"
    "Rate the assistant's last reply for helpfulness, correctness and clarity on a scale from 1 (very poor) to "
    "9 (excellent). Answer with a single digit."
)


class LLMJudge:
    """Expected 1-9 rating of the last assistant reply, read from next-token probabilities.

    Args:
        model: model name for :func:`dialogue_gym.models.load_model`, or a ``(model, tokenizer)`` pair.
        max_batch_size: conversations per forward pass (default 16 on CPU, 256 on CUDA: one forward per GPU env
            step at N = 256).
        max_batch_tokens: padded tokens per forward pass (rows x longest prompt) at most, so wide batches of long
            prompts stay within memory: 131,072 is 256 prompts of 512 tokens.
        max_prompt_tokens: longer prompts are cut from the left of the dialogue (the instruction is kept).
        device: where a named model loads (``"auto"``: CUDA when available); a given pair stays where it is.
        dtype: weight dtype of a named model (``"auto"``: bfloat16 on CUDA, float32 on CPU); the rating is
            computed in fp64 from the digits' logits either way.
        engine: score through this engine instead of an HF model in this process: any object with a
            ``tokenizer``, ``describe()`` and ``next_token_logprobs(prompts, candidate_ids) -> (B, K)`` (VLLMEngine,
            OpenAIEngine); ``model`` is then only its name, and ``device``/``dtype`` are the engine's business.
    """

    def __init__(self, model: str | tuple[Any, Any] = "embedded", max_batch_size: int | None = None,
                 max_prompt_tokens: int = 2048, device: str = "auto", dtype: str | torch.dtype = "auto",
                 engine: Any = None, max_batch_tokens: int = 131072):
        self.engine = engine
        if engine is not None:
            self.name, self.model, self.tokenizer = str(model), None, engine.tokenizer
        elif isinstance(model, str):
            from dialogue_gym.models import load_model

            self.name = model
            self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)
        else:
            self.model, self.tokenizer = model
            self.name = "custom"
        on_cuda = self.model is not None and next(self.model.parameters()).device.type == "cuda"
        self.max_batch_size = max_batch_size or (256 if on_cuda else 16)
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
        self.max_batch_tokens = max_batch_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.digit_ids = []
        for d in "123456789":
            ids = self.tokenizer(d, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"the judge needs single-token digits; {d!r} tokenises to {ids}")
            self.digit_ids.append(ids[0])
        self.calls = 0  # batched score calls, for budgets and benchmarks

    def describe(self) -> dict[str, Any]:
        out = {"reward": "llm_judge", "model": self.name, "prompt": JUDGE_PROMPT}
        if self.engine is not None:
            out["engine"] = self.engine.describe()
        return out

    def prompt_ids(self, conversation: Sequence[Message]) -> list[int]:
        return self.prompts_ids([conversation])[0]

    def prompts_ids(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """The judge prompt's token ids for each conversation (tokenized in one batch), cut to
        ``max_prompt_tokens`` by keeping the start (instructions) and the end (the reply)."""
        msgs = [[{"role": "user", "content": JUDGE_PROMPT.format(dialogue=render_dialogue(c))}] for c in conversations]
        out = []
        for ids in prompts_token_ids(self.tokenizer, msgs):
            if len(ids) > self.max_prompt_tokens:
                head = self.max_prompt_tokens // 4
                ids = ids[:head] + ids[len(ids) - (self.max_prompt_tokens - head):]
            out.append(ids)
        return out

    @torch.inference_mode()
    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        self.calls += 1
        if self.engine is not None:
            return self._score_on_engine(conversations)
        scores = np.zeros(len(conversations), dtype=np.float64)
        prompts = self.prompts_ids(conversations)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        values = torch.arange(1, 10, dtype=torch.float64, device=device)
        digits = torch.tensor(self.digit_ids, dtype=torch.long, device=device)
        for chunk in self._chunks(order, prompts):
            width = max(len(prompts[i]) for i in chunk)
            # Built on the host (many small row copies), then moved to the model's device in one transfer.
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(chunk):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - len(prompts[i]):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=1,
                                use_cache=False).logits[:, -1, :]  # (no KV cache: one forward, nothing to reuse)
            probs = torch.softmax(logits[:, digits].double(), dim=-1)  # (B, 9) fp64 on the model's device
            expected = (probs * values).sum(-1).cpu()  # (B,)
            for r, i in enumerate(chunk):
                scores[i] = float(expected[r])
        return scores

    def _chunks(self, order: list[int], prompts: list[list[int]]) -> list[list[int]]:
        """Consecutive runs of ``order`` (sorted by length) of at most ``max_batch_size`` rows and at most
        ``max_batch_tokens`` padded tokens (rows x the run's longest prompt) each; a longer prompt goes alone."""
        chunks: list[list[int]] = []
        for i in order:  # ascending length: the newest row is the run's longest
            if chunks and len(chunks[-1]) < self.max_batch_size and \
                    (len(chunks[-1]) + 1) * len(prompts[i]) <= self.max_batch_tokens:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        return chunks

    def _score_on_engine(self, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        if getattr(self.engine, "token_prompts", True):
            prompts: list[Any] = self.prompts_ids(conversations)
        else:  # a chat-only server renders (and never cuts) the judge prompt itself
            prompts = [[{"role": "user", "content": JUDGE_PROMPT.format(dialogue=render_dialogue(c))}]
                       for c in conversations]
        logp = np.asarray(self.engine.next_token_logprobs(prompts, self.digit_ids), dtype=np.float64)  # (B, 9)
        if logp.shape != (len(conversations), 9):
            raise RuntimeError(f"the judge's engine returned log-probs of shape {logp.shape}, expected "
                               f"({len(conversations)}, 9)")
        top = logp.max(axis=1, keepdims=True)
        if not np.isfinite(top).all():
            raise RuntimeError("the judge's engine gave none of the digits 1-9 a probability for some conversation")
        weights = np.exp(logp - top)  # softmax over the nine digits (missing digits: weight 0)
        return (weights * np.arange(1, 10)).sum(axis=1) / weights.sum(axis=1)


def make_judge(config: Any) -> LLMJudge:
    """The LLM judge an env configuration (:class:`~dialogue_gym.core.EnvConfig`) asks for: its model on its
    engine (``config.judge_engine_spec()``).

    ``"hf"`` loads the model in this process; ``"vllm"`` and ``"openai"`` score on the process-wide engine that
    :func:`dialogue_gym.generation.make_engine` shares, so a judge on the user's model and engine adds no second
    engine (or server connection pool).
    """
    spec = getattr(config, "judge_engine_spec", None)  # a bare config with only ``model``: the HF judge on it
    placement = {"device": getattr(config, "device", "auto"), "dtype": getattr(config, "dtype", "auto")}
    kind, model, kwargs = spec() if spec is not None else ("hf", config.model, placement)
    if kind == "hf":
        return LLMJudge(model, device=kwargs["device"], dtype=kwargs["dtype"])
    from dialogue_gym.generation import make_engine

    return LLMJudge(model, engine=make_engine(kind, model, **kwargs))
