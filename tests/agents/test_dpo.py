"""DPO agent: preference-data layouts and errors, token-exact pairs (loss only on the final reply), online pair
wiring (n branches, best vs worst, ties dropped, immediate vs future reward), the reference policy, bad
configuration before any model loads, and end-to-end smoke runs in a subprocess (both modes, parameters changed,
eval.json, resume equals an uninterrupted run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents.common.batching import Reply, collate, reply_logprobs
from agents.common.branching import Branch, Tree
from agents.common.config import ConfigError, merge_schema
from agents.common.logging import read_metrics
from agents.common.policy import PolicySettings, load_policy, trainable_parameters
from agents.common.train import Pair
from agents.dpo.config import DpoConfig
from agents.dpo.data import Preference, load_preferences, parse_record, tokenize_pair
from dialogue_gym.conversation import DialogueState, new_rng_state
from dialogue_gym.generation import prompt_token_ids
from tests.kill import run_killed_after

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
FIXTURE = ROOT / "tests" / "fixtures" / "dpo_preferences.jsonl"
TINY = PolicySettings(model="tiny", lora_r=4, lora_alpha=8)
U1, A1, U2 = ({"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."},
              {"role": "user", "content": "A bigger one?"})


def _cfg(*overrides: str) -> DpoConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose(config_name="dpo", overrides=list(overrides))
    return merge_schema(raw, DpoConfig)


# ---- preference data ------------------------------------------------------------------------------------------


def test_project_layout_keeps_the_multi_turn_context():
    p = parse_record({"context": [U1, A1, U2], "chosen": "11.", "rejected": "8."}, "line 1")
    assert p == Preference([U1, A1, U2], "11.", "8.")


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": [U1, A1, U2], "chosen": "11.", "rejected": "8."},  # prompt messages + reply strings
        {"prompt": [U1, A1, U2], "chosen": [{"role": "assistant", "content": "11."}],  # TRL conversational
         "rejected": [{"role": "assistant", "content": "8."}]},
        {"chosen": [U1, A1, U2, {"role": "assistant", "content": "11."}],  # whole dialogues (hh-rlhf-trl-style)
         "rejected": [U1, A1, U2, {"role": "assistant", "content": "8."}], "prompt": "Name a prime."},
        {"chosen": "\n\nHuman: Name a prime.\n\nAssistant: 7.\n\nHuman: A bigger one?\n\nAssistant: 11.",
         "rejected": "\n\nHuman: Name a prime.\n\nAssistant: 7.\n\nHuman: A bigger one?\n\nAssistant: 8."},
    ],
    ids=["prompt-messages", "trl-conversational", "dialogues", "hh-text"],
)
def test_public_layouts_give_the_same_preference(record):
    assert parse_record(record, "row 0") == Preference([U1, A1, U2], "11.", "8.")


def test_a_string_prompt_is_one_user_turn():
    p = parse_record({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "row 0")
    assert p == Preference([{"role": "user", "content": "Hi"}], "Hello!", "Go away.")


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"context": [U1], "chosen": "7 ", "rejected": "7"}, "identical_replies"),
        ({"context": [U1], "chosen": " ", "rejected": "7"}, "empty_reply"),
        ({"chosen": [U1, {"role": "assistant", "content": "7"}],
          "rejected": [U2, {"role": "assistant", "content": "8"}]}, "contexts_differ"),
    ],
)
def test_records_without_a_usable_preference_are_dropped_with_a_reason(record, reason):
    assert parse_record(record, "row 0") == reason


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"context": [U1], "chosen": "7"}, "line 3 has no field 'rejected'"),
        ({"context": [U1, A1], "chosen": "7", "rejected": "8"}, "the context must end with a user turn"),
        ({"context": [U1], "chosen": 7, "rejected": "8"}, "field 'chosen' must be a string"),
        ({"context": [A1, U1], "chosen": "7", "rejected": "8"}, "line 3 field 'context'[0].role is 'assistant'"),
        ({"context": "Hi", "chosen": "7", "rejected": "8"}, "must be a list of message dicts"),
        (["not", "an", "object"], "line 3 must be a JSON object"),
        ({"chosen": 1.5, "rejected": 2.5}, "must be a reply string or a dialogue"),
    ],
)
def test_malformed_records_name_the_line_and_the_field(record, fragment):
    with pytest.raises(ConfigError) as e:
        parse_record(record, "line 3")
    assert fragment in str(e.value)


def test_load_file_counts_drops_and_caps_pairs(tmp_path):
    prefs, dropped = load_preferences("file", str(FIXTURE), None)
    assert len(prefs) == 4 and dropped == {"identical_replies": 1}
    assert [len(p.context) for p in prefs] == [1, 3, 4, 1]  # multi-turn contexts, one with a system message
    assert len(load_preferences("file", str(FIXTURE), None, max_pairs=2)[0]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n\n{not json\n")
    with pytest.raises(ConfigError, match="data.path line 3 is not valid JSON"):
        load_preferences("file", str(bad), None)


def test_the_hh_rlhf_trl_style_fixture_loads_as_multi_turn_pairs():
    prefs, _ = load_preferences("file", str(ROOT / "tests" / "fixtures" / "hh_rlhf_trl_style.jsonl"), None)
    assert prefs and any(len(p.context) > 1 for p in prefs)
    assert all(p.context[-1]["role"] == "user" and p.chosen != p.rejected for p in prefs)


def test_pair_tokens_are_the_policy_prompt_and_the_reply_plus_end_of_turn():
    _, tok = load_policy(PolicySettings(model="tiny", lora_r=0), seed=0)
    pair = tokenize_pair(Preference([U1, A1, U2], "11 is prime.", "8."), tok)
    assert pair.a.prompt_ids == prompt_token_ids(tok, [U1, A1, U2]) == pair.b.prompt_ids  # what the policy sees
    assert pair.a.token_ids[-1] == tok.eos_token_id  # the token that ends a sampled reply
    assert tok.decode(pair.a.token_ids[:-1]) == "11 is prime."
    assert (pair.reward_a, pair.reward_b, pair.turn) == (1.0, 0.0, 2)
    _, _, loss_mask = collate([pair.a, pair.b], pad_id=0)
    assert loss_mask.sum(1).tolist() == [len(pair.a.token_ids), len(pair.b.token_ids)]  # only the final reply


# ---- online pairs: n branches, best vs worst ------------------------------------------------------------------


class _Venv:
    def __init__(self, num_envs: int, horizon: int = 5):
        self.num_envs = num_envs
        self.max_turns = horizon  # the env's public horizon


def _state(h: int) -> DialogueState:
    msgs = []
    for _ in range(h - 1):
        msgs += [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs.append({"role": "user", "content": "q"})
    return DialogueState(msgs, h - 1, 5, "r", {}, new_rng_state(0), "f")


def _wire(monkeypatch, rewards, texts=None):
    """Fake the branching primitive (trees at the planned turns, with given rewards/texts per branch) and call DPO's
    pair collection (collect_pairs with k = n, best vs worst); records the plan."""
    import agents.common.rollout as rollout

    seen = {}

    def fake_grow(rollin, branches, engine, params, plan):
        seen["turns"], seen["k"], seen["starts"] = list(plan.turns), plan.k, len(plan.starts)
        seen["horizons"] = [max(hp, h) if plan.complete else h for hp, h in zip(plan.horizons, plan.turns)]
        out = []
        for i, h in enumerate(plan.turns):
            row = []
            for j in range(plan.k):
                text = texts[i][j] if texts else f"reply {i} {j}"
                reply = Reply([1, 2], [10 + j, 2] if not texts else [len(text), 2], text)
                row.append(Branch(reply, rewards[i % len(rewards)][j], [], 1, [reply], [rewards[i % len(rewards)][j]]))
            out.append(Tree(_state(h), h, row))
        return out

    monkeypatch.setattr(rollout, "grow", fake_grow)

    def collect(rollin, branches, engine, params, rng, dialogues, n, n_rows, turn_sampling, future, prefix,
                length_penalty):
        return rollout.collect_pairs(rollin, branches, engine, params, rng, dialogues, n_rows, turn_sampling, future,
                                     prefix, k=n, pairing="best_worst", length_penalty=length_penalty)

    return collect, seen


def test_online_pairs_are_best_vs_worst_of_n_and_ties_are_dropped(monkeypatch):
    collect, seen = _wire(monkeypatch, [[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 1.0, 0.0]])
    pairs, stats = collect(_Venv(3), _Venv(12), None, None, np.random.default_rng(0), 3, 4, 10, "reference",
                           False, "on_policy", 0.0)
    assert seen["k"] == 4
    assert [(p.a.text, p.b.text, p.reward_a, p.reward_b) for p in pairs] == [
        ("reply 0 1", "reply 0 0", 0.9, 0.1),  # best vs worst of the four
        ("reply 2 0", "reply 2 1", 1.0, 0.0),  # among equal scores the lowest index wins
    ]
    assert stats["env/pairs"] == 2 and stats["env/ties_dropped"] == 1  # all four equal: no preference
    assert stats["env/reward_chosen"] == pytest.approx(0.95) and stats["env/mean_return"] == pytest.approx(4.9 / 12)
    assert [p.turn for p in pairs] == [seen["turns"][0], seen["turns"][2]]


def test_every_context_of_the_iteration_is_planned_at_once(monkeypatch):
    """The chunking (rollout_batch) happens inside the primitive, after the whole plan is drawn
    (tests/agents/test_branching.py checks that the trees do not depend on the chunk size)."""
    collect, seen = _wire(monkeypatch, [[0.0, 1.0]] * 2)
    pairs, stats = collect(_Venv(2), _Venv(4), None, None, np.random.default_rng(0), 6, 2, 10, "reference", False,
                           "on_policy", 0.0)
    assert seen["starts"] == 6 and len(pairs) == 6 and stats["env/pairs"] == 6


def test_immediate_reward_ends_branches_at_h_and_future_completes_them(monkeypatch):
    rewards = [[0.0, 1.0]] * 8
    collect, seen = _wire(monkeypatch, rewards)
    collect(_Venv(8), _Venv(16), None, None, np.random.default_rng(0), 8, 2, 10, "reference", False, "on_policy", 0.0)
    assert seen["horizons"] == seen["turns"]  # the env scores the turn-h reply itself
    collect(_Venv(8), _Venv(16), None, None, np.random.default_rng(0), 8, 2, 10, "reference", True, "on_policy", 0.0)
    assert all(H >= h for H, h in zip(seen["horizons"], seen["turns"]))
    assert any(H > h for H, h in zip(seen["horizons"], seen["turns"]))
    collect(_Venv(8), _Venv(16), None, None, np.random.default_rng(0), 8, 2, 10, "reference", False, "dataset", 0.0)
    assert seen["turns"] == [1] * 8  # offline generation: the task rows' own prefixes
    collect(_Venv(8), _Venv(16), None, None, np.random.default_rng(0), 8, 2, 10, "last", False, "on_policy", 0.0)
    assert seen["turns"] == [5] * 8 and seen["horizons"] == [5] * 8  # last-turn DPO: the horizon H = 5, scored there


def test_length_penalty_can_flip_the_pair(monkeypatch):
    texts = [["short", "a much, much longer reply"]]
    collect, _ = _wire(monkeypatch, [[1.0, 1.01]], texts)
    args = (_Venv(1), _Venv(2), None, None, np.random.default_rng(0), 1, 2, 10, "uniform", False, "on_policy")
    assert collect(*args, 0.0)[0][0].a.text == texts[0][1]  # higher reward wins without a penalty
    assert collect(*args, 0.001)[0][0].a.text == "short"  # 1.01 − 0.025 < 1.0 − 0.005


def test_token_identical_best_and_worst_are_dropped(monkeypatch):
    collect, _ = _wire(monkeypatch, [[0.0, 1.0]], [["same", "same"]])
    pairs, stats = collect(_Venv(1), _Venv(2), None, None, np.random.default_rng(0), 1, 2, 10, "uniform", True,
                           "on_policy", 0.0)
    assert pairs == [] and stats["env/identical_pairs_dropped"] == 1


# ---- the reference policy -------------------------------------------------------------------------------------


def test_reference_is_the_initial_policy_or_the_current_iterate():
    from agents.common.config import OptimSettings
    from agents.dpo.__main__ import reference_logprobs
    from dialogue_gym.models import load_model

    model, tok = load_policy(TINY, seed=0)
    with torch.no_grad():  # move away from the initial policy
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    pairs = [tokenize_pair(Preference([U1, A1, U2], "11.", "8."), tok)]
    base, _ = load_model("tiny", shared=False)
    replies = [pairs[0].a, pairs[0].b]
    with torch.no_grad():
        initial = reply_logprobs(base, replies, 0)
        current = reply_logprobs(model, replies, 0)
    assert not torch.allclose(initial, current)
    sft = [Pair(p.a, p.b, 1.0, 0.0, 2) for p in pairs]
    reference_logprobs(model, None, sft, True, 0, OptimSettings())  # LoRA: adapter disabled
    assert [sft[0].ref_a, sft[0].ref_b] == pytest.approx(initial.tolist(), abs=1e-4)
    reference_logprobs(model, None, pairs, False, 0, OptimSettings())  # previous: the current weights
    assert [pairs[0].ref_a, pairs[0].ref_b] == pytest.approx(current.tolist(), abs=1e-4)


# ---- bad configuration: clear, and before any model loads -----------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import agents.dpo.__main__ as dpo_main

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the configuration was validated")

    monkeypatch.setattr(dpo_main, "load_policy", forbidden)
    monkeypatch.setattr("dialogue_gym.models.load_model", forbidden)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["beta=0"], "beta must be > 0"),
        (["beta=-0.1"], "beta must be > 0"),
        (["n=1"], "n (replies sampled per context) must be >= 2"),
        (["mode=semi"], "mode is 'semi'; allowed: offline, online"),
        (["label_smoothing=0.5"], "label_smoothing must be in [0, 0.5)"),
        (["length_penalty=-1"], "length_penalty must be >= 0"),
        (["reference=ema"], "reference is 'ema'; allowed: sft, previous"),
        (["mode=offline", "reference=previous"], "reference=previous needs mode=online"),
        (["mode=offline", "data.source=csv"], "data.source is 'csv'; allowed: task, file, hub"),
        (["mode=offline", "data.source=file"], "data.source=file needs data.path"),
        (["mode=offline", "data.source=file", "data.path=/nonexistent.jsonl"], "is not a file"),
        (["mode=offline", "data.source=hub"], "data.source=hub needs data.hub_id"),
        (["turn_sampling=first"], "turn_sampling is 'first'; allowed: reference, uniform, last"),
        (["mode=offline", "data.prefix=row"], "data.prefix is 'row'; allowed: on_policy, dataset"),
        (["iterations=0"], "iterations must be >= 1"),
        (["steps=-1"], "steps (optimizer steps per iteration) must be >= 0"),
        (["rollout_batch=3"], "rollout_batch must be 0 or divide dialogues (16)"),
        (["env.task=chess"], "env.task is 'chess'"),
        (["eval.dialogues=100000"], "eval.dialogues is 100000 but the test split"),
    ],
)
def test_bad_configuration_fails_before_any_model_loads(overrides, fragment, no_model_loads, tmp_path):
    from agents.dpo.__main__ import run

    cfg = _cfg(*overrides)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert fragment in str(e.value)


def test_a_malformed_data_file_fails_before_any_model_loads(no_model_loads, tmp_path):
    from agents.dpo.__main__ import run

    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"context": [{"role": "user", "content": "Hi"}], "chosen": "Hello"}\n')
    cfg = _cfg("mode=offline", "data.source=file", f"data.path={bad}")
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="data.path line 1 has no field 'rejected'"):
        run(cfg)


def test_config_composes_with_smoke_and_every_env():
    cfg = _cfg("+experiment=smoke", "mode=offline", f"data.path={FIXTURE}", "data.source=file")
    assert cfg.policy.model == "tiny" and cfg.mode == "offline"
    for env_name in ("embedded", "arithmetic", "ultrainteract", "anthropic_hh"):
        assert _cfg(f"+env={env_name}").env.task == env_name


# ---- end to end, in a subprocess ------------------------------------------------------------------------------


def agent_command(run_dir: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "agents.dpo", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    return cmd, {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_agent(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd, env = agent_command(run_dir, *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def strip_perf(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def assert_trained(run_dir: Path, name: str) -> None:
    """Finite losses, every LoRA tensor moved from its initial value, eval.json before/after, exported policy."""
    rows = read_metrics(run_dir)
    assert len(rows) == 2  # two iterations
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and r["env/pairs"] >= 1
    saved = load_file(str(run_dir / "checkpoints" / "last" / "trainable.safetensors"))
    fresh, _ = load_policy(TINY, seed=0)
    initial = trainable_parameters(fresh)
    assert set(saved) == set(initial) and len(saved) > 0
    unchanged = [n for n, p in initial.items() if torch.equal(p.detach().cpu(), saved[n])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    evals = json.loads((run_dir / "eval.json").read_text())["evaluations"]
    assert [e["policy"].split(" after")[0] for e in evals] == ["initial", name]
    assert len(evals[1]["win_rate"]) == 2 and all(0 <= w <= 1 for w in evals[1]["win_rate"])
    assert (run_dir / "policy" / "config.json").is_file()


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """One uninterrupted online smoke run (2 iterations, n = 3), shared by the smoke and resume tests."""
    run_dir = tmp_path_factory.mktemp("dpo_online")
    run_agent(run_dir, "mode=online", "n=3")
    return run_dir


@pytest.mark.slow
def test_online_smoke_trains_every_parameter_and_writes_outputs(online_run):
    assert_trained(online_run, "DPO")
    assert all(r["env/pairs"] + r["env/ties_dropped"] + r["env/identical_pairs_dropped"] == 2
               for r in read_metrics(online_run))


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["stop_after", "sigkill"])
def test_online_resume_equals_an_uninterrupted_run(interruption, online_run, tmp_path):
    """Stopped by ``stop_after``, or killed with SIGKILL right after iteration 1's checkpoint (tests/kill.py)."""
    if interruption == "stop_after":
        run_agent(tmp_path, "mode=online", "n=3", "stop_after=1", "export=false")
        assert len(read_metrics(tmp_path)) == 1
    else:
        cmd, env = agent_command(tmp_path, "mode=online", "n=3", "export=false")
        run_killed_after(cmd, tmp_path, 1, env, ROOT)
    run_agent(tmp_path, "mode=online", "n=3", "resume=true", "export=false")
    assert strip_perf(read_metrics(tmp_path)) == strip_perf(read_metrics(online_run))
    final = [json.loads((d / "eval.json").read_text())["evaluations"][-1]["scores"] for d in (online_run, tmp_path)]
    assert final[0] == final[1]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["file", "task"])
def test_offline_smoke_trains_every_parameter(source, tmp_path):
    extra = [f"data.path={FIXTURE}", "steps=5"] if source == "file" else ["n=3"]  # file: exactly 5 steps each
    run_agent(tmp_path, "mode=offline", f"data.source={source}", *extra)
    assert_trained(tmp_path, "offline DPO")
    rows = read_metrics(tmp_path)
    if source == "file":
        assert rows[0]["env/pairs"] == 4 and rows[0]["env/dropped_identical_replies"] == 1
        assert [r["loss/steps"] for r in rows] == [5, 5]  # 4 pairs, more than one pass: the passes are cut at 5
    else:
        assert all(r["loss/steps"] >= 1 for r in rows)
    assert rows[1]["loss/reward_accuracy"] >= 0.0 and rows[0]["env/pairs"] == rows[1]["env/pairs"]  # fixed pairs


@pytest.mark.slow
def test_unknown_mode_on_the_command_line_is_a_clear_error(tmp_path):
    proc = run_agent(tmp_path, "mode=semi", check=False)
    assert proc.returncode != 0
    assert "mode is 'semi'; allowed: offline, online" in proc.stderr
    assert not (tmp_path / "eval.json").exists()
