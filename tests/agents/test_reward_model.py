"""Reward-model trainer: losses by hand, pair construction, checkpoints that reload with identical scores, a smoke
run in a subprocess that changes every trainable parameter, configuration errors and Hydra composition."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents.common.config import ConfigError, merge_schema
from agents.common.policy import export_policy, trainable_parameters
from agents.common.preferences import SAMPLED, Preference
from agents.reward_model.__main__ import build_model, evaluate, run, tokenize, train_step
from agents.reward_model.config import RewardModelConfig, validate
from agents.reward_model.data import (
    PreferencePair,
    pair_replies,
    read_pairs,
    reference_reply,
    sample_task_pairs,
    write_pairs,
)
from agents.reward_model.losses import bt_loss, preference_loss
from dialogue_gym.generation.base import Generation
from dialogue_gym.rewards import PairwisePreferenceReward, SequenceClassifierReward, build_reward
from dialogue_gym.rewards.pairwise import letter_token_ids
from dialogue_gym.rollout_store import RolloutStore
from dialogue_gym.tasks.arithmetic import ArithmeticTask, VerifierReward

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")

Q = "Maya has 3 apples. She buys 2 more. How many apples does Maya have now? End your reply with: The answer is <n>."
PAIRS = [
    Preference([{"role": "user", "content": Q}], "3 + 2 = 5. The answer is 5.", "3 + 2 = 6. The answer is 6.",
               SAMPLED),
    Preference([{"role": "user", "content": "What is 4 + 4?"}], "The answer is 8.", "I think it is 9, maybe 10.",
               SAMPLED),
    Preference([{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
                {"role": "user", "content": "Another one?"}], "Eleven.", "Nine.", SAMPLED),
]


FP32 = SimpleNamespace(device="auto", dtype="float32")  # where build_reward loads a reloaded model


def tiny_config(kind: str = "bt", lora_r: int = 4) -> RewardModelConfig:
    cfg = RewardModelConfig(kind=kind)
    cfg.policy.model, cfg.policy.lora_r, cfg.policy.lora_alpha = "tiny", lora_r, 8
    # fp32 on every device: these tests compare scores to 1e-5 (on CUDA "auto" is bf16, where merging the LoRA
    # adapter into bf16 weights at export moves scores by ~1e-2)
    cfg.policy.dtype = "float32"
    cfg.optim.lr, cfg.optim.batch_size, cfg.optim.micro_batch_size, cfg.optim.max_length = 1e-2, 3, 2, 256
    return cfg


# ---- losses ----------------------------------------------------------------------------------------------------


def test_bt_loss_by_hand():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0])
    loss, m = bt_loss(rc, rr)
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    assert float(loss.detach()) == pytest.approx((math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2, abs=1e-6)
    assert m["rm/accuracy"] == 0.5  # a tie counts as wrong
    assert m["rm/margin"] == pytest.approx(1.0)
    assert m["rm/reward_mean"] == pytest.approx(0.5)
    loss.backward()
    # d/d r_c of -log sigmoid(d) / N = -(1 - sigmoid(d)) / N
    np.testing.assert_allclose(rc.grad.numpy(), [-(1 - 1 / (1 + math.exp(-2))) / 2, -0.5 / 2], atol=1e-6)


def test_bt_loss_is_shift_invariant_and_checks_shapes():
    a, _ = bt_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.0]))
    b, _ = bt_loss(torch.tensor([11.0, 9.0]), torch.tensor([10.5, 10.0]))
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        bt_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="N = 0"):
        bt_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="must be tensors"):
        bt_loss([1.0], [0.0])


def test_preference_loss_by_hand():
    loss, m = preference_loss(torch.tensor([math.log(3.0), 0.0]), torch.tensor([0.0, math.log(3.0)]))
    # P(correct) = 3/4 and 1/4
    assert float(loss) == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, abs=1e-6)
    assert m["rm/accuracy"] == 0.5 and m["rm/p_correct"] == pytest.approx(0.5)


# ---- pairs -----------------------------------------------------------------------------------------------------


def test_pair_replies_distinct_and_gap():
    rng = np.random.default_rng(0)
    got = pair_replies(["a", "b", "a ", "c", "d"], [1.0, 0.0, 1.0, 0.0, 0.7], min_gap=0.5, k=10, rng=rng)
    assert sorted(got) == [(0, 1), (0, 3), (4, 1), (4, 3)]  # "a " duplicates "a"; 1.0 vs 0.7 is below the gap
    assert len(pair_replies(["a", "b", "c"], [1.0, 0.0, 0.0], 0.5, k=1, rng=rng)) == 1
    assert pair_replies(["a", "b"], [0.0, 0.0], 0.5, k=3, rng=rng) == []


def test_reference_reply():
    assert reference_reply({"answer": 5.0}) == "The answer is 5."
    assert reference_reply({"answer": 12.5}) == "The answer is 12.5."
    assert reference_reply({"answer": 3.10}) == "The answer is 3.1."
    assert reference_reply({"reference": "Paris.", "answer": 1}) == "Paris."
    assert reference_reply({}) is None and reference_reply({"answer": True}) is None


class CyclingEngine:
    """Replies by prompt position: ``texts[i % len(texts)]``; records the seeds it was given."""

    def __init__(self, texts):
        self.texts = texts
        self.seeds = []

    def generate(self, prompts, params, seeds=None, return_logprobs=False):
        self.seeds.append(list(seeds))
        return [Generation(text=self.texts[i % len(self.texts)], token_ids=[1, 2]) for i in range(len(prompts))]


def pair_envs(task, dialogues: int, n: int, reward=None, split: str = "train"):
    """The rollin and branch envs of the pair data: ``dialogues`` rows at a time, ``n`` branches each."""
    import gymnasium as gym

    import dialogue_gym  # noqa: F401

    kwargs = {"task": task, "reward": VerifierReward() if reward is None else reward, "reward_mode": "terminal",
              "max_turns": 3, "split": split}
    return (gym.make_vec("MultiTurnDialogue-v0", num_envs=dialogues, autoreset_mode="Disabled", **kwargs),
            gym.make_vec("MultiTurnDialogue-v0", num_envs=dialogues * n, autoreset_mode="Disabled", **kwargs))


def test_sample_task_pairs_with_the_verifier():
    task = ArithmeticTask(n_train=4, n_test=2)
    rows = task.rows("train")[:2]
    answers = [int(r.profile["answer"]) for r in rows]
    # row 0's 4 replies: correct, wrong, correct (dup), wrong; row 1 (n=4 -> replies 4..7): all wrong
    texts = [f"The answer is {answers[0]}.", "The answer is -1.", f"The answer is {answers[0]}.", "No idea.",
             "The answer is -1.", "The answer is -2.", "The answer is -2.", "Hmm."]
    engine = CyclingEngine(texts)
    rollin, branches = pair_envs(task, 2, 4)
    kwargs = {"engine": engine, "params": None, "rows": [0, 1], "n": 4, "k": 5, "min_gap": 0.5, "seed": 0}
    pairs, stats = sample_task_pairs(rollin, branches, reference_chosen=False, **kwargs)
    assert [(p.chosen, p.rejected) for p in sorted(pairs, key=lambda p: p.rejected)] == [
        (texts[0], "No idea."), (texts[0], "The answer is -1.")]
    assert stats["rows_with_pair"] == 1 and stats["pairs_by_kind"] == {"sampled": 2}
    # through the env: every reply stepped and scored, and counted; each branch samples with its own seed
    assert stats["usage"]["policy_samples"] == 8 and stats["usage"]["scored_conversations"] == 8
    assert stats["replies"] == 8 and stats["reward_mean"] == pytest.approx(2 / 8)
    assert len(engine.seeds) == 1 and len(set(engine.seeds[0])) == 8
    pairs, stats = sample_task_pairs(rollin, branches, reference_chosen=True, **kwargs)
    ref = [p for p in pairs if p.kind == "reference"]
    assert {p.rejected for p in ref} == {"The answer is -1.", "The answer is -2.", "Hmm."}
    assert all(p.chosen == f"The answer is {answers[1]}." and p.row == rows[1].id for p in ref)
    assert stats["pairs_by_kind"] == {"sampled": 2, "reference": 3}
    assert stats["usage"]["scored_conversations"] == 9  # the reference reply was scored by the env too
    assert engine.seeds[1] == engine.seeds[0]  # the same seed: the same plan


def test_blank_replies_follow_the_shared_rule(tmp_path):
    """A blank reply is sent to the env as "..." (agents.common.branching.action_text), scored as such, and paired
    as such: the pair holds what the env scored."""
    task = ArithmeticTask(n_train=4, n_test=2)
    answer = int(task.rows("train")[0].profile["answer"])
    rollin, branches = pair_envs(task, 1, 2)
    store = RolloutStore(tmp_path / "pairs_rollouts.jsonl")
    pairs, stats = sample_task_pairs(rollin, branches, CyclingEngine([f"The answer is {answer}.", "  \n"]), None,
                                     [0], n=2, k=2, min_gap=0.5, reference_chosen=False, seed=0, store=store,
                                     tags={"split": "train"})
    assert [(p.chosen, p.rejected, p.kind) for p in pairs] == [(f"The answer is {answer}.", "...", "sampled")]
    # every branch played is kept in the rollout store, with the score the pair was labelled by
    kept = store.dialogues("generator")
    assert [(r.messages[-1]["content"], r.rewards) for r in kept] == [(f"The answer is {answer}.", [1.0]),
                                                                     ("...", [0.0])]
    assert [r.seeds["branch"] for r in kept] == [0, 1] and all(r.tags["split"] == "train" for r in kept)
    assert PreferencePair is Preference  # one preference type; the old name stays importable


def test_pairs_are_seeded_and_do_not_depend_on_the_chunk_size(tmp_path):
    """Real sampling (the tiny HF model) through the branching primitive: the same seed gives the same pairs
    whether the rows are played two at a time or one at a time; another seed gives other replies. The pairs
    written to a file read back as the same preferences."""
    from dialogue_gym.generation.base import SamplingParams
    from dialogue_gym.generation.hf import HFEngine
    from tests.conftest import LengthReward

    task = ArithmeticTask(n_train=4, n_test=2)
    engine = HFEngine("tiny", seed=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)

    def run_with(chunk, seed):
        rollin, branches = pair_envs(task, chunk, 3, reward=LengthReward())
        return sample_task_pairs(rollin, branches, engine, params, [0, 1], n=3, k=3, min_gap=0.1,
                                 reference_chosen=False, seed=seed)

    (a, sa), (b, sb), (c, _) = run_with(2, 5), run_with(1, 5), run_with(2, 6)
    assert a and a == b and sa["tokens_sampled"] == sb["tokens_sampled"] > 0
    assert all(len(p.chosen) > len(p.rejected) for p in a)  # LengthReward prefers the longer reply
    assert [(p.chosen, p.rejected) for p in c] != [(p.chosen, p.rejected) for p in a]
    write_pairs(tmp_path / "pairs.jsonl", a)
    back, dropped = read_pairs("file", str(tmp_path / "pairs.jsonl"), None)
    assert back == a and dropped == {}


# ---- models: training, export, reload ---------------------------------------------------------------------------


def test_trained_bt_checkpoint_reloads_with_identical_scores(tmp_path):
    cfg = tiny_config("bt")
    model, tok = build_model(cfg)
    assert model.config.pad_token_id != tok.eos_token_id and tok.pad_token_id == model.config.pad_token_id
    ids = tokenize(PAIRS, "bt", tok, cfg.optim.max_length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = evaluate(model, tok, "bt", PAIRS, 256, 4)
    for _ in range(3):
        metrics = train_step(model, opt, sched, "bt", ids, 2, model.config.pad_token_id, letter_token_ids(tok), 1.0)
    assert math.isfinite(metrics["loss/bt"])
    after = evaluate(model, tok, "bt", PAIRS, 256, 4)
    assert after["mean_margin"] > before["mean_margin"]
    convs = [p.context + [{"role": "assistant", "content": r}] for p in PAIRS for r in (p.chosen, p.rejected)]
    in_memory = SequenceClassifierReward((model, tok)).score(convs)
    path = export_policy(model, tok, tmp_path / "rm")
    reloaded = build_reward(str(path), ArithmeticTask(n_train=2, n_test=2), FP32)
    assert isinstance(reloaded, SequenceClassifierReward)
    np.testing.assert_allclose(reloaded.score(convs), in_memory, atol=1e-5)
    saved = json.loads((path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["pad_token_id"] != 2

    import gymnasium as gym

    env = gym.make("MultiTurnDialogue-v0", task="arithmetic", reward=str(path), reward_mode="per_turn", max_turns=1,
                   task_kwargs={"n_train": 4, "n_test": 2}, dtype="float32")
    obs, _ = env.reset(seed=0)
    _, reward, _, _, _ = env.step("The answer is 5.")
    expected = reloaded.score([list(obs) + [{"role": "assistant", "content": "The answer is 5."}]])[0]
    assert reward == pytest.approx(expected, abs=1e-5)


def test_trained_pairwise_checkpoint_reloads_with_identical_preferences(tmp_path):
    cfg = tiny_config("pairwise")
    model, tok = build_model(cfg)
    ids = tokenize(PAIRS, "pairwise", tok, cfg.optim.max_length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = evaluate(model, tok, "pairwise", PAIRS, 1024, 4)
    for _ in range(3):
        metrics = train_step(model, opt, sched, "pairwise", ids, 3, model.config.pad_token_id, letter_token_ids(tok),
                             1.0)
    assert math.isfinite(metrics["loss/preference"])
    after = evaluate(model, tok, "pairwise", PAIRS, 1024, 4)
    assert after["mean_margin"] > before["mean_margin"]
    args = ([p.context for p in PAIRS], [p.chosen for p in PAIRS], [p.rejected for p in PAIRS])
    in_memory = PairwisePreferenceReward((model, tok)).prefer(*args)
    path = export_policy(model, tok, tmp_path / "pm")
    reloaded = build_reward(f"pairwise:{path}", ArithmeticTask(n_train=2, n_test=2), FP32)
    np.testing.assert_allclose(reloaded.prefer(*args), in_memory, atol=1e-5)


def test_file_source_runs_in_process(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", PAIRS * 3)
    cfg = tiny_config("bt", lora_r=0)
    cfg.data.source, cfg.data.path, cfg.data.test_fraction = "file", str(tmp_path / "pairs.jsonl"), 0.34
    cfg.trainable_layers = 1
    cfg.run_dir = str(tmp_path / "run")
    record = run(cfg)
    assert record["data"]["train_pairs"] == 6 and record["final"]["pairs"] == 3
    assert record["train"]["steps"] == 2
    assert set(record["final"]) >= {"accuracy", "mean_margin", "length_pearson"}
    assert set(record["final"]["by_kind"]) == {"sampled"}  # the kind written by write_pairs is read back
    frozen = load_file(str(tmp_path / "run" / "trainable.safetensors"))  # top layer + final norm + head only
    assert all(".layers.0." not in n and "embed" not in n for n in frozen) and any(".layers.1." in n for n in frozen)
    assert "score.weight" in frozen


# ---- the entry point -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_trains_every_parameter_and_writes_eval(tmp_path):
    cmd = [sys.executable, "-m", "agents.reward_model", "+env=arithmetic", "+experiment=smoke",
           f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "held-out accuracy" in proc.stdout
    record = json.loads((tmp_path / "eval.json").read_text())
    for key in ("accuracy", "mean_margin", "length_pearson"):
        assert key in record["final"] and key in record["initial"]
    assert record["final"]["pairs"] >= 1 and record["train"]["steps"] >= 1
    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose("reward_model", overrides=["+env=arithmetic", "+experiment=smoke"])
    cfg = merge_schema(raw, RewardModelConfig)
    fresh, _ = build_model(cfg)
    initial = trainable_parameters(fresh)
    saved = load_file(str(tmp_path / "trainable.safetensors"))
    assert set(saved) == set(initial) and any("score" in n for n in saved) and any("lora_A" in n for n in saved)
    unchanged = [n for n, p in initial.items() if torch.equal(p.detach().cpu(), saved[n])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    rm = SequenceClassifierReward(str(tmp_path / "reward_model"))  # a plain classifier directory
    assert rm.score([PAIRS[0].context + [{"role": "assistant", "content": "5"}]]).shape == (1,)
    assert list((tmp_path / "tensorboard").iterdir()) and (tmp_path / "metrics.jsonl").is_file()
    assert (tmp_path / "pairs_train.jsonl").is_file()


# ---- configuration ---------------------------------------------------------------------------------------------


def test_hydra_composition():
    with initialize_config_dir(config_dir=CONF, version_base=None):
        plain = merge_schema(compose("reward_model"), RewardModelConfig)
        arith = merge_schema(compose("reward_model", overrides=["+env=arithmetic", "kind=pairwise",
                                                                "policy.model=tiny"]), RewardModelConfig)
    assert plain.env.task == "embedded" and plain.data.generator == "embedded" and plain.kind == "bt"
    assert arith.env.task == "arithmetic" and arith.env.reward == "verifier" and arith.kind == "pairwise"
    assert arith.data.generator == "tiny"  # follows the backbone unless set
    validate(plain)
    validate(arith)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "kind", "ranker"), "kind is 'ranker'; allowed: bt, pairwise"),
    (lambda c: setattr(c.data, "source", "web"), "data.source is 'web'"),
    (lambda c: setattr(c.data, "n", 1), "data.n"),
    (lambda c: setattr(c.data, "min_gap", 0.0), "data.min_gap must be > 0"),
    (lambda c: setattr(c, "iterations", 0), "iterations"),
    (lambda c: setattr(c, "trainable_layers", -1), "trainable_layers must be >= 0"),
    (lambda c: setattr(c.sampling, "temperature", 0.0), "sampling.temperature must be > 0"),
    (lambda c: setattr(c.data, "source", "file"), "data.source=file needs data.path"),
    (lambda c: (setattr(c.data, "source", "file"), setattr(c.data, "path", "/nonexistent.jsonl")),
     "data.path '/nonexistent.jsonl' is not a file"),
    (lambda c: setattr(c.data, "source", "hub"), "data.source=hub needs data.hub_id"),
    (lambda c: setattr(c.env, "task", "chess"), "env.task is 'chess'"),
])
def test_bad_settings_fail_before_any_model_loads(change, message):
    cfg = RewardModelConfig()
    change(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_unknown_key_is_an_error():
    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose("reward_model", overrides=["+optim.learning_rate=3"])
    with pytest.raises(ConfigError, match="learning_rate"):
        merge_schema(raw, RewardModelConfig)
