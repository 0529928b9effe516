"""Sequence-classifier reward models (Bradley-Terry RMs): one scalar read at the end of the conversation.

A Bradley-Terry reward model is a transformer with a one-output linear head. The score of a conversation is the
head's output at the **last non-pad token** of the chat-templated conversation: the end-of-turn token of the last
assistant reply (trailing whitespace after it is dropped).

Padding: transformers' sequence-classification models find "the last non-pad token" by comparing input ids with
``config.pad_token_id``. Many chat tokenizers use the end-of-sequence token as padding (SmolLM2: ``<|im_end|>``),
which is also the end-of-turn token; the read-out then slides off the end of the reply (older transformers
versions even stopped at the *first* ``<|im_end|>``, inside the shared context, so chosen and rejected scored the
same). Here padding always uses a token id distinct from every EOS id (see :func:`choose_pad_id`), the model's
``pad_token_id`` is set to it, and every sequence is checked to end on a non-pad token, so the read-out position
is exactly the last real token, with right or left padding.

Long conversations are truncated from the left (the end, which holds the reply being judged, is always kept).
The same rendering (:func:`conversation_token_ids`) is used when training (``agents.reward_model``) and when
serving, so a trained model scores exactly what it was trained on.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dialogue_gym.conversation import DialogueError, Message, validate_messages

PADDING_SIDES = ("right", "left")


def eos_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the model's (generation) config EOS ids."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    if model is not None:
        sources.append(getattr(getattr(model, "config", None), "eos_token_id", None))
        gen = getattr(model, "generation_config", None)
        sources.append(getattr(gen, "eos_token_id", None) if gen is not None else None)
    for s in sources:
        if isinstance(s, (list, tuple)):
            ids |= {int(x) for x in s}
        elif s is not None:
            ids.add(int(s))
    return ids


def choose_pad_id(tokenizer: Any, model: Any = None) -> int:
    """A padding token id distinct from every EOS id.

    Preference order: the tokenizer's pad token, the model config's ``pad_token_id``, the tokenizer's unknown
    token, then the lowest special-token id that is not an EOS id (they are never produced by plain text).

    Raises:
        ValueError: no such token exists (add a dedicated pad token to the tokenizer and resize the model).
    """
    eos = eos_token_ids(tokenizer, model)
    candidates = [getattr(tokenizer, "pad_token_id", None)]
    if model is not None:
        candidates.append(getattr(getattr(model, "config", None), "pad_token_id", None))
    candidates.append(getattr(tokenizer, "unk_token_id", None))
    candidates += sorted(getattr(tokenizer, "all_special_ids", []) or [])
    for c in candidates:
        if isinstance(c, int) and c >= 0 and c not in eos:
            return c
    raise ValueError(
        f"the tokenizer has no token usable as padding distinct from its EOS id(s) {sorted(eos)}; add one "
        "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and model.resize_token_embeddings(len(tokenizer)))"
    )


def conversation_token_ids(tokenizer: Any, messages: Sequence[Message], max_length: int) -> list[int]:
    """Token ids of a whole conversation as a reward model reads it.

    The conversation is rendered with the tokenizer's chat template (no generation prompt), trailing whitespace is
    dropped so the last token is the end-of-turn token of the last message, and the ids are truncated from the
    left to ``max_length``.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
    ids = list(tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"])
    return ids[-max_length:]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, ...]:
    """Pad id lists into ``(input_ids, attention_mask, position_ids)``, each (B, T), padding on ``side``.

    Position ids count real tokens only (0 at each sequence's first real token), so left padding leaves every
    token's position unchanged.
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side is {side!r}; allowed: {', '.join(PADDING_SIDES)}")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_batch needs a non-empty list of non-empty sequences")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[r, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, cols] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, from the attention mask (B, T) -> (B,); any padding side."""
    t = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (t * attention_mask.long()).argmax(-1)


def check_ends(conversations: Sequence[Any], where: str = "conversations") -> list[list[Message]]:
    """Validate conversations for scoring: each a valid conversation whose last message is the assistant's."""
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise DialogueError(f"{where} must be a list of conversations, got {type(conversations).__name__}")
    out = []
    for i, c in enumerate(conversations):
        msgs = validate_messages(c, f"{where}[{i}]")
        if msgs[-1]["role"] != "assistant":
            raise DialogueError(f"{where}[{i}] ends with a {msgs[-1]['role']!r} message; a reward model scores "
                                "conversations that end with an assistant reply")
        out.append(msgs)
    return out


