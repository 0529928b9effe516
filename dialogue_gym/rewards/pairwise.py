"""Pairwise preference reward: a causal LM asked "which reply is better, A or B?".

The prompt lays out the conversation context, reply A and reply B, and asks for one letter. The preference is
read from the next-token logits of the two letters only:

    P(A beats B) = pA / (pA + pB) = sigmoid(logit_A - logit_B)

Language models prefer one position; both orders are scored and averaged,

    P(a beats b) = ( P_[a,b](first) + P_[b,a](second) ) / 2,

which removes position bias and makes a reply compared with itself exactly 0.5 (a tie). One batched forward
pass scores both orders of every pair.

As an env reward it compares the last assistant reply with a reference reply from the task row's profile
(``profile["reference"]``) and returns P(reply beats reference) in [0, 1]. ``prefer`` is the leaderboard's
win-rate judge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dialogue_gym.conversation import DialogueError, Message
from dialogue_gym.generation.base import prompt_token_ids
from dialogue_gym.rewards.classifier import check_ends, choose_pad_id, pad_batch
from dialogue_gym.users.llm import render_dialogue

PAIRWISE_PROMPT = (
    "Here is a conversation between a user and an AI assistant, followed by two candidate replies for the "
    "assistant's next turn.\n\n{context}\n\n[Reply A]\n{reply_a}\n[End of reply A]\n\n[Reply B]\n{reply_b}\n"
    "[End of reply B]\n\nWhich reply is better: more helpful, correct and clear? Answer with a single letter, "
    "A or B."
)
LETTERS = ("A", "B")


def preference_from_logits(logit_a: torch.Tensor | np.ndarray | float,
                           logit_b: torch.Tensor | np.ndarray | float) -> np.ndarray:
    """P(A) = pA / (pA + pB) = sigmoid(logit_A - logit_B), elementwise (the softmax over the two letters)."""
    a = np.asarray(logit_a.detach().cpu() if isinstance(logit_a, torch.Tensor) else logit_a, dtype=np.float64)
    b = np.asarray(logit_b.detach().cpu() if isinstance(logit_b, torch.Tensor) else logit_b, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(b - a))


def average_orders(p_first_ab: np.ndarray, p_first_ba: np.ndarray) -> np.ndarray:
    """P(a beats b) from both orders.

    Args:
        p_first_ab: P("A") when a is shown as reply A and b as reply B, shape (N,).
        p_first_ba: P("A") when b is shown as reply A and a as reply B, shape (N,).

    Returns:
        ``(p_first_ab + (1 - p_first_ba)) / 2``, shape (N,).
    """
    # written as 0.5 + difference / 2 so that equal inputs give exactly 0.5
    return 0.5 + (np.asarray(p_first_ab, dtype=np.float64) - np.asarray(p_first_ba, dtype=np.float64)) / 2.0


def pairwise_prompt(context: Sequence[Message], reply_a: str, reply_b: str) -> list[Message]:
    """The judge prompt (one user message) for context + reply A + reply B."""
    return [{"role": "user", "content": PAIRWISE_PROMPT.format(context=render_dialogue(context),
                                                               reply_a=reply_a.strip(), reply_b=reply_b.strip())}]


def letter_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Ids of the single tokens "A" and "B" (an error when either is several tokens)."""
    out = []
    for letter in LETTERS:
        ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the pairwise model needs single-token letters; {letter!r} tokenises to {ids}")
        out.append(int(ids[0]))
    return out[0], out[1]


def truncate_prompt(ids: list[int], max_tokens: int) -> list[int]:
    """Keep the first quarter and the end of a too-long prompt (the instruction head and the replies + question)."""
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 4
    return ids[:head] + ids[len(ids) - (max_tokens - head):]


def pairwise_prompt_ids(tokenizer: Any, context: Sequence[Message], reply_a: str, reply_b: str,
                        max_tokens: int) -> list[int]:
    """Token ids of the judge prompt rendered with the chat template and the assistant generation prompt (the next
    token is the letter), cut to ``max_tokens`` by :func:`truncate_prompt`. Training uses the same ids."""
    return truncate_prompt(prompt_token_ids(tokenizer, pairwise_prompt(context, reply_a, reply_b)), max_tokens)


def next_letter_logits(model: Any, prompts: Sequence[Sequence[int]], letter_ids: tuple[int, int],
                       pad_id: int) -> torch.Tensor:
    """One forward pass over left-padded prompts -> the next-token logits of the two letters, (N, 2) fp32.

    Differentiable (the trainer calls it with gradients on).
    """
    device = next(model.parameters()).device
    ids, mask, pos = pad_batch(prompts, pad_id, side="left")
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   logits_to_keep=1).logits[:, -1, :]  # (N, V)
    return logits[:, list(letter_ids)].float()  # fp32 whatever the weights' dtype


