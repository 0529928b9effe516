"""The testbed's vocabulary and its table policy: a real ``transformers`` model (a state decoder and a logit table
as LM head, registered with the Auto classes) with helpers to build, save and read it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# ----------------------------------------------------------------------------------------------- the vocabulary
REPLIES = ("ask", "guess", "answer")  # the canned replies, one token each
ASK, GUESS, ANSWER = range(3)
OPENING = "guess my number"
REVEAL = "it is seven"
USER_TEXTS = (OPENING, REVEAL, "i told you", "no", "you do not know it", "right")
SPECIAL = ("[PAD]", "[EOS]", "[UNK]", "<system>", "<user>", "<assistant>")
REVEAL_TOKEN = "seven"  # the one token that only the revealing user message holds
HORIZON = 2  # the task's max_turns
GUESS_CREDIT = 0.2  # the immediate reward of a (wrong) committed guess
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def vocabulary() -> list[str]:
    words = sorted({w for text in USER_TEXTS for w in text.split()} | set(REPLIES))
    return list(SPECIAL) + words


def build_tokenizer() -> Any:
    """A word-level fast tokenizer over the testbed's words, with the chat template the engines render."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]",
                                   additional_special_tokens=list(SPECIAL[3:]), chat_template=CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------- the policy
def decision_state(turn: int, known: bool) -> int:
    """Index of the decision state (assistant turn ``turn`` >= 1, number ``known``) in the table."""
    return 2 + 2 * (turn - 1) + int(known)


AFTER_REPLY, OTHER = 0, 1  # the table's non-decision states: right after a reply token, anywhere else
STATES = ((1, False), (2, False), (2, True))  # the reachable decision states (turn, number known), in table order


class TableConfig(PretrainedConfig):
    """Config of :class:`TablePolicy`: the token ids it reads and the table's size."""

    model_type = "dialogue_gym_testbed_table"

    def __init__(self, vocab_size: int = len(SPECIAL) + 1, reply_ids: Sequence[int] = (), assistant_id: int = 0,
                 reveal_id: int = 0, eos_id: int = 0, pad_id: int = 0, max_turns: int = HORIZON, **kwargs: Any):
        self.vocab_size = vocab_size
        self.reply_ids = list(reply_ids)
        self.assistant_id = assistant_id
        self.reveal_id = reveal_id
        self.eos_id = eos_id
        self.max_turns = max_turns
        self.num_states = 2 + 2 * max_turns
        kwargs.pop("num_states", None)
        kwargs.pop("hidden_size", None)
        self.hidden_size = self.num_states
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("pad_token_id", pad_id)
        kwargs.setdefault("eos_token_id", eos_id)
        super().__init__(**kwargs)


class StateDecoder(torch.nn.Module):
    """(B, T) token ids -> (B, T, S) one-hot code of the state each position is in (no parameters).

    A position holding ``<assistant>`` is the decision state (turns so far, number revealed so far); a reply token
    right after ``<assistant>`` is ``AFTER_REPLY``; any other position is ``OTHER``. Padding (attention 0) is
    never counted.
    """

    def __init__(self, config: TableConfig):
        super().__init__()
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> BaseModelOutputWithPast:
        c = self.config
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_asst = (input_ids == c.assistant_id) & real
        turn = is_asst.long().cumsum(-1)  # (B, T): assistant turns started up to t
        known = ((input_ids == c.reveal_id) & real).long().cummax(-1).values
        if bool((turn > c.max_turns).any()):
            raise ValueError(f"TablePolicy: a conversation has more than max_turns={c.max_turns} assistant turns")
        prev = torch.nn.functional.pad(input_ids[:, :-1], (1, 0), value=-1)
        is_reply = torch.isin(input_ids, torch.tensor(c.reply_ids, device=input_ids.device))
        state = torch.where(is_asst, 2 + 2 * (turn - 1) + known,
                            torch.where(is_reply & (prev == c.assistant_id) & real, AFTER_REPLY, OTHER))
        return BaseModelOutputWithPast(last_hidden_state=torch.nn.functional.one_hot(state, c.num_states).float())


