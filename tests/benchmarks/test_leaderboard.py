"""The leaderboard: win rates by hand, identical states and user seeds for every agent, shared settings imposed on
every agent, the budget stop, resuming, bad settings, and the smoke preset end to end."""

from __future__ import annotations

import copy
import csv
import importlib
import json
import math
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file
from scipy import stats

import dialogue_gym  # noqa: F401
from agents.common.checkpoint import completed_iterations, export_checkpoint_policy
from agents.common.config import ConfigError, merge_schema
from benchmarks import leaderboard as lb
from benchmarks.leaderboard import jobs as lb_jobs
from benchmarks.leaderboard.agents import base_package
from benchmarks.leaderboard.probe import replies_digest
from benchmarks.leaderboard.report import DIGEST_FIELD, STATE_FIELDS
from benchmarks.leaderboard.runner import run_priority
from benchmarks.leaderboard.stats import crossed_ci, paired_rows, seed_detectable, seed_power
from dialogue_gym.budget import Usage
from dialogue_gym.generation.base import Generation, SamplingParams
from dialogue_gym.rollouts import DialogueRecord, RolloutStore, make_states, stored_states

ROOT = Path(__file__).resolve().parents[2]
ARITH = dict(task="arithmetic", task_kwargs={"n_train": 20, "n_test": 10}, max_turns=2)


def smoke_config(tmp_path: Path, *overrides: str) -> lb.LeaderboardConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        raw = compose(config_name="leaderboard", overrides=["+leaderboard=smoke", *overrides])
    raw.results_dir = str(tmp_path / "results")
    cfg = merge_schema(raw, lb.LeaderboardConfig)
    cfg.run_dir = str(tmp_path / "run")
    return cfg


def eval_venv(n: int):
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", split="test",
                        reward_mode="per_turn", **ARITH)


class FixedEngine:
    """A policy that answers ``replies[turn]`` whatever the prompt (seeds recorded)."""

    def __init__(self, replies):
        self.replies = replies
        self.seeds = []

    def generate(self, prompts, params, seeds=None, return_logprobs=False):
        self.seeds.append(list(seeds))
        out = []
        for p in prompts:
            turn = sum(m["role"] == "assistant" for m in p)
            out.append(Generation(text=self.replies[turn], token_ids=[5, 6, 2], logprobs=[-0.5, -1.0, -0.25]))
        return out


# ---- the evaluation protocol ----------------------------------------------------------------------------------

def test_two_agents_get_identical_states_and_user_seeds(tmp_path):
    venv = eval_venv(4)
    store = RolloutStore(tmp_path / "states.jsonl")
    states = stored_states(store, venv.core, 4, seed=9)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    a = lb.play_states(venv, FixedEngine(["The answer is 1.", "The answer is 2."]), params, states, "a")
    b = lb.play_states(eval_venv(4), FixedEngine(["The answer is 1.", "I am not sure."]), params,
                       stored_states(RolloutStore(tmp_path / "states.jsonl"), eval_venv(4).core, 4, seed=9), "b")
    for ra, rb, s in zip(a, b, states):
        assert ra.start == rb.start == s.id and ra.start_hash == rb.start_hash == s.state_hash
        assert ra.seeds == rb.seeds == {"policy": s.policy_seed}
        assert ra.messages[:3] == rb.messages[:3]  # same reply at turn 1 -> the same critique: the same user seeds
        assert ra.messages[2]["role"] == "user" and ra.messages[3] != rb.messages[3]
        assert ra.rewards == [0.0, 0.0] and ra.truncated and ra.token_ids == [[5, 6, 2]] * 2
        assert ra.logprobs == [[-0.5, -1.0, -0.25]] * 2 and ra.config == b[0].config
    # the critiques follow the stored user seeds: another seed picks other critiques for the same replies
    other = lb.play_states(eval_venv(4), FixedEngine(["The answer is 1.", "The answer is 2."]), params,
                           make_states(venv.core, 4, seed=10), "a")
    assert [r.messages[2] for r in other] != [r.messages[2] for r in a]


@pytest.mark.vllm
@pytest.mark.embedded
def test_the_stored_states_are_played_on_vllm_as_on_hf(tmp_path):
    """policy_engine=vllm: the evaluation plays the same states with the same user seeds on a vLLM engine; greedy
    replies of the embedded policy are the HF engine's (up to near-ties; none on these states)."""
    venv = eval_venv(3)
    states = stored_states(RolloutStore(tmp_path / "states.jsonl"), venv.core, 3, seed=9)
    played = {}
    for engine in ("hf", "vllm"):
        cfg = lb.LeaderboardConfig(policy="embedded", policy_engine=engine, max_new_tokens=12,
                                   eval=lb.EvalProtocol(states=3, temperature=0.0))
        store = RolloutStore(tmp_path / f"{engine}.jsonl")
        records, _ = lb.evaluate(cfg, eval_venv(3), "embedded", states, store, engine, {"engine": engine})
        assert [r.start for r in records] == [s.id for s in states] and len(store.dialogues()) == 3
        assert all(r.logprobs and all(len(lp) == len(t) for lp, t in zip(r.logprobs, r.token_ids)) for r in records)
        played[engine] = records
    assert [r.messages for r in played["vllm"]] == [r.messages for r in played["hf"]]


def test_a_dialogue_solved_on_its_last_turn_is_stored_as_terminated(tmp_path):
    venv = eval_venv(1)
    state = make_states(venv.core, 1, seed=0)
    answer = state[0].state.profile["answer"]
    records = lb.play_states(venv, FixedEngine(["I am not sure.", f"The answer is {answer:g}."]), SamplingParams(),
                             state, "p")
    assert records[0].terminated and not records[0].truncated and records[0].rewards == [0.0, 1.0]
    store = RolloutStore(tmp_path / "d.jsonl")
    store.append(records)
    assert store.dialogues()[0].terminated and not store.dialogues()[0].truncated


def test_policy_seeds_depend_on_the_state_and_turn_only():
    venv = eval_venv(3)
    states = make_states(venv.core, 3, seed=0)
    engine = FixedEngine(["x", "y"])
    lb.play_states(venv, engine, SamplingParams(), states, "p")
    assert engine.seeds == [[lb.turn_seed(s.policy_seed, t) for s in states] for t in (0, 1)]
    engine2 = FixedEngine(["x", "y"])
    lb.play_states(eval_venv(2), engine2, SamplingParams(), states[1:], "p")  # another batch, same seeds per state
    assert engine2.seeds == [row[1:] for row in engine.seeds]