class PairwisePreferenceReward:
    """A causal LM as a pairwise preference model (trained by ``agents.reward_model kind=pairwise``, or zero-shot).

    Args:
        model: a name for :func:`dialogue_gym.models.load_model` (``"embedded"``, ``"tiny"``, a directory, a hub
            id) or a ``(model, tokenizer)`` pair used as is.
        batch_size: prompts per forward pass (each pair is two prompts).
        max_prompt_tokens: longer prompts keep their first quarter and their end.
        reference_key: the profile field holding the reference reply the env reward compares against.
        device: where a named model loads (``"auto"``: CUDA when available); a given pair stays where it is.
        dtype: weight dtype of a named model (``"auto"``: bfloat16 on CUDA, float32 on CPU).
    """

    def __init__(self, model: str | tuple[Any, Any] = "embedded", batch_size: int = 8, max_prompt_tokens: int = 2048,
                 reference_key: str = "reference", device: str = "auto", dtype: str | torch.dtype = "auto"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(model, str):
            from dialogue_gym.models import load_model

            self.name = model
            self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)
        else:
            self.model, self.tokenizer = model
            self.name = "custom"
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.reference_key = reference_key
        self.letter_ids = letter_token_ids(self.tokenizer)
        self.pad_id = choose_pad_id(self.tokenizer, self.model)
        self.calls = 0  # batched calls, for budgets and benchmarks

    def describe(self) -> dict[str, Any]:
        return {"reward": "pairwise_preference", "model": self.name, "prompt": PAIRWISE_PROMPT,
                "reference_key": self.reference_key}

    def prompt_ids(self, context: Sequence[Message], reply_a: str, reply_b: str) -> list[int]:
        """Token ids of the prompt, ending with the assistant generation prompt (the next token is the letter)."""
        return pairwise_prompt_ids(self.tokenizer, context, reply_a, reply_b, self.max_prompt_tokens)

    @torch.inference_mode()
    def letter_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Next-token logits of "A" and "B" after each prompt: (N, 2), batched by length, left padded."""
        out = np.zeros((len(prompts), 2), dtype=np.float64)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logits = next_letter_logits(self.model, [prompts[i] for i in chunk], self.letter_ids, self.pad_id)
            out[chunk] = logits.double().cpu().numpy()
        return out

    def prefer(self, contexts: Sequence[Sequence[Message]], replies_a: Sequence[str],
               replies_b: Sequence[str]) -> np.ndarray:
        """P(reply a beats reply b) for each triple, both orders averaged: (N,) in [0, 1]; 0.5 is a tie.

        Args:
            contexts: conversations that end with the user message the replies answer.
            replies_a: first candidate replies.
            replies_b: second candidate replies.
        """
        n = len(contexts)
        if len(replies_a) != n or len(replies_b) != n:
            raise DialogueError(f"prefer needs one reply_a and one reply_b per context; got {n} contexts, "
                                f"{len(replies_a)} replies_a and {len(replies_b)} replies_b")
        for name, replies in (("replies_a", replies_a), ("replies_b", replies_b)):
            for i, r in enumerate(replies):
                if not isinstance(r, str) or not r.strip():
                    raise DialogueError(f"{name}[{i}] must be a non-blank string, got {r!r}")
        if n == 0:
            return np.zeros(0)
        self.calls += 1
        prompts = [self.prompt_ids(c, a, b) for c, a, b in zip(contexts, replies_a, replies_b)]
        prompts += [self.prompt_ids(c, b, a) for c, a, b in zip(contexts, replies_a, replies_b)]
        # Identical prompts (a reply compared with itself) are scored once, so a tie is exactly 0.5.
        unique: dict[tuple[int, ...], int] = {}
        slots = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        logits = self.letter_logits([list(p) for p in unique])[slots]  # (2N, 2)
        p_first = preference_from_logits(logits[:, 0], logits[:, 1])
        return average_orders(p_first[:n], p_first[n:])

    def _reference(self, profile: object, where: str) -> str:
        ref = profile.get(self.reference_key) if isinstance(profile, Mapping) else None
        if not isinstance(ref, str) or not ref.strip():
            raise DialogueError(
                f"{where}[{self.reference_key!r}] is missing or not a non-blank string ({ref!r:.60}); the pairwise "
                "reward needs a reference reply per task row (use a task whose rows carry one, put one in "
                "options['profile'], or use another reward)"
            )
        return ref

    def check_profile(self, profile: Mapping[str, Any]) -> None:
        self._reference(profile, "profile")

    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """P(last assistant reply beats ``profile[reference_key]``) for each conversation: (B,) in [0, 1]."""
        convs = check_ends(conversations)
        if profiles is None or len(profiles) != len(convs):
            raise DialogueError(
                f"the pairwise reward compares each reply with profile[{self.reference_key!r}]; it needs one "
                f"profile per conversation (got {None if profiles is None else len(profiles)} for {len(convs)})"
            )
        references = [self._reference(p, f"profiles[{i}]") for i, p in enumerate(profiles)]
        return self.prefer([c[:-1] for c in convs], [c[-1]["content"] for c in convs], references)
