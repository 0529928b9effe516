"""Reward backends: Bradley-Terry classifier read-out, pairwise preference read-out, combinators, build_reward."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from dialogue_gym.conversation import DialogueError, check_profile
from dialogue_gym.models import load_model, load_tokenizer, tiny_config
from dialogue_gym.rewards import (
    Clip,
    LengthPenalty,
    LLMJudge,
    PairwisePreferenceReward,
    RunningNorm,
    SequenceClassifierReward,
    WeightedSum,
    build_reward,
)
from dialogue_gym.rewards.classifier import (
    choose_pad_id,
    conversation_token_ids,
    last_token_index,
    pad_batch,
)
from dialogue_gym.rewards.pairwise import average_orders, preference_from_logits
from dialogue_gym.tasks import EmbeddedTask
from tests.conftest import LengthReward

CONTEXT = [{"role": "user", "content": "What is 2 + 3? End your reply with: The answer is <number>."}]
CHOSEN = CONTEXT + [{"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}]
REJECTED = CONTEXT + [{"role": "assistant", "content": "2 + 3 = 6. The answer is 6."}]
LONG = [{"role": "user", "content": "Tell me a story about a cat. " * 6},
        {"role": "assistant", "content": "Once upon a time there was a cat."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "It slept all day long, happily."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama sequence classifier saved as the trainer saves one -- but with the EOS token as its
    padding token (tiny_config and the embedded tokenizer both do that): the pitfall the reward must survive."""
    from transformers import LlamaForSequenceClassification

    config = tiny_config(len(tokenizer))
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm(rm_dir):
    return SequenceClassifierReward(str(rm_dir), batch_size=4, dtype="float32")  # compared to an fp32 reference


