"""An exact testbed for the algorithms: a table policy over canned replies, a tiny clarify-shaped task, the closed
form of each agent's update, and a harness that runs the agents' own ``run(cfg)`` on them.

Why a table policy dressed as a language model. The agents take a policy by name (``policy.model``), sample it
through the :class:`~dialogue_gym.generation.hf.HFEngine` (``transformers``' ``generate``), and train it through
:mod:`agents.common.logprobs` (the model's ``get_decoder()`` and ``get_output_embeddings()``). So the testbed's
policy is a real ``transformers`` model (:class:`TablePolicy`, registered with the Auto classes and saved to a
directory) with a real fast tokenizer (a word-level ``tokenizers`` model with a chat template): every agent loads,
samples, scores and trains it exactly as it would SmolLM2, with no change to agent code. Inside, the "decoder"
reads two features of the conversation so far off the token ids -- the assistant turn ``h`` and whether the user
has revealed the number -- and outputs their one-hot code; the "LM head" is a learnable logit table indexed by that
state, restricted to the three canned replies (one token each), and after a reply it puts all mass on the
end-of-turn token. So ``log pi(reply | s)`` is ``table[s, reply] - logsumexp(table[s, :])``: a tabular softmax
policy, whose every update the closed forms below predict exactly.

The task (``task=testbed``, H = 2 assistant turns). The user thinks of a number and opens with "guess my number".
The canned replies are ``ask``, ``guess`` (a committed wrong guess) and ``answer`` (states the number the user gave).

- ``ask``: the user reveals the number ("it is seven"; ``known`` from then on), or says "i told you" if known;
- ``guess``: the user says "no";
- ``answer``: right when the number is known (the user ends the conversation), "you do not know it" otherwise.

The reward of a conversation is the score of its last reply: 1 for ``answer`` when the number is known, ``G`` =
0.2 for ``guess`` (a judge that likes committed answers gives partial credit), 0 otherwise. So at turn 1 the
immediate reward prefers guessing, and the return prefers asking: the clarify task's trap, with exact numbers.

The closed forms (exact, from the initial table pi_0; :class:`Testbed` computes them by enumeration over the MDP):

- ``r(s, a)``: immediate reward; ``Q_H'(s, a)``: the return of reply ``a`` at ``s`` with the dialogue completed by
  pi_0 to absolute turn ``H'``; REFUEL's branch target at turn ``h`` is ``Q_H'`` with ``H'`` drawn given ``h``
  (reference sampling: ``P(H' | h)`` proportional to ``1/H'`` for ``H' >= h``; uniform: ``H' = H``).
- REFUEL / REBEL (exact regression fit): the least-squares fit of ``(delta_a - delta_b)`` onto
  ``eta * (y_a - y_b)`` over pairs at each state, where ``delta = log pi_new - log pi_0``, is unbiased for
  ``delta(s, a) = eta * E[y | s, a] + c(s)`` (mirror descent), with ``y`` REFUEL's branch target or REBEL's
  immediate reward.
- Online DPO (immediate reward, exact fit of the cDPO loss with label smoothing ``eps``): at a state where every
  pair prefers the same reply ``w`` to each other reply ``l``, ``beta * (delta_w - delta_l) = log((1 - eps) /
  eps)`` for every ``l`` that appears; where the pair types cannot all be met (answer > guess > ask), the exact
  minimiser of the loss over the pair types in their exact proportions (:func:`cdpo_optimum`).
- PPO (one full-batch step, gamma = lambda = 1, value head at 0, no KL): the expected policy gradient on
  ``table[s, b]`` is ``d(s) pi_0(b|s) (Q(s, b) - V(s))`` (whitening shifts by a constant, whose expectation
  vanishes, and scales by a positive one), and AdamW's first step (zero moments, beta1 = 0) moves each entry by
  exactly ``lr`` in its gradient's sign: ``delta table[s, b] = lr * sign(Q(s, b) - V(s))``.

Where it runs: ``tests/test_testbed.py`` (the default suite, about 20 s of CPU) and ``python -m benchmarks.testbed``
(the table of closed forms against trained tables, ``benchmarks/results/testbed.md``). Importing this module
registers the task as ``task=testbed`` and the policy's architecture with ``transformers``' Auto classes.

Adding an agent: an :class:`Arm` (its ``run``, its config on the testbed, and the :class:`Check` of its closed
form) and an entry in :func:`default_arms`; see ``docs/testbed.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from dialogue_gym.tasks import TASKS
from dialogue_gym.tasks.base import TaskRow
from dialogue_gym.users.base import UserTurn

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


# ----------------------------------------------------------------------------------------------- the task
def is_known(conversation: Sequence[dict[str, str]]) -> bool:
    return any(m["role"] == "user" and m["content"] == REVEAL for m in conversation)


class TestbedUser:
    """The scripted user of the testbed task (module docstring); deterministic."""

    def describe(self) -> dict[str, Any]:
        return {"user": "testbed"}

    def respond(self, conversations: Sequence[Sequence[dict[str, str]]], profiles: Sequence[Any],
                seeds: Sequence[int]) -> list[UserTurn]:
        out = []
        for conv in conversations:
            reply, known = conv[-1]["content"], is_known(conv[:-1])
            if reply not in REPLIES:
                raise ValueError(f"the testbed user got the reply {reply!r}; allowed: {', '.join(REPLIES)}")
            if reply == "ask":
                out.append(UserTurn("i told you" if known else REVEAL))
            elif reply == "guess":
                out.append(UserTurn("no"))
            else:
                out.append(UserTurn("right", done=True) if known else UserTurn("you do not know it"))
        return out


class TestbedReward:
    """The score of a conversation: its last reply's (1 for a known answer, GUESS_CREDIT for a guess, else 0).

    Args:
        verifier: score only whether the task is solved (1 for a known answer, else 0): the env's verifier, which
            ends a dialogue solved at its last turn as ``terminated``.
    """

    def __init__(self, verifier: bool = False):
        self.verifier = verifier

    def describe(self) -> dict[str, Any]:
        return {"reward": "testbed", "guess_credit": 0.0 if self.verifier else GUESS_CREDIT}

    def score(self, conversations: Sequence[Sequence[dict[str, str]]], profiles: Any = None) -> np.ndarray:
        scores = [reward(REPLIES.index(c[-1]["content"]), is_known(c[:-1])) for c in conversations]
        return np.array([float(x == 1.0) for x in scores] if self.verifier else scores)


def reward(reply: int, known: bool) -> float:
    return 1.0 if reply == ANSWER and known else GUESS_CREDIT if reply == GUESS else 0.0


class TestbedTask:
    """``task=testbed``: the same opening in every row (``rows`` per split), the testbed user and reward."""

    __test__ = False  # not a pytest class
    name = "testbed"
    default_user = "testbed"
    default_reward = "testbed"

    def __init__(self, rows: int = 8):
        self.n = int(rows)

    def rows(self, split: str = "train") -> list[TaskRow]:
        return [TaskRow(id=f"testbed-{split}-{i}", messages=[{"role": "user", "content": OPENING}])
                for i in range(self.n)]

    def make_user(self, spec: str, engine: Any) -> Any:
        return TestbedUser() if spec == "testbed" else None

    def make_reward(self, spec: str) -> Any:
        return TestbedReward() if spec == "testbed" else TestbedReward(verifier=True) if spec == "verifier" else None

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "rows": self.n}


TestbedUser.__test__ = False  # type: ignore[attr-defined]
TestbedReward.__test__ = False  # type: ignore[attr-defined]
TASKS.setdefault("testbed", TestbedTask)  # so an agent's EnvSettings can name it (task=testbed)


# ----------------------------------------------------------------------------------------------- closed forms
def horizon_weights(h: int, turn_sampling: str, max_turns: int = HORIZON) -> dict[int, float]:
    """``P(H' | h)``: REFUEL's rollout horizon given the branch turn (agents.common.pairs.sample_turn).

    reference: ``H' ~ U{1..H}``, ``h ~ U{1..H'}``, so ``P(H', h) = 1 / (H H')`` and ``P(H' | h)`` is proportional to
    ``1 / H'`` over ``H' = h..H``. uniform: ``H' = H``.
    """
    if turn_sampling == "uniform":
        return {max_turns: 1.0}
    if turn_sampling != "reference":
        raise ValueError(f"turn_sampling is {turn_sampling!r}; allowed: reference, uniform")
    w = {hp: 1.0 / hp for hp in range(h, max_turns + 1)}
    total = sum(w.values())
    return {hp: v / total for hp, v in w.items()}


@dataclass
class Testbed:
    """The testbed's MDP under the initial policy ``pi0`` (states x replies probabilities, :data:`STATES` order).

    Every closed form the checks compare with is computed here by exact enumeration (no sampling).
    """

    __test__ = False
    pi0: np.ndarray
    max_turns: int = HORIZON

    def index(self, h: int, known: bool) -> int:
        return STATES.index((h, known))

    def q(self, h: int, known: bool, reply: int, horizon: int) -> float:
        """``Q_H'((h, known), reply)``: the final score when the dialogue goes on with pi0 to absolute turn H'."""
        if h >= horizon or (reply == ANSWER and known):  # the branch ends here (horizon, or the user ends it)
            return reward(reply, known)
        nxt = known or reply == ASK
        return float(sum(self.pi0[self.index(h + 1, nxt), b] * self.q(h + 1, nxt, b, horizon)
                         for b in range(len(REPLIES))))

    def immediate(self) -> np.ndarray:
        """(states, replies) ``r(s, a)``: the score of the conversation ending with the reply (REBEL's target)."""
        return np.array([[reward(a, k) for a in range(len(REPLIES))] for _, k in STATES])

    def refuel_target(self, turn_sampling: str) -> np.ndarray:
        """(states, replies) ``E[Q_hat | s, a] = sum_H' P(H' | h) Q_H'(s, a)``: REFUEL's regression target."""
        return np.array([[sum(w * self.q(h, k, a, hp) for hp, w in horizon_weights(h, turn_sampling,
                                                                                    self.max_turns).items())
                          for a in range(len(REPLIES))] for h, k in STATES])

    def q_table(self) -> np.ndarray:
        """(states, replies) ``Q(s, a)``: the return over the whole horizon H under pi0."""
        return np.array([[self.q(h, k, a, self.max_turns) for a in range(len(REPLIES))] for h, k in STATES])

    def advantage(self, turn_sampling: str = "uniform") -> np.ndarray:
        """(states, replies) ``A(s, a) = y(s, a) - sum_b pi0(b|s) y(s, b)`` with ``y`` REFUEL's target for this turn
        sampling: ``uniform`` gives ``Q(s, a) - V(s)`` over the whole horizon (PPO's, and a whole-dialogue
        credit's, expected advantage); ``reference`` the advantage of returns completed to a drawn H' (a
        turn-level credit through forks with REFUEL's turn sampling)."""
        y = self.refuel_target(turn_sampling)
        return y - (self.pi0 * y).sum(-1, keepdims=True)

    def pair_frequencies(self, n: int) -> list[dict[tuple[int, int], float]]:
        """Per state, ``P(pair = (best, worst))`` of n replies drawn from pi0 and ranked by immediate reward (the
        first of equal best / worst wins; all equal: no pair), by enumerating the ``3**n`` draws."""
        out = []
        r = self.immediate()
        for i in range(len(STATES)):
            freq: dict[tuple[int, int], float] = {}
            for draw in itertools.product(range(len(REPLIES)), repeat=n):
                scores = [r[i, a] for a in draw]
                best = draw[max(range(n), key=lambda j: (scores[j], -j))]
                worst = draw[min(range(n), key=lambda j: (scores[j], j))]
                if max(scores) > min(scores):
                    freq[(best, worst)] = freq.get((best, worst), 0.0) + float(np.prod(self.pi0[i, list(draw)]))
            out.append(freq)
        return out


def centred(x: np.ndarray) -> np.ndarray:
    """Subtract each state's mean over replies: the part of a log-prob change that is not the constant ``c(s)``."""
    return x - x.mean(-1, keepdims=True)


def cdpo_optimum(freq: dict[tuple[int, int], float], beta: float, eps: float) -> np.ndarray:
    """(replies,) centred ``delta`` minimising ``sum f_wl * [-(1 - eps) log sig(x) - eps log sig(-x)]`` with ``x =
    beta (delta_w - delta_l)``: the exact fit of the cDPO loss to pairs in these proportions (Newton's method on
    this convex function of two free differences; replies in no pair keep 0)."""
    a = len(REPLIES)
    d = np.zeros(a)
    for _ in range(100):
        grad, hess = np.zeros(a), np.zeros((a, a))
        for (w, lo), f in freq.items():
            x = beta * (d[w] - d[lo])
            s = 1.0 / (1.0 + math.exp(-x))
            g = f * beta * (s - (1.0 - eps))  # d/dx of the smoothed loss, times beta
            e = np.zeros(a)
            e[w], e[lo] = 1.0, -1.0
            grad += g * e
            hess += f * beta * beta * s * (1 - s) * np.outer(e, e)
        hess += 1e-12 * np.eye(a) + np.ones((a, a)) / a  # fix the free constant c(s)
        step = np.linalg.solve(hess, grad)
        d -= step
        if np.abs(step).max() < 1e-12:
            break
    return centred(d)


# ----------------------------------------------------------------------------------------------- the harness
PI0 = np.array([[0.4, 0.4, 0.2],  # (1, unknown): asks 40% of the time
                [1 / 3, 1 / 3, 1 / 3],  # (2, unknown)
                [0.25, 0.25, 0.5]])  # (2, known): answers half the time


def common_settings(policy_dir: Path, run_dir: Path, seed: int, dialogues: int) -> dict[str, Any]:
    """The settings every agent shares on the testbed: its env, the table policy trained in full (no LoRA) on the
    CPU, sampling at T = 1 (log-probs are the table's), AdamW without weight decay, warm-up or clipping."""
    from agents.common.config import EnvSettings, EvalSettings, OptimSettings, SamplingSettings
    from agents.common.policy import PolicySettings

    return dict(
        env=EnvSettings(task="testbed", max_turns=HORIZON, reward_mode="terminal", device="cpu", dtype="float32"),
        policy=PolicySettings(model=str(policy_dir), lora_r=0, device="cpu", dtype="float32"),
        sampling=SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=4),
        optim=OptimSettings(lr=0.2, betas=[0.0, 0.9], weight_decay=0.0, warmup_ratio=0.0, batch_size=4 * dialogues,
                            micro_batch_size=8 * dialogues, epochs=1, max_grad_norm=1e9, max_length=64),
        eval=EvalSettings(dialogues=2), seed=seed, iterations=1, dialogues=dialogues, run_dir=str(run_dir),
        export=True)


@dataclass
class Check:
    """How a trained table is compared with an arm's closed form.

    Attributes:
        expected: (states, replies) the predicted mean centred change of ``log pi`` (``exact``), or any array with
            the predicted signs (``sign``).
        kind: ``exact``: ``|mean - expected| <= z * SE + atol`` for every entry; ``sign``: every entry with
            ``|expected| > atol`` moves in its sign with ``|mean| >= z * SE``.
        z: Monte-Carlo tolerance in standard errors of the mean over seeds.
        atol: the optimiser's tolerance (``exact``), or the smallest predicted value checked (``sign``).
    """

    expected: np.ndarray
    kind: str = "exact"
    z: float = 5.0
    atol: float = 0.02

    def failures(self, deltas: np.ndarray) -> list[str]:
        """Every entry that disagrees with the closed form, in words (empty: the arm passes).

        Args:
            deltas: (seeds, states, replies) log-prob changes, one row per seed (centred here).
        """
        if deltas.ndim != 3 or deltas.shape[0] < 2:
            raise ValueError(f"Check.failures: deltas must be (seeds >= 2, states, replies), got {deltas.shape}")
        deltas = centred(deltas)
        mean = deltas.mean(0)
        se = deltas.std(0, ddof=1) / math.sqrt(deltas.shape[0])
        out = []
        for i, j in itertools.product(range(len(STATES)), range(len(REPLIES))):
            where = f"state {STATES[i]} reply {REPLIES[j]!r}"
            e, m, s = float(self.expected[i, j]), float(mean[i, j]), float(se[i, j])
            if self.kind == "exact" and abs(m - e) > self.z * s + self.atol:
                out.append(f"{where}: mean change {m:+.3f} (SE {s:.3f}), closed form {e:+.3f}")
            if self.kind == "sign" and abs(e) > self.atol and not (np.sign(m) == np.sign(e) and abs(m) >= self.z * s):
                out.append(f"{where}: mean change {m:+.3f} (SE {s:.3f}), closed form's sign {np.sign(e):+.0f}")
        return out


@dataclass
class Arm:
    """One agent on the testbed: how to run it, and what its update must be.

    Attributes:
        name: shown in failures.
        run: the agent's own ``run(cfg)`` (its module's ``run``).
        config: ``config(policy_dir, run_dir, seed)`` -> the agent's config object (start from
            :func:`common_settings`).
        check: ``check(testbed)`` -> the :class:`Check` its trained tables must pass.
        patches: context managers entered around the runs (a mutant's bug).
        mutant: the arm is a deliberately broken agent that must FAIL its check.
    """

    name: str
    run: Callable[[Any], Any]
    config: Callable[[Path, Path, int], Any]
    check: Callable[[Testbed], Check]
    patches: list[Callable[[], contextlib.AbstractContextManager]] = field(default_factory=list)
    mutant: bool = False


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread while the arms run: with tensors this small, a thread pool on a busy machine costs
    ~10x (measured: 15 ms vs 115 ms per batched generate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def initial_policy_dir(root: Path, pi0: np.ndarray = PI0) -> Path:
    """Save the table policy with ``pi0`` as a model directory (what ``policy.model`` names) under ``root``."""
    model, tokenizer = make_policy({s: p for s, p in zip(STATES, pi0)})
    return save_policy(model, tokenizer, root / "pi0")


def train(arm: Arm, seeds: Sequence[int], root: Path, pi0: np.ndarray = PI0) -> np.ndarray:
    """Run ``arm`` once per seed from ``pi0`` and read each exported policy back.

    Returns:
        (seeds, states, replies) changes of ``log pi``: the exported policy's minus ``pi0``'s.
    """
    from dialogue_gym.models import load_model

    policy_dir = initial_policy_dir(root, pi0)
    before = np.log(pi0)
    out = []
    with one_thread(), contextlib.ExitStack() as stack:
        for patch in arm.patches:
            stack.enter_context(patch())
        for seed in seeds:
            run_dir = root / f"{arm.name}-{seed}"
            arm.run(arm.config(policy_dir, run_dir, seed))
            model, _ = load_model(str(run_dir / "policy"), shared=False, device="cpu")
            out.append(log_policy(model) - before)
    return np.stack(out)


# ----------------------------------------------------------------------------------------------- the arms
ETA = 2.0  # REFUEL/REBEL's eta: the closed-form moves are eta * (centred target), up to ~1 nat here
FIT_EPOCHS = 40  # full-batch AdamW steps: enough to reach the regression's (and cDPO's) minimiser
DPO_BETA, DPO_EPS, DPO_N = 1.0, 0.1, 3  # cDPO: the exact fit is finite only with label smoothing eps > 0
PPO_LR = 0.05


def refuel_arm(turn_sampling: str = "uniform", dialogues: int = 96, name: str | None = None) -> Arm:
    """REFUEL (agents.refuel): one iteration, full-batch regression fitted to convergence.

    Closed form: ``delta(s, a) = eta * E[Q_hat | s, a] + c(s)`` with ``E[Q_hat | s, a] = sum_H' P(H' | h)
    Q_H'(s, a)`` (:meth:`Testbed.refuel_target`).
    """
    from agents.refuel.__main__ import run
    from agents.refuel.config import RefuelConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = RefuelConfig(**common_settings(policy_dir, run_dir, seed, dialogues), eta=ETA,
                           turn_sampling=turn_sampling)
        cfg.optim.epochs = FIT_EPOCHS
        return cfg

    return Arm(name or f"REFUEL-{turn_sampling}", run, config,
               lambda tb: Check(ETA * centred(tb.refuel_target(turn_sampling))))


def rebel_arm(turn_sampling: str = "uniform", dialogues: int = 96) -> Arm:
    """REBEL (agents.rebel): REFUEL's loop with each reply scored by its immediate reward.

    Closed form: ``delta(s, a) = eta * r(s, a) + c(s)`` (:meth:`Testbed.immediate`).
    """
    from agents.rebel.__main__ import run
    from agents.rebel.config import RebelConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = RebelConfig(**common_settings(policy_dir, run_dir, seed, dialogues), eta=ETA,
                          turn_sampling=turn_sampling)
        cfg.optim.epochs = FIT_EPOCHS
        return cfg

    return Arm(f"REBEL-{turn_sampling}", run, config, lambda tb: Check(ETA * centred(tb.immediate())))


def dpo_arm(dialogues: int = 96) -> Arm:
    """Online DPO (agents.dpo, mode=online, immediate reward, best vs worst of n): cDPO fitted to convergence.

    Closed form: at each state the minimiser of the cDPO loss over the pair types in their exact proportions
    (:meth:`Testbed.pair_frequencies`, :func:`cdpo_optimum`). Where every pair prefers one reply ``w`` (at turn 1
    and at (2, unknown): the guess's partial credit), ``beta * (delta_w - delta_l) = log((1 - eps) / eps)``.
    """
    from agents.dpo.__main__ import run
    from agents.dpo.config import DpoConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = DpoConfig(**common_settings(policy_dir, run_dir, seed, dialogues), mode="online", n=DPO_N,
                        beta=DPO_BETA, label_smoothing=DPO_EPS, future=False, turn_sampling="uniform",
                        reference="sft")
        cfg.optim.epochs = FIT_EPOCHS
        return cfg

    def check(tb: Testbed) -> Check:
        return Check(np.stack([cdpo_optimum(f, DPO_BETA, DPO_EPS) for f in tb.pair_frequencies(DPO_N)]))

    return Arm("DPO-online", run, config, check)


def ppo_arm(dialogues: int = 96) -> Arm:
    """PPO (agents.ppo): one full-batch step, gamma = lambda = 1, no KL penalty, value head at 0.

    Closed form: the expected policy gradient on ``table[s, b]`` is ``d(s) pi0(b|s) (Q(s, b) - V(s))``, and
    AdamW's first step (zero moments, beta1 = 0 here) moves each entry by exactly ``lr`` in the sign of its
    gradient: ``delta table[s, b] = lr * sign(Q(s, b) - V(s))`` (:meth:`Testbed.advantage`), once the batch is large
    enough for the sampled gradient to have its expectation's sign.
    """
    from agents.ppo.__main__ import run
    from agents.ppo.config import PpoConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = PpoConfig(**common_settings(policy_dir, run_dir, seed, dialogues), gamma=1.0, lam=1.0, kl_coef=0.0,
                        whiten_advantages=True)
        cfg.optim.lr = PPO_LR
        cfg.optim.batch_size = dialogues  # one minibatch: a single step, from pi0
        return cfg

    return Arm("PPO", run, config, lambda tb: Check(PPO_LR * centred(np.sign(tb.advantage())), atol=0.002))


def grpo_arm(credit: str = "turn", dialogues: int = 96, group_size: int = 4) -> Arm:
    """GRPO (agents.grpo): one full-batch AdamW step from pi0 (beta1 = 0), no KL, unscaled group-relative advantages.

    Closed form: with ``credit=turn`` the G replies forked at s_h are each scored by their return to the horizon
    (uniform turn sampling) minus the group mean, so the expected gradient on ``table[s, b]`` is
    ``(1 - 1/G) d(s) pi0(b|s) (Q(s, b) - V(s))``: the centred Q of each reply. With ``credit=trajectory`` every reply
    of a dialogue is credited with the whole return minus the mean of its opening's group; since
    ``E[grad log pi(.|s)] = 0`` the expectation is again ``d(s) pi0(b|s) (Q(s, b) - V(s))`` (times 1 - 1/G). AdamW's
    first step moves each entry by ``lr`` in that sign, as for PPO. On this task the two credits share the expected
    first step; they differ in variance, which a one-step sign check does not see.
    """
    from agents.grpo.__main__ import run
    from agents.grpo.config import GrpoConfig

    def config(policy_dir: Path, run_dir: Path, seed: int) -> Any:
        cfg = GrpoConfig(**common_settings(policy_dir, run_dir, seed, dialogues), credit=credit,
                         group_size=group_size, beta=0.0, scale="none", turn_sampling="uniform")
        cfg.optim.lr = PPO_LR
        cfg.optim.batch_size = dialogues * group_size  # every group member in one minibatch: a single step
        return cfg

    return Arm(f"GRPO-{credit}", run, config,
               lambda tb: Check(PPO_LR * centred(np.sign(tb.advantage("uniform"))), atol=0.002))


@contextlib.contextmanager
def refuel_scores_immediate_reward() -> Iterator[None]:
    """A mutant of REFUEL's loop: its branches are scored by their immediate reward (``future=False``), the credit
    assignment bug the REFUEL check must catch."""
    import agents.refuel.__main__ as refuel

    real = refuel.collect_pairs

    def mutant(*args: Any, **kwargs: Any) -> Any:
        kwargs["future"] = False
        return real(*args, **kwargs)

    refuel.collect_pairs = mutant
    try:
        yield
    finally:
        refuel.collect_pairs = real


def default_arms() -> dict[str, tuple[Arm, range]]:
    """Every arm the suite and ``python -m benchmarks.testbed`` run, with its seeds: REFUEL's turn-1 targets are
    Monte-Carlo returns (8 and 6 seeds of 128 dialogues); the other arms' targets are exact (immediate rewards,
    signs), so their seeds only have to give a standard error. ``refuel_mutant`` must fail the REFUEL check."""
    mutant = refuel_arm("uniform", dialogues=128, name="REFUEL-mutant")
    mutant.patches.append(refuel_scores_immediate_reward)
    mutant.mutant = True
    return {"refuel": (refuel_arm("uniform", dialogues=128), range(8)),
            "refuel_reference": (refuel_arm("reference", dialogues=128), range(6)),
            "refuel_mutant": (mutant, range(3)),
            "rebel": (rebel_arm("uniform"), range(4)),
            "dpo": (dpo_arm(), range(4)),
            "ppo": (ppo_arm(), range(4)),
            "grpo_turn": (grpo_arm("turn"), range(4)),
            "grpo_trajectory": (grpo_arm("trajectory"), range(4))}
