"""The generation-engine interface shared by simulated users, LLM judges and agents' policies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard, runtime_checkable

from dialogue_gym.conversation import Message

# A prompt is either a chat conversation (rendered with the engine's chat template, generation prompt added)
# or a list of token ids used exactly as given.
Prompt = Sequence[Message] | Sequence[int]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one generate call.

    Attributes:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0 keeps the full distribution).
        max_new_tokens: cap on generated tokens per prompt.
        stop_token_ids: extra token ids that end a generation (the tokenizer's EOS always does).
    """

    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")


@dataclass
class Generation:
    """One generated continuation.

    Attributes:
        text: decoded text without the stop token.
        token_ids: the sampled ids, including the stop token when one was produced.
        logprobs: per-token log-probabilities of ``token_ids`` under the temperature-scaled distribution
            (logits / temperature, full vocabulary, before top-p), when requested.
        finished: True when generation ended on a stop token, False when it hit ``max_new_tokens``.
        prompt_token_ids: the prompt ids the engine actually used.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finished: bool = True
    prompt_token_ids: list[int] = field(default_factory=list)


@runtime_checkable
class GenerationEngine(Protocol):
    """Batched text generation: every method and attribute that the env, the agents and the benchmarks use.

    ``seeds`` gives each prompt its own random stream, so a row's output does not depend on which other rows
    share the batch (engines document where that guarantee is weaker). Implemented by
    :class:`~dialogue_gym.generation.hf.HFEngine`, :class:`~dialogue_gym.generation.vllm.VLLMEngine`,
    :class:`~dialogue_gym.generation.openai.OpenAIEngine` and the agents' vLLM policy engine.

    Attributes:
        tokenizer: the model's Hugging Face tokenizer (chat template, token counts).
        tokens_generated: running count of sampled tokens, for benchmarks and budgets.
    """

    tokenizer: Any
    tokens_generated: int

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
        return_logprobs: bool = False,
    ) -> list[Generation]:
        """One :class:`Generation` per prompt (chat messages or token ids), in order."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the engine serves (backend, model), for fingerprints and logs."""
        ...

    def close(self) -> None:
        """Release what the engine holds (processes, connections); a no-op where nothing needs releasing."""
        ...


def check_generate_args(prompts: Any, params: object, seeds: Sequence[int] | None) -> None:
    """The argument checks every engine's ``generate`` shares.

    Raises:
        TypeError: ``params`` is not a :class:`SamplingParams`, or ``prompts`` is a single prompt.
        ValueError: the number of seeds does not match the prompts.
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a dialogue_gym SamplingParams, got {type(params).__name__}")
    if isinstance(prompts, (str, dict)):
        raise TypeError("prompts must be a list of prompts (chat conversations or token-id lists), got a "
                        f"single {type(prompts).__name__}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")


def is_token_prompt(prompt: Prompt) -> TypeGuard[Sequence[int]]:
    """True for a token-id prompt, False for a chat conversation."""
    return len(prompt) > 0 and not isinstance(prompt[0], dict)


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: a chat conversation rendered with the chat template (generation prompt added), or
    a token-id list taken as is."""
    return prompts_token_ids(tokenizer, [prompt])[0]


def prompts_token_ids(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """:func:`prompt_token_ids` of many prompts, the chat ones tokenized in one batched call (the fast tokenizer
    encodes a batch on all cores; one call per prompt cost ~0.45 ms each: with the user's and the judge's 256
    prompts, about a quarter of a GPU env step at N = 256)."""
    out: list[list[int]] = [[] for _ in prompts]  # every entry is filled below
    chat, texts = [], []
    for i, p in enumerate(prompts):
        if is_token_prompt(p):
            out[i] = [int(t) for t in p]
        else:
            chat.append(i)
            texts.append(tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True))
    if texts:
        for i, ids in zip(chat, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            out[i] = list(ids)
    return out