def per_position_scores(model, ids: list[int]) -> torch.Tensor:
    """The head's output at every position of one unpadded sequence: (T,)."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids], device=model.device)).last_hidden_state
        return model.score(hidden)[0, :, 0]


# ---- padding, read-out position, truncation --------------------------------------------------------------------


def test_pad_batch_right_and_left():
    ids, mask, pos = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 0]
    ids, mask, pos = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 2]
    with pytest.raises(ValueError, match="padding side"):
        pad_batch([[1]], 0, side="middle")


def test_choose_pad_id_avoids_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the embedded tokenizer pads with <|im_end|>
    pad = choose_pad_id(tokenizer)
    assert pad != tokenizer.eos_token_id
    assert pad == tokenizer.unk_token_id


def test_conversation_ids_end_on_end_of_turn_token(tokenizer):
    ids = conversation_token_ids(tokenizer, CHOSEN, max_length=4096)
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert conversation_token_ids(tokenizer, CHOSEN, max_length=5) == ids[-5:]  # truncated from the left


def test_score_equals_unpadded_read_at_last_token(rm, tokenizer):
    convs = [CHOSEN, REJECTED, LONG]
    got = rm.score(convs)
    assert got.shape == (3,) and got.dtype == np.float64
    for conv, value in zip(convs, got):
        ids = conversation_token_ids(tokenizer, conv, rm.max_length)
        assert value == pytest.approx(float(per_position_scores(rm.model, ids)[-1]), abs=1e-5)


def test_right_and_left_padding_and_batching_agree(rm_dir):
    convs = [CHOSEN, LONG, REJECTED, LONG[:2]]
    right = SequenceClassifierReward(str(rm_dir), batch_size=4, padding_side="right").score(convs)
    left = SequenceClassifierReward(str(rm_dir), batch_size=4, padding_side="left").score(convs)
    single = SequenceClassifierReward(str(rm_dir), batch_size=1).score(convs)
    np.testing.assert_allclose(right, single, atol=1e-5)
    np.testing.assert_allclose(left, single, atol=1e-5)


def test_left_truncation_keeps_the_end(rm_dir, tokenizer):
    short = SequenceClassifierReward(str(rm_dir), max_length=12)
    other_start = [{"role": "user", "content": "Something else entirely, with other words. " * 3}] + LONG[1:]
    a, b = short.score([LONG, other_start])
    assert a == pytest.approx(b, abs=1e-6)  # the first 12 tokens from the end are identical
    ids = conversation_token_ids(tokenizer, LONG, 12)
    assert len(ids) == 12
    assert a == pytest.approx(float(per_position_scores(short.model, ids)[-1]), abs=1e-5)


def test_eos_as_pad_pitfall(rm_dir, tokenizer, rm):
    """With EOS (= the end-of-turn token <|im_end|>) as padding, naive read-outs miss the end of the reply:
    transformers' 'rightmost non-pad token' lands before the final <|im_end|>, and the older 'first pad token - 1'
    lands inside the shared context, so chosen and rejected get the same score. The reward pads with its own
    token and reads at the real end."""
    from transformers import AutoModelForSequenceClassification

    naive = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    eos = tokenizer.eos_token_id
    assert naive.config.pad_token_id == eos  # the saved model carries the pitfall
    seqs = [conversation_token_ids(tokenizer, c, 4096) for c in (CHOSEN, REJECTED)]
    full = [per_position_scores(naive, s) for s in seqs]
    correct = [float(f[-1]) for f in full]

    ids, mask, _ = pad_batch(seqs, eos, side="right")
    with torch.no_grad():
        hf_naive = naive(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert not np.allclose(hf_naive.numpy(), correct, atol=1e-4)  # read at the wrong token

    first_pad = [s.index(eos) - 1 for s in seqs]  # the legacy read-out
    assert first_pad[0] == first_pad[1] < len(seqs[0]) - 3
    legacy = [float(f[i]) for f, i in zip(full, first_pad)]
    assert legacy[0] == pytest.approx(legacy[1], abs=1e-6)  # chosen and rejected score the same

    got = rm.score([CHOSEN, REJECTED])
    assert rm.pad_id != eos
    np.testing.assert_allclose(got, correct, atol=1e-5)
    assert abs(got[0] - got[1]) > 1e-5


def test_classifier_errors(rm, rm_dir, tmp_path):
    with pytest.raises(DialogueError, match=r"conversations\[0\] ends with a 'user' message"):
        rm.score([CONTEXT])
    with pytest.raises(DialogueError, match=r"conversations\[1\]"):
        rm.score([CHOSEN, [{"role": "bot", "content": "x"}]])
    with pytest.raises(ValueError, match="max_length"):
        SequenceClassifierReward(str(rm_dir), max_length=0)
    with pytest.raises(ValueError, match="batch_size"):
        SequenceClassifierReward(str(rm_dir), batch_size=0)
    with pytest.raises(ValueError, match="padding_side"):
        SequenceClassifierReward(str(rm_dir), padding_side="up")
    from transformers import LlamaForSequenceClassification

    config = tiny_config(100)
    config.num_labels = 3
    with pytest.raises(ValueError, match="num_labels=3"):
        SequenceClassifierReward((LlamaForSequenceClassification(config), load_tokenizer("tiny")))


# ---- pairwise preference ---------------------------------------------------------------------------------------


def test_preference_from_logits_by_hand():
    np.testing.assert_allclose(preference_from_logits(math.log(3.0), 0.0), 0.75)
    np.testing.assert_allclose(preference_from_logits(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])), [0.5, 0.5])
    # 1 / (1 + e^-2)
    np.testing.assert_allclose(preference_from_logits(np.array([2.0]), np.array([0.0])), [0.8807970779778823])


def test_average_orders_by_hand():
    # a first: P(A)=0.9; b first: P(A)=0.3 so P(a, shown second, wins)=0.7 -> (0.9 + 0.7) / 2
    np.testing.assert_allclose(average_orders([0.9], [0.3]), [0.8])
    np.testing.assert_allclose(average_orders([0.75], [0.75]), [0.5])  # pure position bias is a tie


class ScriptedLetterModel(torch.nn.Module):
    """A stand-in causal LM with known letter logits: logit_A = quality(reply A) + bias, logit_B = quality(B)."""

    def __init__(self, tokenizer, quality: dict[str, float], bias: float):
        super().__init__()
        self.tok, self.quality, self.bias = tokenizer, quality, bias
        self.a, self.b = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AB")
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen_lengths: list[int] = []

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tok))
        for r in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[r][attention_mask[r].bool()])
            first = re.search(r"\[Reply A\]\n(.*)\n\[End of reply A\]", text, re.S).group(1)
            second = re.search(r"\[Reply B\]\n(.*)\n\[End of reply B\]", text, re.S).group(1)
            logits[r, -1, self.a] = self.quality[first] + self.bias
            logits[r, -1, self.b] = self.quality[second]
        return type("Out", (), {"logits": logits})()


def test_prefer_with_known_logits_removes_position_bias(tokenizer):
    judge = PairwisePreferenceReward((ScriptedLetterModel(tokenizer, {"good": 2.0, "bad": 0.0}, bias=1.0), tokenizer))
    p = judge.prefer([CONTEXT, CONTEXT, CONTEXT], ["good", "bad", "good"], ["bad", "good", "good"])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # (good, bad): P(A)=sig(2+1); (bad, good): P(A)=sig(0+1-2) -> P(good second wins)=sig(1)
    expected = (sig(3.0) + sig(1.0)) / 2
    np.testing.assert_allclose(p, [expected, 1 - expected, 0.5], atol=1e-12)


def test_prefer_on_tiny_model_ties_and_symmetry(tokenizer):
    judge = PairwisePreferenceReward(load_model("tiny", dtype="float32"), batch_size=3)  # fp32: batch sizes to 1e-5
    a, b = ["The answer is 5.", "Paris.", "Same."], ["The answer is 6, because I added wrong.", "Lyon.", "Same."]
    ctx = [CONTEXT, [{"role": "user", "content": "Capital of France?"}], CONTEXT]
    p_ab = judge.prefer(ctx, a, b)
    p_ba = judge.prefer(ctx, b, a)
    assert p_ab.shape == (3,) and np.all((p_ab > 0) & (p_ab < 1))
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-12)
    assert p_ab[2] == 0.5  # identical replies: exactly a tie
    one_by_one = PairwisePreferenceReward(load_model("tiny", dtype="float32"), batch_size=1).prefer(ctx, a, b)
    np.testing.assert_allclose(p_ab, one_by_one, atol=1e-5)


def test_pairwise_env_reward_uses_reference(tokenizer):
    judge = PairwisePreferenceReward((ScriptedLetterModel(tokenizer, {"good": 2.0, "bad": 0.0}, bias=0.0), tokenizer))
    got = judge.score([CONTEXT + [{"role": "assistant", "content": "good"}]], [{"reference": "bad"}])
    np.testing.assert_allclose(got, [1 / (1 + math.exp(-2.0))])
    with pytest.raises(DialogueError, match=r"profiles\[0\]\['reference'\] is missing"):
        judge.score([CHOSEN], [{"answer": 5}])
    with pytest.raises(DialogueError, match="one profile per conversation"):
        judge.score([CHOSEN])
    # the same check, before any scoring, for the env's reset of a free-form start; wrappers pass it through
    judge.check_profile({"reference": "bad"})
    for wrapped in (judge, Clip(LengthPenalty(WeightedSum([(1.0, judge)]), lam=0.1), 0.0, 1.0)):
        with pytest.raises(DialogueError, match=r"profile\['reference'\] is missing or not a non-blank string \(' '\)"):
            check_profile(wrapped, {"reference": " "})
    with pytest.raises(DialogueError, match=r"replies_b\[0\] must be a non-blank string"):
        judge.prefer([CONTEXT], ["x"], [" "])
    with pytest.raises(DialogueError, match="one reply_a and one reply_b per context"):
        judge.prefer([CONTEXT], ["x", "y"], ["z"])


# ---- combinators ---------------------------------------------------------------------------------------------


class Const:
    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)

    def score(self, conversations, profiles=None):
        return self.values[: len(conversations)]

    def describe(self):
        return {"reward": "const"}


def test_weighted_sum_length_penalty_clip_arithmetic():
    convs = [CHOSEN, REJECTED]  # last replies: 27 and 27 characters
    n = len(CHOSEN[-1]["content"])
    length = LengthReward()  # n / 10
    total = WeightedSum([(2.0, length), (-1.0, Const([1.0, 3.0]))]).score(convs)
    np.testing.assert_allclose(total, [2 * n / 10 - 1, 2 * n / 10 - 3])
    np.testing.assert_allclose(LengthPenalty(Const([1.0, 3.0]), lam=0.01).score(convs), [1 - 0.01 * n, 3 - 0.01 * n])
    np.testing.assert_allclose(Clip(Const([-5.0, 0.5]), -1.0, 1.0).score(convs), [-1.0, 0.5])
    nested = Clip(LengthPenalty(WeightedSum([(1.0, Const([2.0, 0.0]))]), lam=0.1), 0.0, 10.0)
    np.testing.assert_allclose(nested.score(convs), [max(0.0, 2 - 0.1 * n), 0.0])
    assert nested.describe()["inner"]["inner"]["reward"] == "weighted_sum"


def test_running_norm_by_hand(tmp_path):
    class Seq:
        def __init__(self):
            self.batches = [[1.0, 2.0, 3.0], [4.0, 5.0]]

        def score(self, conversations, profiles=None):
            return np.array(self.batches.pop(0))

        def describe(self):
            return {"reward": "seq"}

    norm = RunningNorm(Seq(), eps=0.0)
    first = norm.score([CHOSEN] * 3)
    np.testing.assert_allclose(first, (np.array([1, 2, 3]) - 2) / math.sqrt(2 / 3))
    second = norm.score([CHOSEN] * 2)
    assert norm.count == 5 and norm.mean == pytest.approx(3.0) and norm.std == pytest.approx(math.sqrt(2.0))
    np.testing.assert_allclose(second, [1 / math.sqrt(2), 2 / math.sqrt(2)])
    norm.save(tmp_path / "norm.json")
    frozen = RunningNorm(Const([7.0]), eps=0.0, update=False)
    frozen.load(tmp_path / "norm.json")
    np.testing.assert_allclose(frozen.score([CHOSEN]), [(7 - 3) / math.sqrt(2)])
    assert frozen.count == 5  # not updated
    assert json.loads((tmp_path / "norm.json").read_text())["count"] == 5
    with pytest.raises(ValueError, match="missing"):
        frozen.load_state_dict({"count": 1})
    with pytest.raises(ValueError, match="count must be a non-negative integer"):
        frozen.load_state_dict({"count": -1, "mean": 0.0, "m2": 0.0})


def test_combinator_errors():
    with pytest.raises(ValueError, match="non-empty list"):
        WeightedSum([])
    with pytest.raises(ValueError, match=r"terms\[0\] must be a \(weight, reward_model\) pair"):
        WeightedSum([Const([1.0])])
    with pytest.raises(ValueError, match=r"terms\[0\] weight must be a finite number"):
        WeightedSum([(float("nan"), Const([1.0]))])
    with pytest.raises(TypeError, match=r"terms\[0\] reward model must be a RewardModel"):
        WeightedSum([(1.0, "judge")])
    with pytest.raises(ValueError, match="lam must be >= 0"):
        LengthPenalty(Const([1.0]), lam=-1)
    with pytest.raises(ValueError, match=r"lo \(2.0\) must be <= hi \(1.0\)"):
        Clip(Const([1.0]), 2.0, 1.0)
    with pytest.raises(RuntimeError, match="returned 1 scores for 2"):
        Clip(Const([1.0]), 0, 1).score([CHOSEN, REJECTED])


# ---- build_reward -------------------------------------------------------------------------------------------


class Cfg:
    model = "tiny"


def test_build_reward_specs(rm_dir, tmp_path):
    task = EmbeddedTask()
    assert isinstance(build_reward(str(rm_dir), task, Cfg), SequenceClassifierReward)
    assert isinstance(build_reward(f"classifier:{rm_dir}", task, Cfg), SequenceClassifierReward)
    pairwise = build_reward("pairwise:tiny", task, Cfg)
    assert isinstance(pairwise, PairwisePreferenceReward) and pairwise.describe()["model"] == "tiny"
    assert isinstance(build_reward("judge", task, Cfg), LLMJudge)
    const = Const([1.0])
    assert build_reward(const, task, Cfg) is const
    causal = tmp_path / "causal"
    model, tok = load_model("tiny")
    model.save_pretrained(causal)
    with pytest.raises(DialogueError, match="does not hold a sequence-classification model.*pairwise:"):
        build_reward(str(causal), task, Cfg)
    with pytest.raises(DialogueError, match="'pairwise:' needs a model"):
        build_reward("pairwise:", task, Cfg)
    with pytest.raises(DialogueError, match="allowed: 'judge'"):
        build_reward("nonsense", task, Cfg)


def test_task_specific_reward_still_wins(rm_dir):
    from dialogue_gym.tasks.arithmetic import ArithmeticTask, VerifierReward

    assert isinstance(build_reward("verifier", ArithmeticTask(n_train=5, n_test=5), Cfg), VerifierReward)


def test_classifier_dir_serves_as_env_reward(rm_dir):
    from dialogue_gym.core import DialogueCore, EnvConfig
    from dialogue_gym.users import ScriptedUser

    core = DialogueCore(EnvConfig(task="embedded", user=ScriptedUser(), reward=str(rm_dir), reward_mode="per_turn"))
    states = [core.state_for_row(0, 1), core.state_for_row(1, 2)]
    results = core.advance(states, ["A short reply.", "Another reply."])
    expected = core.reward.score([s.messages[:2] for s in states])
    np.testing.assert_allclose([r.reward for r in results], expected)


def test_batched_prompt_tokenization_equals_one_prompt_at_a_time(tokenizer):
    from dialogue_gym.generation.base import prompt_token_ids, prompts_token_ids

    prompts = [CHOSEN, [{"role": "user", "content": "Hi"}], [5, 6, 7], REJECTED, CONTEXT]
    assert prompts_token_ids(tokenizer, prompts) == [prompt_token_ids(tokenizer, p) for p in prompts]
    assert prompts_token_ids(tokenizer, [[1, 2]]) == [[1, 2]] and prompts_token_ids(tokenizer, []) == []
    judge = LLMJudge(load_model("tiny"), max_prompt_tokens=40)  # short enough to cut the longer prompts
    many = judge.prompts_ids([CHOSEN, REJECTED, CONTEXT])
    assert many == [judge.prompt_ids(c) for c in (CHOSEN, REJECTED, CONTEXT)]
    assert max(len(x) for x in many) == 40


def test_judge_batches_are_capped_in_rows_and_padded_tokens():
    judge = LLMJudge(load_model("tiny", dtype="float32"), max_batch_size=3, max_batch_tokens=10)
    lengths = [[0] * n for n in (2, 2, 3, 4, 6, 20)]
    # 3 rows x 3 tokens fit; the fourth row would pass max_batch_size; 2 x 6 > 10; a 20-token prompt goes alone
    assert judge._chunks(list(range(6)), lengths) == [[0, 1, 2], [3], [4], [5]]
    convs = [CHOSEN, REJECTED, CONTEXT, CHOSEN + [{"role": "user", "content": "Sure?"}]]
    one_forward = LLMJudge(load_model("tiny", dtype="float32"), max_batch_size=8).score(convs)
    many = LLMJudge(load_model("tiny", dtype="float32"), max_batch_tokens=60).score(convs)  # one prompt per forward
    np.testing.assert_allclose(many, one_forward, atol=1e-6)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive integer, got 0"):
        LLMJudge(load_model("tiny", dtype="float32"), max_batch_tokens=0)