def record(state, policy: str, replies: list[str], rewards: list[float]) -> DialogueRecord:
    messages = list(state.state.messages)
    for k, text in enumerate(replies):
        messages.append({"role": "assistant", "content": text})
        if k < len(replies) - 1:
            messages.append({"role": "user", "content": "Try again."})
    return DialogueRecord(id=f"{policy}/{state.id}", policy=policy, messages=messages, rewards=rewards,
                          token_ids=[[]] * len(rewards), start=state.id)


def test_win_rate_score_and_success_by_hand(tmp_path):
    core = eval_venv(1).core
    states = make_states(core, 2, seed=0)
    right = [f"The answer is {s.state.profile['answer']:g}." for s in states]
    wrong = "The answer is -1."
    # turn-h scores, carried forward after the end:  state 0        state 1
    baseline = [record(states[0], "initial", [wrong, wrong], [0.0, 0.0]),  # 0 0
                record(states[1], "initial", [wrong, right[1]], [0.0, 1.0])]  # 0 1
    seed0 = [record(states[0], "refuel/seed-0", [right[0]], [1.0]),  # 1 (1): solved at turn 1
             record(states[1], "refuel/seed-0", [wrong, wrong], [0.0, 0.0])]  # 0 0
    seed1 = [record(s, "refuel/seed-1", [m["content"] for m in r.messages if m["role"] == "assistant"], r.rewards)
             for s, r in zip(states, baseline)]  # plays exactly like the initial policy
    runs = [lb.AgentRun("refuel", 0, 3, 3, "completed", Usage(policy_samples=10, policy_tokens=50,
                                                               scored_conversations=4, reward_calls=2), 30.0, 2.0,
                        records=seed0),
            lb.AgentRun("refuel", 1, 3, 2, "budget", Usage(policy_samples=12, policy_tokens=70,
                                                            scored_conversations=6, reward_calls=4), 50.0, 4.0,
                        records=seed1)]
    cfg = lb.LeaderboardConfig(agents=["refuel", "ppo"], seeds=[0, 1], env=lb.EnvSettings(**ARITH),
                               results_dir=str(tmp_path), eval=lb.EvalProtocol(states=2, n_boot=200))
    rows, paired, mats = lb.summarize(cfg, runs, baseline, states, core.task.make_reward("verifier"))
    get = {(r["policy"], r["seed"], r["turn"]): r for r in rows}
    # seed 0: h=1 win (1 > 0) and tie (0 = 0) -> .75; h=2 win (1 > 0) and loss (0 < 1) -> .5; seed 1: all ties
    assert get["refuel", "0", 1]["win"] == 0.75 and get["refuel", "0", 2]["win"] == 0.5
    assert get["refuel", "1", 1]["win"] == 0.5 and get["refuel", "1", 2]["win"] == 0.5
    assert get["refuel", "all", 1]["win"] == (1 + 0.5 + 0.5 + 0.5) / 4
    assert get["refuel", "all", 2]["win"] == (1 + 0 + 0.5 + 0.5) / 4
    assert get["initial", "all", 1]["win"] == 0.5 and get["initial", "all", 2]["score"] == 0.5
    assert get["refuel", "0", 1]["score"] == 0.5 and get["refuel", "all", 2]["score"] == (1 + 0 + 0 + 1) / 4
    # success: the verifier accepted a reply at or before turn h
    assert get["initial", "all", 1]["success"] == 0.0 and get["initial", "all", 2]["success"] == 0.5
    assert get["refuel", "0", 1]["success"] == 0.5 and get["refuel", "all", 2]["success"] == 0.5
    lo, hi = get["refuel", "all", 1]["win_lo"], get["refuel", "all", 1]["win_hi"]
    # the crossed interval of the (seeds, states) win matrix at h=1 (seed 100 + h - 1, as metric_rows draws it)
    assert (0.625, lo, hi) == crossed_ci(np.array([[1.0, 0.5], [0.5, 0.5]]), n_boot=200, seed=100)
    assert lo < 0.625 < hi and (0.625 - lo) == pytest.approx(hi - 0.625)
    assert get["refuel", "all", 1]["policy_samples"] == 11 and get["refuel", "all", 1]["stopped_by_budget"] == 1
    assert get["refuel", "0", 1]["train_s"] == 30.0

    meta = {"started": "2026-01-01T00:00:00", "wall_s": 60.0, "load_start": (1.0, 1.0, 1.0),
            "load_end": (2.0, 2.0, 2.0), "command": "python -m benchmarks.leaderboard x=1", "calibration": {},
            "states": 2, "pending": ["ppo/seed-0", "ppo/seed-1"]}
    lb.write_report(cfg, rows, paired, runs, meta, mats)  # a partial report: ppo has not run yet
    md = (tmp_path / "leaderboard.md").read_text()
    assert "**Partial results**: 2 agent run(s) still to come when this was written: ppo/seed-0, ppo/seed-1" in md
    assert "| ppo |" not in md and {r["policy"] for r in rows} == {"initial", "refuel"}
    assert "| refuel | 0.625 [" in md and "python -m benchmarks.leaderboard x=1" in md
    assert "| refuel | own | 2.5/3.0 | 1/2 | 11 | 0.0 | 60 | 5 | 3 | 40 | 3 |" in md
    assert "| refuel | 1 | budget (2/3) | 0.500 | 0.500 | 0.500 |" in md and "torch" in md and "cores" in md
    with (tmp_path / "leaderboard.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[0]["policy"] == "initial" and float(table[2]["win"]) == 0.625
    assert (tmp_path / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every policy's result on every state: (1 initial + 2 seeds) x 2 states x 2 turns rows, the numbers above
    with (tmp_path / "leaderboard_states.csv").open() as f:
        cells = {(r["policy"], r["seed"], r["state"], r["turn"]): r for r in csv.DictReader(f)}
    assert len(cells) == 12 and all(r["probe"] == "" and r["asks"] == "" for r in cells.values())
    assert cells["refuel", "0", states[0].id, "1"]["success"] == "1.0" and \
        cells["refuel", "0", states[1].id, "2"]["win"] == "0.0"
    assert cells["initial", "", states[1].id, "2"]["score"] == "1.0"
    # and the report's numbers come back from it alone
    again = lb.read_states(tmp_path / "leaderboard_states.csv")
    assert again.seeds == {"refuel": [0, 1]} and again.states == [s.id for s in states]
    for policy, group in mats.groups.items():
        assert again.groups[policy].keys() == group.keys()
        assert all(np.array_equal(again.groups[policy][m], group[m]) for m in group)
    assert paired_rows(again.groups, again.seeds, 200) == paired
    # a cut file, or another CSV, is named, not read as zeros
    lines = (tmp_path / "leaderboard_states.csv").read_text().splitlines()
    (tmp_path / "cut.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"cut.csv: policy 'refuel' has 7 rows \(7 distinct\) where its 2 seed\(s\) x "
                                         r"2 states x 2 turns need one each"):
        lb.read_states(tmp_path / "cut.csv")
    with pytest.raises(ValueError, match=r"leaderboard.csv: not a leaderboard states file: columns \['state', "):
        lb.read_states(tmp_path / "leaderboard.csv")


def test_runs_on_new_seeds_pool_with_the_earlier_ones_through_their_states_files(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def mats(seeds, initial, digest="d1"):
        groups = {"initial": {"success": initial, "probe": np.zeros((1, 2, 1))},
                  "refuel": {"success": rng.integers(0, 2, (len(seeds), 3, 2)).astype(float),
                             "probe": rng.normal(size=(len(seeds), 2, 1))}}
        return lb.Matrices(groups, {"refuel": list(seeds)}, ["s0", "s1", "s2"], [True, False, True], digest)

    initial = rng.integers(0, 2, (1, 3, 2)).astype(float)
    first, second = mats([5, 6], initial), mats([7], initial)
    for name, m in (("a", first), ("b", second)):  # through the files, as a later session would
        lb.write_states(tmp_path / f"{name}.csv", m)
    pooled = lb.merge_states(lb.read_states(tmp_path / "a.csv"), lb.read_states(tmp_path / "b.csv"))
    assert pooled.seeds == {"refuel": [5, 6, 7]} and pooled.covered == [True, False, True]
    assert pooled.probe_replies == "d1"
    for k in ("success", "probe"):
        assert np.array_equal(pooled.groups["refuel"][k],
                              np.concatenate([first.groups["refuel"][k], second.groups["refuel"][k]]))
    row = {(p["a"], p["metric"], p["turn"]): p for p in paired_rows(pooled.groups, pooled.seeds, 200)}
    assert row["refuel", "success", 2]["seeds"] == 3 and row["refuel", "success", 2]["diff"] == pytest.approx(
        (pooled.groups["refuel"]["success"][:, :, 1] - initial[:, :, 1]).mean())
    with pytest.raises(ValueError, match=r"agent 'refuel' ran seed\(s\) \[5, 6\] in both runs"):
        lb.merge_states(first, first)
    other = mats([7], 1 - initial)
    with pytest.raises(ValueError, match="the initial policy's results differ"):
        lb.merge_states(first, other)
    moved = mats([7], initial)
    moved.states = ["s0", "s1", "s9"]
    with pytest.raises(ValueError, match="different stored states"):
        lb.merge_states(first, moved)
    with pytest.raises(ValueError, match=r"the probe's replies differ between the two runs \(digest d1 vs d2\)"):
        lb.merge_states(first, mats([7], initial, "d2"))
    # a states file written before the digest existed: read as unknown, pooled, and the known digest kept
    old = tmp_path / "old.csv"
    with (tmp_path / "b.csv").open() as f:
        table = list(csv.DictReader(f))
    with old.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STATE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    assert lb.read_states(old).probe_replies is None
    assert lb.merge_states(lb.read_states(old), first).probe_replies == "d1"
    assert lb.merge_states(lb.merge_states(lb.read_states(old), first), mats([8], initial, "d1")).seeds == \
        {"refuel": [7, 5, 6, 8]}
    with pytest.raises(ValueError, match="the probe's replies differ"):  # the unknown one does not hide a change
        lb.merge_states(lb.merge_states(lb.read_states(old), first), mats([8], initial, "d2"))
    table[0][DIGEST_FIELD] = "d9"  # an initial row that names another digest: an edited or concatenated file
    with (tmp_path / "two.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*STATE_FIELDS, DIGEST_FIELD])
        writer.writeheader()
        writer.writerows(table)
    with pytest.raises(ValueError, match=r"two.csv: the rows name 2 probe replies digests \(d1, d9\)"):
        lb.read_states(tmp_path / "two.csv")
    # the same from the shell (python -m benchmarks.leaderboard.pool): the pooled tables, or why it refuses (exit 2)
    from benchmarks.leaderboard import pool

    assert pool.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--n-boot", "200"]) == 0
    out, want = capsys.readouterr().out, row["refuel", "success", 2]
    assert "seeds refuel: [5, 6, 7]; 3 states" in out and "## Paired differences in success at turn h, h=2" in out
    assert f"| refuel | initial | {want['diff']:+.3f}" in out and "the turn-1 probe" in out
    assert "Probe replies: digest d1 in every file." in out
    with (tmp_path / "a.csv").open() as f:  # the digest sits on the initial policy's rows only
        assert {(r["policy"], r[DIGEST_FIELD]) for r in csv.DictReader(f)} == {("initial", "d1"), ("refuel", "")}
    assert pool.main([str(old), str(tmp_path / "a.csv"), "--n-boot", "200"]) == 0
    assert f"Probe replies not compared: no two files carry a digest; not checked: {old} (written before" \
        in capsys.readouterr().out
    lb.write_states(tmp_path / "c.csv", mats([8], initial, "d1"))
    assert pool.main([str(old), str(tmp_path / "a.csv"), str(tmp_path / "c.csv"), "--n-boot", "200"]) == 0
    assert f"Probe replies: digest d1 in {tmp_path / 'a.csv'}, {tmp_path / 'c.csv'}; not checked: {old}" \
        in capsys.readouterr().out
    # --seeds: a look at the seeds it was read at, after later seeds joined the same files
    assert pool.parse_seeds("5-7,9") == [5, 6, 7, 9] and pool.parse_seeds(" 6 ,5") == [5, 6]
    for bad in ("7-5", "x", "5-", "-1"):
        with pytest.raises(ValueError, match="--seeds: "):
            pool.parse_seeds(bad)
    three = lb.merge_states(lb.merge_states(first, second), mats([8], initial, "d1"))
    look = pool.select_seeds(three, [5, 7])
    assert look.seeds == {"refuel": [5, 7]} and look.probe_replies == "d1"
    for k in ("success", "probe"):
        assert np.array_equal(look.groups["refuel"][k], three.groups["refuel"][k][[0, 2]])
    assert look.groups["initial"] is three.groups["initial"]
    with pytest.raises(ValueError, match=r"agent 'refuel' has no run at seed\(s\) \[9\] in these files \(its seeds: "
                                         r"\[5, 6, 7, 8\]\)"):
        pool.select_seeds(three, [5, 9])
    capsys.readouterr()
    assert pool.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--n-boot", "200", "--seeds", "5,7"]) == 0
    sub = {(p["a"], p["metric"], p["turn"]): p for p in paired_rows(
        {"initial": first.groups["initial"], "refuel": {k: np.concatenate([first.groups["refuel"][k][:1],
                                                                          second.groups["refuel"][k]])
                                                         for k in ("success", "probe")}}, {"refuel": [5, 7]}, 200)}
    out = capsys.readouterr().out
    want = sub["refuel", "success", 2]["diff"]
    assert "seeds refuel: [5, 7]; 3 states" in out and f"| refuel | initial | {want:+.3f}" in out
    assert pool.main([str(tmp_path / "a.csv"), "--seeds", "5-9"]) == 2
    assert "agent 'refuel' has no run at seed(s) [7, 8, 9]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pool.main([str(tmp_path / "a.csv"), "--seeds", "9-5"])
    assert "--seeds: '9-5' is not an ascending range" in capsys.readouterr().err
    lb.write_states(tmp_path / "d.csv", mats([8], initial, "d2"))
    assert pool.main([str(tmp_path / "a.csv"), str(tmp_path / "d.csv")]) == 2
    assert "the probe's replies differ between the two runs (digest d1 vs d2)" in capsys.readouterr().err
    lb.write_states(tmp_path / "other.csv", other)
    assert pool.main([str(tmp_path / "a.csv"), str(tmp_path / "other.csv")]) == 2
    assert "the initial policy's results differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pool.main([str(tmp_path / "a.csv"), str(tmp_path / "nope.csv")])
    assert "no such file: " in capsys.readouterr().err


def test_pool_prints_each_seed_and_the_seed_level_test_at_a_looks_threshold(tmp_path, capsys):
    from benchmarks.leaderboard import pool

    # two agents at seeds 5-8 on 4 states; success by hand: refuel solves 3, 2, 4, 3 of 4 at h=2, dpo_last 1, 2, 0, 1
    def solved(counts):
        return np.stack([np.stack([np.zeros(4), np.r_[np.ones(c), np.zeros(4 - c)]], axis=1) for c in counts])

    initial = solved([2])
    groups = {"initial": {"success": initial, "asks": np.zeros((1, 4, 2))},
              "refuel": {"success": solved([3, 2, 4, 3]), "asks": solved([4, 4, 4, 4])[:, :, ::-1].copy()},
              "dpo_last": {"success": solved([1, 2, 0, 1]), "asks": np.zeros((4, 4, 2))}}
    mats = lb.Matrices(groups, {"refuel": [5, 6, 7, 8], "dpo_last": [5, 6, 7, 8]}, ["s0", "s1", "s2", "s3"],
                       [False] * 4)
    lb.write_states(tmp_path / "a.csv", mats)
    assert pool.main([str(tmp_path / "a.csv"), "--n-boot", "200", "--per-seed", "--alpha", "0.05",
                      "--power-at", "0.2,0.5"]) == 0
    out = capsys.readouterr().out
    # per seed: the means over the states, and the difference seed by seed with its mean (sd)
    diffs = np.array([0.5, 0.0, 1.0, 0.5])  # (3-1, 2-2, 4-0, 3-1) / 4
    assert "## Per seed: success, h=2" in out and "| policy | 5 | 6 | 7 | 8 | mean (sd) |" in out
    assert "| initial | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |" in out
    assert f"| refuel | 0.750 | 0.500 | 1.000 | 0.750 | 0.750 ({np.std([.75, .5, 1, .75], ddof=1):.3f}) |" in out
    assert f"| refuel - dpo_last | +0.500 | +0.000 | +1.000 | +0.500 | 0.500 ({diffs.std(ddof=1):.3f}) |" in out
    assert "## Per seed: the behaviour of interest, h=1" in out and "| refuel | 1.000 | 1.000 | 1.000 | 1.000 |" in out
    # the seed-level test at 0.05: t = 0.5 / (0.408 / 2) = 2.449 on 3 df, p 0.092: does not pass
    sd = diffs.std(ddof=1)
    p = 2 * stats.t.sf(0.5 / (sd / 2), 3)
    assert p == pytest.approx(0.0917, abs=1e-4)
    row = (f"| refuel | dpo_last | success | 2 | 4 | +0.500 | {sd:.3f} | {p:.4f} | no | "
           f"{'yes' if p < 0.05 else 'no'}")
    assert "## Seed-level test at p < 0.05" in out and row in out, out
    assert f"| {seed_detectable(sd, 4, 0.05):.3f} | {seed_power(0.2, sd, 4, 0.05):.2f} | " \
        f"{seed_power(0.5, sd, 4, 0.05):.2f} |" in out
    # refuel vs the initial policy: +0.25, sd 0.204, p 0.092 too; at turn 1 nothing moved: sd 0, no power
    assert "| refuel | initial | success | 1 | 4 | +0.000 | 0.000 | 1.0000 | no | no | n/a | n/a | n/a |" in out
    # the same files at a looser threshold: it passes, with the sign
    assert pool.main([str(tmp_path / "a.csv"), "--n-boot", "200", "--alpha", "0.1"]) == 0
    assert "| refuel | dpo_last | success | 2 | 4 | +0.500 |" in (out := capsys.readouterr().out)
    assert f"| {p:.4f} | yes, + |" in out and "Per seed" not in out
    # bad options: named, nothing printed
    for argv, message in ((["--alpha", "1.5"], "--alpha must be between 0 and 1 (exclusive), got 1.5"),
                          (["--power-at", "0.2"], "--power-at needs --alpha"),
                          (["--alpha", "0.05", "--power-at", "0.2,x"], "--power-at: '0.2,x' is not a comma-separated")):
        with pytest.raises(SystemExit):
            pool.main([str(tmp_path / "a.csv"), *argv])
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""


def test_the_tasks_behaviour_of_interest_is_counted_per_turn():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=1, autoreset_mode="Disabled", split="test",
                        reward_mode="per_turn", task="clarify", max_turns=3,
                        task_kwargs={"n_train": 5, "n_validation": 5, "n_test": 5})
    states = make_states(venv.core, 3, seed=0)
    records = [record(states[0], "p", ["How many?", "The answer is 3.", "Hmm"], [0.0, 0.0, 0.0]),
               record(states[1], "p", ["The answer is 2.", "Which number?"], [0.0, 0.0]),
               record(states[2], "p", ["Let me think"], [1.0])]
    got = lb.behaviour_matrix(records, states, venv.core.task.asks, 3)
    assert got.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]  # 0 after a dialogue ended


# ---- agents and settings ----------------------------------------------------------------------------------------

def test_agent_config_imposes_the_shared_settings(tmp_path):
    cfg = smoke_config(tmp_path)
    cfg.eval.seed, cfg.eval.temperature = 77, 0.25  # not the agents' defaults
    for name in cfg.agents:
        typed = lb.agent_config(cfg, name, seed=3, run_dir=tmp_path / name, iterations=7)
        assert typed.env == cfg.env and typed.env.split == "train" and typed.policy.model == "tiny"
        assert typed.sampling.max_new_tokens == 8 and typed.eval.dialogues == 1
        # the agent's own evaluation plays the first of the leaderboard's stored states, as the leaderboard plays
        assert (typed.eval.seed, typed.eval.temperature) == (77, 0.25)
        assert (typed.seed, typed.iterations, typed.export, typed.run_dir) == (3, 7, True, str(tmp_path / name))
        assert typed.dialogues == 2 and typed.optim.max_length == 256 and typed.policy.lora_r == 4
    assert lb.agent_config(cfg, "refuel", 0, tmp_path, None).iterations == 2  # the agent's own setting
    assert lb.agent_config(cfg, "refuel", 0, tmp_path, None).sampling.temperature == 0.8  # the agent's own
    cfg.temperature = 0.5
    assert lb.agent_config(cfg, "dpo", 0, tmp_path, None).sampling.temperature == 0.5
    assert {lb.agent_config(cfg, n, 0, tmp_path, None).policy.engine for n in cfg.agents} == {"hf"}
    cfg.policy_engine, cfg.policy_engine_memory = "vllm", 0.3
    assert {(lb.agent_config(cfg, n, 0, tmp_path, None).policy.engine,
             lb.agent_config(cfg, n, 0, tmp_path, None).policy.engine_memory) for n in cfg.agents} == {("vllm", 0.3)}


def test_agent_seeds_runs_an_arm_on_the_first_n_seeds():
    cfg = lb.LeaderboardConfig(agents=["refuel", "grpo"], seeds=[3, 1, 4, 5], agent_seeds={"grpo": 2})
    lb.validate(cfg)
    assert lb.seeds_of(cfg, "refuel") == [3, 1, 4, 5] and lb.seeds_of(cfg, "grpo") == [3, 1]


@pytest.mark.parametrize("change, message", [
    (dict(agents=["refuel", "nope"]), "agents lists 'nope', but there is no agents/nope/__main__.py; available: "),
    (dict(agents=["refuel", "refuel"]), "agents has duplicates"),
    (dict(seeds=[]), "seeds must be a non-empty list"),
    (dict(agent_seeds={"rebel": 1}), r"agent_seeds names 'rebel', which is not in agents \['refuel'\]"),
    (dict(agent_seeds={"refuel": 4}), r"agent_seeds.refuel must be between 1 and len\(seeds\) = 3 .* got 4"),
    (dict(agent_seeds={"refuel": 0}), r"agent_seeds.refuel must be between 1 and len\(seeds\) = 3 .* got 0"),
    (dict(overrides={"ppx": ["x=1"]}), r"overrides name agent\(s\) \['ppx'\] that do not exist"),
    (dict(budget=lb.BudgetSettings(policy_samples=None)), "set at least one of budget.policy_samples"),
    (dict(budget=lb.BudgetSettings(policy_samples=0)), "budget.policy_samples must be >= 1 or null"),
    (dict(eval=lb.EvalProtocol(states=0)), "eval.states must be >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(threads=0), "threads must be >= 1 or null"),
    (dict(jobs=0), "jobs must be >= 1"),
    (dict(policy_engine="sglang"), "policy_engine is 'sglang'; allowed: hf, vllm"),
    (dict(policy_engine_memory=0.0), r"policy_engine_memory must be in \(0, 1\]"),
    (dict(schedule="fifo"), "schedule is 'fifo'; allowed: longest, seeds"),
])
def test_bad_settings_are_named(change, message):
    cfg = lb.LeaderboardConfig(**{"agents": ["refuel"], **change})
    with pytest.raises(ConfigError, match=message):
        lb.validate(cfg)
        lb.check_agents(cfg)


@pytest.mark.parametrize("preset", ["cpu", "cpu_clarify", "cpu_clarify_p2", "paper", "smoke", "smoke_clarify"])
def test_presets_compose_and_validate(preset, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        raw = compose(config_name="leaderboard", overrides=[f"+leaderboard={preset}"])
        raw.results_dir = str(tmp_path)
        cfg = merge_schema(raw, lb.LeaderboardConfig)
        lb.validate(cfg)
        for name in cfg.agents:  # every agent's settings compose and pass the agent's own checks
            typed = lb.agent_config(cfg, name, cfg.seeds[0], tmp_path / name, None)
            package, _ = base_package(cfg, name)  # an arm runs an agent package under its own name
            validate = getattr(importlib.import_module(f"agents.{package}.config"), "validate", None)
            if validate is not None:
                validate(typed)
    assert cfg.budget.policy_samples is not None


def test_an_unknown_agent_override_is_named(tmp_path):
    cfg = smoke_config(tmp_path)
    cfg.overrides["rebel"] = ["optim.learning_rate=1"]
    with pytest.raises(ConfigError, match="learning_rate"):
        lb.agent_config(cfg, "rebel", 0, tmp_path, None)


def test_a_budget_stop_is_exported_from_the_last_checkpoint(tmp_path):
    from agents.common.policy import PolicySettings, load_policy, trainable_parameters
    from dialogue_gym.models import load_model

    settings = PolicySettings(model="tiny", lora_r=4, lora_alpha=8)
    model, _ = load_policy(settings, seed=0)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.fill_(0.05)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    # PPO's layout: the policy inside a ModuleDict next to its value head
    save_file({**{f"policy.{n}": p.detach().contiguous() for n, p in trainable_parameters(model).items()},
               "value_head.weight": torch.zeros(1, 4)}, str(last / "trainable.safetensors"))
    (last / "state.json").write_text(json.dumps({"iteration": 2}))
    export_checkpoint_policy(tmp_path, settings, 0)
    got, _ = load_model(str(tmp_path / "policy"), shared=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got.state_dict()[name], expected[name])
    assert not torch.allclose(got.state_dict()[name], load_model("tiny")[0].state_dict()[name])
    assert completed_iterations(tmp_path) == 2 and completed_iterations(tmp_path / "none") == 0


# ---- end to end ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_leaderboard_stops_each_agent_at_the_same_budget(tmp_path, monkeypatch):
    cfg = smoke_config(tmp_path, "budget.calibrate=false", "budget.policy_samples=12")
    cfg.overrides = {k: [*v, "iterations=50"] for k, v in cfg.overrides.items()}  # far more than the budget pays
    result = lb.run(cfg, command="pytest")
    assert [(r.agent, r.stop) for r in result["runs"]] == [("refuel", "budget"), ("rebel", "budget")]
    for r in result["runs"]:
        assert 0 < r.usage.policy_samples <= 12 and r.completed >= 1 and r.iterations == 50
        assert (Path(cfg.run_dir) / "runs" / f"{r.agent}-seed0" / "policy" / "config.json").is_file()
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    store = RolloutStore(Path(cfg.run_dir) / "eval_dialogues.jsonl")
    by_policy = {p: [(d.start, d.start_hash, d.seeds["policy"]) for d in store.dialogues(p)]
                 for p in ("initial", "refuel/seed-0", "rebel/seed-0")}
    assert by_policy["initial"] == by_policy["refuel/seed-0"] == by_policy["rebel/seed-0"] and \
        len(by_policy["initial"]) == 4
    # a second call finds everything done and only rewrites the report, with the time the work took (not since)
    started = datetime.fromisoformat((Path(cfg.run_dir) / "started_at.txt").read_text())
    (Path(cfg.run_dir) / "finished_at.txt").write_text((started + timedelta(seconds=100)).isoformat())
    monkeypatch.setattr(lb_jobs, "train", lambda *a, **k: pytest.fail("trained again"))
    (Path(cfg.run_dir) / lb_jobs.STOP_FILE).touch()  # left by the stop of an earlier start: this start resumes
    again = lb.run(cfg, command="pytest")
    assert not (Path(cfg.run_dir) / lb_jobs.STOP_FILE).exists()
    assert [r.to_json() for r in again["runs"]] == [r.to_json() for r in result["runs"]]
    assert again["rows"] == result["rows"]
    assert again["meta"]["wall_s"] == 100.0 and "1.7 min of wall-clock" in \
        (tmp_path / "results" / "leaderboard.md").read_text()


@pytest.mark.slow
def test_cli_smoke_preset_calibrates_the_iterations(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.leaderboard", "+leaderboard=smoke", "agents=[rebel]", "jobs=2",
         f"hydra.run.dir={tmp_path / 'run'}", f"results_dir={tmp_path / 'results'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    cost = json.loads((tmp_path / "run" / "calibration" / "rebel" / "cost.json").read_text())
    result = json.loads((tmp_path / "run" / "runs" / "rebel-seed0" / "leaderboard_result.json").read_text())
    assert result["iterations"] == int(24 // (cost["policy_samples"] * 1.1)) and result["stop"] == "completed"
    assert result["usage"]["policy_samples"] <= 24
    md = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "+leaderboard=smoke agents=[rebel] jobs=2" in md and "## Win rate vs the initial policy" in md
    assert cost["wall_s"] > 0 and "2 job(s) side by side" in md
    workers = {int(m) for m in re.findall(r"started in process (\d+)", out.stderr)}  # spawned, not inline
    assert len(workers) >= 1 and out.stderr.count("leaderboard: job ") == 3  # baseline, calibration, the run


def test_job_threads_share_the_cores_among_the_jobs(monkeypatch):
    monkeypatch.setattr(lb_jobs.os, "sched_getaffinity", lambda pid: set(range(8)))  # the cores this process may use
    assert lb.job_threads(lb.LeaderboardConfig(jobs=1)) is None  # torch's own default
    assert lb.job_threads(lb.LeaderboardConfig(jobs=2)) == 4 and lb.job_threads(lb.LeaderboardConfig(jobs=16)) == 1
    assert lb.job_threads(lb.LeaderboardConfig(jobs=2, threads=3)) == 3


@pytest.mark.slow
def test_parallel_jobs_give_the_same_leaderboard_as_one_after_another(tmp_path):
    """jobs=2 (spawned processes, calibration included) reproduces the inline run's results and dialogues."""
    results = {}
    for jobs in (1, 2):
        cfg = smoke_config(tmp_path / f"jobs{jobs}", f"jobs={jobs}", "threads=1", "budget.policy_samples=16")
        results[jobs] = lb.run(cfg, command="pytest")
        for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
            assert (tmp_path / f"jobs{jobs}" / "results" / name).stat().st_size > 0
    same = lambda run: {k: v for k, v in run.to_json().items() if not k.endswith("_s")}  # noqa: E731
    assert [same(r) for r in results[2]["runs"]] == [same(r) for r in results[1]["runs"]]
    assert [(r.agent, r.seed) for r in results[2]["runs"]] == [("refuel", 0), ("rebel", 0)]
    for a, b in zip(results[1]["runs"], results[2]["runs"]):
        assert [d.messages for d in a.records] == [d.messages for d in b.records]
    quality = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    assert quality(results[2]["rows"]) == quality(results[1]["rows"])
    assert results[2]["meta"]["calibration"] == results[1]["meta"]["calibration"] != {}
    assert "2 job(s) side by side" in (tmp_path / "jobs2" / "results" / "leaderboard.md").read_text()


def test_scheduler_runs_the_longest_expected_job_first_and_names_a_failing_one(tmp_path, monkeypatch):
    done = []

    def fake_job(cfg, ctx, kind, args):
        if kind == "boom":
            raise ValueError("bad thing")
        done.append((kind, *args))
        return len(done)

    monkeypatch.setattr(lb_jobs, "do_job", fake_job)
    sched = lb.Scheduler(lb.LeaderboardConfig(jobs=1), ctx=None)
    for kind, args, estimate in [("train", ("a", 0), 5.0), ("train", ("b", 0), 50.0), ("calibrate", ("c",), math.inf),
                                 ("train", ("a", 1), 5.0), ("calibrate", ("d",), math.inf)]:
        sched.add(kind, args, estimate)
    got = []
    while (finished := sched.next_done()) is not None:
        got.append(finished)
    assert done == [("calibrate", "c"), ("calibrate", "d"), ("train", "b", 0), ("train", "a", 0), ("train", "a", 1)]
    assert [r for _, _, r in got] == [1, 2, 3, 4, 5]
    sched.add("boom", ("x", 3), 1.0)
    with pytest.raises(ValueError, match="bad thing") as e:
        sched.next_done()
    assert "in leaderboard job boom ['x', 3]" in e.value.__notes__
    sched.close(failed=True)


@pytest.mark.parametrize("schedule, order", [
    ("longest", [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]),
    ("seeds", [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]),
])
def test_schedule_seeds_runs_every_agent_at_a_seed_before_the_next_seed(schedule, order, monkeypatch):
    done = []
    monkeypatch.setattr(lb_jobs, "do_job", lambda cfg, ctx, kind, args: done.append((kind, *args)))
    cfg = lb.LeaderboardConfig(jobs=1, schedule=schedule)
    sched = lb.Scheduler(cfg, ctx=None)
    sched.add("calibrate", ("c",), math.inf)
    for name, estimate in (("a", 50.0), ("b", 5.0)):  # as the runner adds them: agent by agent, seed by seed
        for k in range(3):
            sched.add("train", (name, k), run_priority(cfg, k, estimate))
    while sched.next_done() is not None:
        pass
    assert done == [("calibrate", "c")] + [("train", *o) for o in order]


def test_a_stop_file_lets_the_running_jobs_finish_and_starts_none(tmp_path, monkeypatch):
    done = []
    monkeypatch.setattr(lb_jobs, "do_job", lambda cfg, ctx, kind, args: done.append(args) or len(done))
    sched = lb.Scheduler(lb.LeaderboardConfig(jobs=1, run_dir=str(tmp_path)), ctx=None)
    for k in range(3):
        sched.add("train", ("a", k), 1.0 - k)
    assert sched.next_done() == ("train", ("a", 0), 1)
    (tmp_path / lb_jobs.STOP_FILE).touch()  # `touch <run_dir>/STOP` while a leaderboard runs
    assert sched.next_done() is None and done == [("a", 0)] and len(sched.pending) == 2
    (tmp_path / lb_jobs.STOP_FILE).unlink()  # what the resumed leaderboard does first
    assert [sched.next_done()[1] for _ in range(2)] == [("a", 1), ("a", 2)] and sched.next_done() is None


@pytest.mark.slow
def test_an_error_in_a_worker_process_reaches_the_caller_with_its_job(tmp_path):
    cfg = smoke_config(tmp_path, "jobs=2", "agents=[rebel]", "budget.policy_samples=1")
    with pytest.raises(ConfigError, match="one iteration of 'rebel' costs") as e:
        lb.run(cfg)
    assert "in leaderboard job calibrate ['rebel']" in e.value.__notes__
    # the run directory stays usable: with a budget that pays, the same directory finishes
    cfg.budget.policy_samples = 16
    result = lb.run(cfg)
    assert [(r.agent, r.seed) for r in result["runs"]] == [("rebel", 0)]


# ---- the learning-rate sweep and the job backends ------------------------------------------------------------------

def test_the_sweep_lr_is_imposed_and_a_sweep_needs_a_validation_split(tmp_path):
    cfg = smoke_config(tmp_path)
    assert lb.agent_config(cfg, "rebel", 0, tmp_path, None, lr=3e-4).optim.lr == 3e-4
    assert lb.agent_config(cfg, "rebel", 0, tmp_path, None).optim.lr == 1e-4  # the agent's own
    cfg.sweep.lrs = [1e-4, 1e-3]
    lb.check_sweep(cfg)  # arithmetic has a validation split
    cfg.env = lb.EnvSettings(task="embedded", model="tiny")
    with pytest.raises(ConfigError, match="task 'embedded' has 0 validation rows"):
        lb.check_sweep(cfg)


@pytest.mark.parametrize("change, message", [
    (dict(sweep=lb.SweepSettings(lrs=[1e-4, 1e-4])), "sweep.lrs must be distinct learning rates > 0"),
    (dict(sweep=lb.SweepSettings(lrs=[0.0])), "sweep.lrs must be distinct"),
    (dict(sweep=lb.SweepSettings(lrs=[1e-4], seed=0)), "sweep.seed 0 is one of the reported seeds"),
    (dict(sweep=lb.SweepSettings(metric="best")), "sweep.metric is 'best'; allowed: auto, success, score"),
    (dict(backend="slurm"), "backend is 'slurm'; allowed: local, submitit"),
    (dict(report_name="a/b"), "report_name must be a plain file name stem"),
    (dict(backend="submitit", submitit=lb.SubmititSettings(cluster="k8s")), "submitit.cluster is 'k8s'"),
    (dict(backend="submitit", submitit=lb.SubmititSettings(gpus_per_node=-1)), "submitit.gpus_per_node must be >= 0"),
])
def test_bad_sweep_and_backend_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        lb.validate(lb.LeaderboardConfig(**{"agents": ["refuel"], **change}))


@pytest.mark.slow
def test_clarify_smoke_sweeps_on_validation_then_reports_paired_differences(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        raw = compose(config_name="leaderboard", overrides=["+leaderboard=smoke_clarify", "agents=[rebel]",
                                                               "budget.policy_samples=16"])
    raw.results_dir = str(tmp_path / "results")
    cfg = merge_schema(raw, lb.LeaderboardConfig)
    cfg.run_dir = str(tmp_path / "run")
    result = lb.run(cfg, command="pytest")
    sweep = result["meta"]["sweep"]["rebel"]
    assert set(sweep["results"]) == {1e-4, 1e-3} and sweep["chosen"] in (1e-4, 1e-3)
    assert [(r.agent, r.seed, r.lr) for r in result["runs"]] == [("rebel", 0, sweep["chosen"]),
                                                                  ("rebel", 1, sweep["chosen"])]
    run_dir = Path(cfg.run_dir)
    # sweep runs are evaluated on the validation states only; the test store holds the reported policies only
    val = RolloutStore(run_dir / "sweep_dialogues.jsonl").dialogues()
    assert {d.policy for d in val} == {"rebel/lr-0.0001", "rebel/lr-0.001"}
    assert all(d.start.startswith("sweep-") for d in val)
    assert {s.tags["split"] for s in RolloutStore(run_dir / "sweep_states.jsonl").states()} == {"validation"}
    test = RolloutStore(run_dir / "eval_dialogues.jsonl").dialogues()
    assert {d.policy for d in test} == {"initial", "rebel/seed-0", "rebel/seed-1"}
    assert {(p["a"], p["b"]) for p in result["paired"]} == {("rebel", "initial")}
    md = (tmp_path / "results" / "leaderboard_clarify.md").read_text()
    assert "## Learning-rate sweep (validation split)" in md and "## Paired differences in success" in md
    with (tmp_path / "results" / "leaderboard_clarify.csv").open() as f:
        seeds = {r["seed"] for r in csv.DictReader(f) if r["policy"] == "rebel"}
    assert seeds == {"all", "0", "1"}
    assert (tmp_path / "results" / "leaderboard_clarify_paired.csv").stat().st_size > 0


@pytest.mark.slow
def test_submitit_local_backend_gives_the_rows_of_the_local_backend(tmp_path):
    pytest.importorskip("submitit")
    results = {}
    for backend in ("local", "submitit"):
        cfg = smoke_config(tmp_path / backend, "agents=[rebel]", "threads=1", "budget.policy_samples=16",
                           f"backend={backend}", "submitit.cluster=local", "jobs=2")
        results[backend] = lb.run(cfg, command="pytest")
    assert any((tmp_path / "submitit" / "run" / "submitit").glob("*_result.pkl"))  # the jobs went through submitit
    quality = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    assert quality(results["submitit"]["rows"]) == quality(results["local"]["rows"])
    assert results["submitit"]["paired"] == results["local"]["paired"]


def test_submitit_jobs_get_a_gpu_when_this_machines_device_is_cuda(monkeypatch):
    from benchmarks.leaderboard.jobs import job_gpus

    assert job_gpus(lb.SubmititSettings(gpus_per_node=2)) == 2  # an explicit count is used as is
    monkeypatch.setenv("DIALOGUE_GYM_DEVICE", "cpu")
    assert job_gpus(lb.SubmititSettings()) == 0
    monkeypatch.setenv("DIALOGUE_GYM_DEVICE", "cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert job_gpus(lb.SubmititSettings()) == 1  # null: the jobs see a GPU where this process would use one


@pytest.mark.slow
def test_clarify_smoke_runs_the_last_turn_dpo_arm_and_reports_the_probe_with_crossed_intervals(tmp_path,
                                                                                               monkeypatch):
    # the random tiny model never states a number, so clarify's test would call every reply an ask; an even-length
    # reply counts as one here, so the probe has states with replies of both classes (jobs: 1, this process)
    monkeypatch.setattr("dialogue_gym.tasks.clarify.ClarifyTask.asks", lambda self, reply: len(reply) % 2 == 0)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        raw = compose(config_name="leaderboard", overrides=["+leaderboard=smoke_clarify", "agents=[rebel,dpo_last]",
                                                               "sweep.lrs=[]", "budget.policy_samples=16",
                                                               "env.reward=judge"])  # the random tiny model never
    # solves clarify: with the verifier every pair would be a tie (offline DPO then has nothing to train on)
    raw.results_dir = str(tmp_path / "results")
    cfg = merge_schema(raw, lb.LeaderboardConfig)
    cfg.run_dir = str(tmp_path / "run")
    result = lb.run(cfg, command="pytest")
    runs = {(r.agent, r.seed): r for r in result["runs"]}
    assert set(runs) == {("rebel", 0), ("rebel", 1), ("dpo_last", 0), ("dpo_last", 1)}
    # the arm is the dpo package with its own overrides: offline pairs at the last turn of the initial policy's roll-in
    typed = lb.agent_config(cfg, "dpo_last", 0, tmp_path / "x", 1)
    assert (typed.mode, typed.data.prefix, typed.turn_sampling) == ("offline", "on_policy", "last")
    for r in runs.values():
        assert r.usage.optimizer_steps > 0 and len(r.probe) == cfg.eval.states
    # the probe: on the initial policy's own sampled replies, the change of each state's ask-vs-guess log-odds,
    # compared with crossed intervals on the states with replies of both classes (None elsewhere, for every run)
    replies = json.loads((Path(cfg.run_dir) / "probe_replies.json").read_text())
    covered = [bool(st["ask"] and st["guess"]) for st in replies["states"]]
    assert any(covered) and len(covered) == cfg.eval.states
    assert all((v is not None) == c for r in runs.values() for v, c in zip(r.probe, covered))
    probe = {(p["a"], p["b"]): p for p in result["paired"] if p["metric"] == "probe"}
    assert set(probe) == {("rebel", "initial"), ("dpo_last", "initial"), ("rebel", "dpo_last")}
    change = np.array([[v for v in runs["rebel", s].probe if v is not None] for s in (0, 1)])
    assert probe["rebel", "initial"]["diff"] == pytest.approx(change.mean())
    assert (probe["rebel", "initial"]["diff"], probe["rebel", "initial"]["lo"], probe["rebel", "initial"]["hi"]) == \
        pytest.approx(crossed_ci(change, n_boot=cfg.eval.n_boot, seed=300))
    last = [p for p in result["paired"] if p["metric"] == "success" and p["turn"] == 2]
    assert all(p["seeds"] == 2 and p["mde80"] >= 0 and (p["lo"] <= p["diff"] <= p["hi"]) for p in last)
    with (tmp_path / "results" / "leaderboard_clarify_paired.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {r["metric"] for r in table} == {"success", "score", "probe"} and "seed_p" in table[0]
    # the per-state file gives back every paired row, the probe's included, without the run directory
    again = lb.read_states(tmp_path / "results" / "leaderboard_clarify_states.csv")
    assert again.covered == covered and again.seeds == {"rebel": [0, 1], "dpo_last": [0, 1]}
    assert again.probe_replies == replies_digest(replies)  # what a pooled look checks the probe's replies by
    recomputed = paired_rows(again.groups, again.seeds, cfg.eval.n_boot)
    assert len(recomputed) == len(result["paired"])
    for got, want in zip(recomputed, result["paired"]):  # numbers to the last bits (numpy sums a copy and a view
        # of the same numbers in a different order)
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15) if isinstance(want[k], float)
                   else got[k] == want[k] for k in want)