class TableHead(torch.nn.Module):
    """(…, S) state code -> (…, V) logits: the learnable ``table`` (S, replies) on the reply tokens of decision
    states; after a reply (and elsewhere) all mass on the end-of-turn token."""

    def __init__(self, config: TableConfig):
        super().__init__()
        self.config = config
        self.table = torch.nn.Parameter(torch.zeros(config.num_states, len(config.reply_ids)))

    def full_table(self) -> torch.Tensor:
        """(S, V) logits per state: the table on the replies of decision states, -inf elsewhere; end of turn at 0
        in the non-decision states. (Built per call, not a buffer: ``from_pretrained`` leaves non-persistent
        buffers uninitialised.)"""
        c, dev = self.config, self.table.device
        replies = torch.tensor(c.reply_ids, device=dev)
        out = torch.full((c.num_states, c.vocab_size), float("-inf"), dtype=self.table.dtype, device=dev)
        out = out.index_copy(1, replies, torch.cat([torch.full_like(self.table[:2], float("-inf")),
                                                    self.table[2:]]))
        out[:2, c.eos_id] = 0.0
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, S) one-hot state codes -> (…, V) logits (a row lookup: a product with -inf entries would be NaN)."""
        return self.full_table()[hidden.argmax(-1)]


class TablePolicy(PreTrainedModel, GenerationMixin):
    """A tabular softmax policy over the canned replies, as a ``transformers`` causal LM (module docstring)."""

    config_class = TableConfig
    base_model_prefix = "testbed"

    def __init__(self, config: TableConfig):
        super().__init__(config)
        self.decoder = StateDecoder(config)
        self.head = TableHead(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)  # unused; PPO reads its width
        self.embed.weight.requires_grad_(False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # transformers' generate: no KV cache for this model
        return False

    def _init_weights(self, module: Any) -> None:  # the table is set by the testbed, never at random
        pass

    def get_decoder(self) -> StateDecoder:
        return self.decoder

    def get_output_embeddings(self) -> TableHead:
        return self.head

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
                ) -> CausalLMOutputWithPast:
        hidden = self.decoder(input_ids, attention_mask).last_hidden_state
        return CausalLMOutputWithPast(logits=self.head(hidden))

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **_: Any) -> dict[str, Any]:
        """No cache: the state is read off the whole prefix at every step (a reply is two tokens)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


with contextlib.suppress(ValueError):  # registered once per process
    AutoConfig.register(TableConfig.model_type, TableConfig)
    AutoModelForCausalLM.register(TableConfig, TablePolicy)


def make_policy(probs: dict[tuple[int, bool], Sequence[float]]) -> tuple[TablePolicy, Any]:
    """A table policy with ``pi(reply | turn, known) = probs[(turn, known)]`` (ask, guess, answer) and its tokenizer.
    States not given are uniform."""
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = TableConfig(vocab_size=len(tokenizer), reply_ids=[ids(r) for r in REPLIES],
                         assistant_id=ids("<assistant>"), reveal_id=ids(REVEAL_TOKEN), eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id)
    model = TablePolicy(config)
    with torch.no_grad():
        for key, p in probs.items():
            p = np.asarray(p, dtype=np.float64)
            if p.shape != (len(REPLIES),) or (p <= 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-9):
                raise ValueError(f"probs[{key}] must be {len(REPLIES)} positive probabilities summing to 1, got {p}")
            model.head.table[decision_state(*key)] = torch.tensor(np.log(p), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def save_policy(model: TablePolicy, tokenizer: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def log_policy(model: Any) -> np.ndarray:
    """(states, replies) ``log pi(reply | s)`` of the reachable decision states (:data:`STATES`), by forward passes
    of the model on the canned conversations (so a policy loaded from a directory, e.g. an agent's exported one, is
    read through its own code)."""
    from agents.common.batching import Reply, reply_logprobs

    tokenizer = build_tokenizer()
    out = np.zeros((len(STATES), len(REPLIES)))
    for i, (h, known) in enumerate(STATES):
        messages = conversation_to(h, known)
        prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        replies = [Reply(prompt, [tokenizer.convert_tokens_to_ids(r), tokenizer.eos_token_id], r) for r in REPLIES]
        with torch.no_grad():
            out[i] = reply_logprobs(model, replies, tokenizer.pad_token_id).double().cpu().numpy()
    return out


def conversation_to(turn: int, known: bool) -> list[dict[str, str]]:
    """A conversation that ends at decision state (turn, known): asks once first if known, else guesses."""
    messages = [{"role": "user", "content": OPENING}]
    for t in range(1, turn):
        reveal = known and t == 1
        messages += [{"role": "assistant", "content": "ask" if reveal else "guess"},
                     {"role": "user", "content": REVEAL if reveal else "no"}]
    return messages