class SequenceClassifierReward:
    """Any ``AutoModelForSequenceClassification`` with one output, as a batched env reward.

    Args:
        path_or_id: a ``save_pretrained`` directory, a hub id, or a ``(model, tokenizer)`` pair used as is (e.g.
            a reward model being trained).
        trust_remote_code: allow the model's own code from the hub (only when asked: it runs foreign code).
        max_length: conversations longer than this many tokens are cut from the left.
        batch_size: conversations per forward pass (similar lengths are batched together).
        padding_side: ``"right"`` or ``"left"``; both read the same position.
        device: torch device; default (None or ``"auto"``): a loaded model goes to CUDA when available (else
            CPU), a given ``(model, tokenizer)`` pair stays where it is.
        dtype: weight dtype when loading: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), a name or a torch
            dtype. Scores are computed in fp32 from the model's last layer.
    """

    def __init__(self, path_or_id: str | Path | tuple[Any, Any], trust_remote_code: bool = False,
                 max_length: int = 2048, batch_size: int = 16, padding_side: str = "right",
                 device: str | None = None, dtype: str | torch.dtype = "auto"):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side is {padding_side!r}; allowed: {', '.join(PADDING_SIDES)}")
        from dialogue_gym.models import resolve_device, resolve_dtype

        if device == "auto":
            device = None
        if isinstance(path_or_id, tuple):
            self.model, self.tokenizer = path_or_id
            self.name = "custom"
        else:
            self.name = str(path_or_id)
            target = resolve_device(device)  # checked before the weights load
            self.model, self.tokenizer = load_classifier(self.name, trust_remote_code=trust_remote_code,
                                                         dtype=resolve_dtype(dtype, target))
            self.model.to(target)
        n = getattr(self.model.config, "num_labels", None)
        if n != 1:
            raise ValueError(f"a reward model needs a classifier with one output (num_labels=1); {self.name!r} "
                             f"has num_labels={n}")
        if device is not None:
            self.model.to(resolve_device(device))
        self.model.eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.pad_id = choose_pad_id(self.tokenizer, self.model)
        # transformers reads at the rightmost token that is not config.pad_token_id: make that our pad id.
        self.model.config.get_text_config().pad_token_id = self.pad_id
        self.model.config.pad_token_id = self.pad_id
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self.calls = 0  # batched score calls, for budgets and benchmarks

    def describe(self) -> dict[str, Any]:
        return {"reward": "sequence_classifier", "model": self.name, "max_length": self.max_length}

    def token_ids(self, conversation: Sequence[Message]) -> list[int]:
        """The ids the model reads for one conversation (chat template, left-truncated)."""
        ids = conversation_token_ids(self.tokenizer, conversation, self.max_length)
        if ids[-1] == self.pad_id:
            raise DialogueError(f"the conversation's last token is the padding token (id {self.pad_id}); the "
                                "read-out position would be lost")
        return ids

    @torch.inference_mode()
    def score(self, conversations: Sequence[Sequence[Message]],
              profiles: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """Scores (B,) of conversations that each end with an assistant reply (``profiles`` is unused)."""
        self.calls += 1
        convs = check_ends(conversations)
        return self.score_ids([self.token_ids(c) for c in convs])

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores (B,) of already-tokenised sequences, batched by length."""
        out = np.zeros(len(sequences), dtype=np.float64)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            values = classifier_forward(self.model, [sequences[i] for i in chunk], self.pad_id, self.padding_side,
                                        self._takes_positions, device)
            out[chunk] = values.double().cpu().numpy()
        return out


def classifier_forward(model: Any, sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                       pass_positions: bool = True, device: Any = None) -> torch.Tensor:
    """One forward pass of a one-output classifier over a padded batch -> fp32 scores (B,) (differentiable).

    ``model.config.pad_token_id`` must equal ``pad_id`` and no sequence may end with ``pad_id``; then the
    model's own pooling reads at each sequence's last real token.
    """
    if getattr(model.config, "pad_token_id", None) != pad_id:
        raise ValueError(f"model.config.pad_token_id is {model.config.pad_token_id!r}; it must be the padding id "
                         f"{pad_id} so the read-out lands on the last real token")
    bad = [i for i, s in enumerate(sequences) if s[-1] == pad_id]
    if bad:
        raise ValueError(f"sequences {bad} end with the padding id {pad_id}; the read-out position would be lost")
    ids, mask, pos = pad_batch(sequences, pad_id, side)
    if device is None:
        device = next(model.parameters()).device
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if pass_positions:
        kwargs["position_ids"] = pos.to(device)
    return model(**kwargs).logits[:, 0].float()  # (B,) fp32 whatever the weights' dtype


def load_classifier(path_or_id: str, trust_remote_code: bool = False,
                    dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` of a sequence classifier from a directory or a hub id (clear errors)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dialogue_gym.models import load_pretrained, resolve_source

    source = resolve_source(path_or_id)
    kwargs: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    tokenizer = load_pretrained(AutoTokenizer, source, path_or_id, **kwargs)
    model = load_pretrained(AutoModelForSequenceClassification, source, path_or_id, dtype=dtype, **kwargs)
    return model, tokenizer


def is_classifier_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory whose config names a ``...ForSequenceClassification`` architecture."""
    import json

    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)
