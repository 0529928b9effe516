"""The embedded default reward: a language model as a zero-shot judge.

The judge model reads the conversation and is asked to rate the assistant's last reply from 1 to 9 with one
digit. The score is the expected rating under the model's next-token distribution restricted to the nine digit
tokens: one batched forward pass, no sampling, deterministic. With the 135M embedded model it separates good
from bad replies only weakly (see README); point ``model`` at a stronger model or use a trained reward model for
real work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dialogue_gym.conversation import Message
from dialogue_gym.generation.base import prompt_token_ids
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
        max_batch_size: conversations per forward pass (default 16 on CPU, 64 on CUDA).
        max_prompt_tokens: longer prompts are cut from the left of the dialogue (the instruction is kept).
        device: where a named model loads (``"auto"``: CUDA when available); a given pair stays where it is.
        dtype: weight dtype of a named model (``"auto"``: bfloat16 on CUDA, float32 on CPU); the rating is
            computed in fp64 from the digits' logits either way.
    """

    def __init__(self, model: str | tuple[Any, Any] = "embedded", max_batch_size: int | None = None,
                 max_prompt_tokens: int = 2048, device: str = "auto", dtype: str | torch.dtype = "auto"):
        if isinstance(model, str):
            from dialogue_gym.models import load_model

            self.name = model
            self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)
        else:
            self.model, self.tokenizer = model
            self.name = "custom"
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        self.max_batch_size = max_batch_size or (64 if on_cuda else 16)
        self.max_prompt_tokens = max_prompt_tokens
        self.digit_ids = []
        for d in "123456789":
            ids = self.tokenizer(d, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"the judge needs single-token digits; {d!r} tokenises to {ids}")
            self.digit_ids.append(ids[0])
        self.calls = 0  # batched score calls, for budgets and benchmarks

    def describe(self) -> dict[str, Any]:
        return {"reward": "llm_judge", "model": self.name, "prompt": JUDGE_PROMPT}

    def prompt_ids(self, conversation: Sequence[Message]) -> list[int]:
        msgs = [{"role": "user", "content": JUDGE_PROMPT.format(dialogue=render_dialogue(conversation))}]
        ids = prompt_token_ids(self.tokenizer, msgs)
        if len(ids) > self.max_prompt_tokens:  # keep the start (instructions) and the end (the reply)
            head = self.max_prompt_tokens // 4
            ids = ids[:head] + ids[len(ids) - (self.max_prompt_tokens - head):]
        return ids

    @torch.inference_mode()
    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        self.calls += 1
        scores = np.zeros(len(conversations), dtype=np.float64)
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        values = torch.arange(1, 10, dtype=torch.float64, device=device)
        digits = torch.tensor(self.digit_ids, dtype=torch.long, device=device)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            width = max(len(prompts[i]) for i in chunk)
            # Built on the host (many small row copies), then moved to the model's device in one transfer.
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(chunk):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - len(prompts[i]):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=position_ids.to(device), logits_to_keep=1).logits[:, -1, :]
            probs = torch.softmax(logits[:, digits].double(), dim=-1)  # (B, 9) fp64 on the model's device
            expected = (probs * values).sum(-1).cpu()  # (B,)
            for r, i in enumerate(chunk):
                scores[i] = float(expected[r])
        return scores
