"""GRPO agent: group advantages read off grown trees (the #7244 case: branches that end at different turns),
bad configuration before any model loads, end-to-end smoke runs of both credits in a subprocess (every trained
parameter changes, resume equals an uninterrupted run), and the 2-process data-parallel step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from agents.common.batching import Reply
from agents.common.branching import Branch, Tree
from agents.common.config import ConfigError, merge_schema
from agents.common.grpo_losses import group_advantages
from agents.common.logging import read_metrics
from agents.common.policy import PolicySettings, load_policy, trainable_parameters
from agents.grpo.__main__ import group_samples
from agents.grpo.config import GrpoConfig
from dialogue_gym.budget import Budget, use_budget
from dialogue_gym.conversation import DialogueState, new_rng_state

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
TINY = PolicySettings(model="tiny", lora_r=4, lora_alpha=8)


def _cfg(*overrides: str, name: str = "grpo") -> GrpoConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        raw = compose(config_name=name, overrides=list(overrides))
    return merge_schema(raw, GrpoConfig)


# ---- advantages off the trees ---------------------------------------------------------------------------------


def _state(h: int) -> DialogueState:
    msgs = []
    for _ in range(h - 1):
        msgs += [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs.append({"role": "user", "content": "q"})
    return DialogueState(msgs, h - 1, 5, "r", {}, new_rng_state(0), "f")


def _branch(first: int, turns: int, ret: float) -> Branch:
    """A branch whose turn-h reply is token ``first`` and which took ``turns`` replies before it ended."""
    replies = [Reply([1, 2], [first, 9], "y") if t == 0 else Reply([1, 2, 3], [50 + t] * (t + 1), "x")
               for t in range(turns)]
    return Branch(replies[0], ret, [], turns, replies, [0.0] * (turns - 1) + [ret])


def test_turn_h_advantages_do_not_depend_on_when_the_other_branches_ended():
    """verl RFC #7244: with one advantage per turn index, a branch that the policy ended early drops out of the
    later turns' statistics, so the credit of a reply depends on the others' lengths. At a fork, the G turn-h
    replies answer one state: their advantages are their returns against the group's, whatever turn each ended."""
    returns = [1.0, 0.0, 0.5]
    ended_together = Tree(_state(2), 2, [_branch(10 + j, 1, r) for j, r in enumerate(returns)])
    ended_apart = Tree(_state(2), 2, [_branch(10 + j, n, r) for j, (n, r) in enumerate(zip((1, 4, 2), returns))])
    for baseline in ("mean", "loo"):
        for scale in ("std", "none"):
            expected, _ = group_advantages(torch.tensor([returns]), baseline, scale)
            got = [group_samples([tree], "turn", baseline, scale)[0] for tree in (ended_together, ended_apart)]
            for samples in got:
                assert [s.reply.token_ids[0] for s in samples] == [10, 11, 12]  # only the turn-h replies
                torch.testing.assert_close(torch.tensor([s.advantage for s in samples]), expected[0])
    # trajectory credit: every reply of a dialogue carries that dialogue's advantage
    samples, _, _ = group_samples([ended_apart], "trajectory", "mean", "none")
    assert [(s.member, s.advantage) for s in samples] == [(0, 0.5), (1, -0.5), (1, -0.5), (1, -0.5), (1, -0.5),
                                                          (2, 0.0), (2, 0.0)]
    assert [s.length for s in samples][:2] == [2, 2 + 2 + 3 + 4]  # sequence normalisation: the dialogue's tokens


def test_all_equal_groups_give_no_sample_and_members_are_numbered_across_groups():
    trees = [Tree(_state(1), 1, [_branch(10, 1, 0.3), _branch(11, 2, 0.3)]),
             Tree(_state(1), 1, [_branch(12, 1, 0.1), _branch(13, 1, 0.9)])]
    samples, returns, stats = group_samples(trees, "turn", "mean", "std", first_member=6)
    assert returns == [[0.3, 0.3], [0.1, 0.9]]
    assert [(s.member, s.reply.token_ids[0]) for s in samples] == [(8, 12), (9, 13)]
    assert samples[0].advantage == pytest.approx(-0.4 / (math.sqrt(0.32) + 1e-4))
    assert stats["env/policy_samples"] == 5 and stats["env/mean_return"] == pytest.approx(0.4)


# ---- configuration --------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import agents.grpo.__main__ as grpo_main

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the configuration was validated")

    monkeypatch.setattr(grpo_main, "load_policy", forbidden)
    monkeypatch.setattr("dialogue_gym.models.load_model", forbidden)


@pytest.mark.parametrize("overrides, fragment", [
    (["group_size=1"], "group_size (G, samples per group) must be >= 2"),
    (["credit=dialogue"], "credit is 'dialogue'; allowed: turn, trajectory"),
    (["baseline=median"], "baseline is 'median'; allowed: mean, loo"),
    (["scale=mad"], "scale is 'mad'; allowed: std, none"),
    (["normalization=batch"], "normalization is 'batch'; allowed: token, sequence"),
    (["old_logprobs=cache"], "old_logprobs is 'cache'; allowed: recompute, engine"),
    (["future_samples=0"], "future_samples (m, continuations per reply) must be >= 1"),
    (["future_samples=2", "credit=trajectory"], "future_samples=2 needs credit=turn"),
    (["beta=-0.1"], "beta must be >= 0"),
    (["clip=0"], "clip must be > 0"),
    (["dialogues=4", "rollout_batch=3"], "rollout_batch must be 0 or divide dialogues (4)"),
])
def test_bad_config_fails_before_any_model_loads(no_model_loads, tmp_path, overrides, fragment):
    from agents.grpo.__main__ import run

    cfg = _cfg("+experiment=smoke", *overrides)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert fragment in str(e.value)


def test_a_budget_smaller_than_one_group_fails_before_any_model_loads(no_model_loads, tmp_path):
    from agents.grpo.__main__ import run

    cfg = _cfg("+experiment=smoke", "group_size=4", "future_samples=2")
    cfg.run_dir = str(tmp_path)
    with use_budget(Budget(policy_samples=7)), pytest.raises(ConfigError, match="7 policy samples left, less than "
                                                                               "one group costs .* = 8"):
        run(cfg)
    with use_budget(Budget(policy_samples=7, limited_splits=("test",))), pytest.raises(AssertionError,
                                                                                        match="a model was loaded"):
        run(cfg)  # the training split is not limited: the check passes and the run goes on to load the policy


def test_refuel_rebel_and_dpo_check_future_samples(monkeypatch, tmp_path):
    import agents.refuel.__main__ as refuel_main
    from agents.dpo.config import DpoConfig
    from agents.dpo.config import validate as validate_dpo
    from agents.refuel.config import RefuelConfig

    monkeypatch.setattr(refuel_main, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    for m, message in ((0, "future_samples (m, continuations per reply) must be >= 1"),
                       (2, "future_samples=2 needs a future to sample: REBEL")):
        cfg = RefuelConfig(future_samples=m, run_dir=str(tmp_path))
        with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
            refuel_main.run(cfg, future=False, name="REBEL")
    with pytest.raises(ConfigError, match="future_samples=3 needs mode=online and future=true"):
        validate_dpo(DpoConfig(future_samples=3))
    validate_dpo(DpoConfig(future_samples=3, future=True))


def test_config_composes_with_smoke_and_every_env():
    cfg = _cfg("+experiment=smoke")
    assert cfg.policy.model == "tiny" and cfg.dialogues == 2 and cfg.credit == "turn" and cfg.group_size == 4
    for env_name in ("embedded", "arithmetic", "clarify"):
        assert _cfg(f"+env={env_name}").env.task == env_name


# ---- end to end, in a subprocess ------------------------------------------------------------------------------


def run_agent(run_dir: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "agents.grpo", "+experiment=smoke", f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def strip_perf(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="module")
def turn_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_turn")
    run_agent(run_dir, "credit=turn")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("credit", ["turn", "trajectory"])
def test_smoke_trains_every_parameter_and_writes_outputs(credit, turn_run, tmp_path):
    run_dir = turn_run
    if credit == "trajectory":
        run_dir = tmp_path
        run_agent(run_dir, "credit=trajectory", "normalization=sequence", "beta=0.04", "steps=3")
    rows = read_metrics(run_dir)
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and r["env/groups"] == 2
        if credit == "trajectory" and r["env/equal_groups"] < 2:  # steps=3: exactly 3 minibatches, whatever count
            assert r["loss/steps"] == 3
        assert r["env/trained_replies"] == (2 - r["env/equal_groups"]) * 4 * (1 if credit == "turn" else 2)
    saved = load_file(str(run_dir / "checkpoints" / "last" / "trainable.safetensors"))
    initial = trainable_parameters(load_policy(TINY, seed=0)[0])
    assert set(saved) == set(initial) and len(saved) > 0
    unchanged = [n for n, p in initial.items() if torch.equal(p.detach().cpu(), saved[n])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    evals = json.loads((run_dir / "eval.json").read_text())["evaluations"]
    assert [e["policy"].split(" after")[0] for e in evals] == ["initial", f"GRPO ({credit})"]
    assert (run_dir / "policy" / "config.json").is_file()


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(turn_run, tmp_path):
    run_agent(tmp_path, "credit=turn", "stop_after=1", "export=false")
    assert len(read_metrics(tmp_path)) == 1
    run_agent(tmp_path, "credit=turn", "resume=true", "export=false")
    assert strip_perf(read_metrics(tmp_path)) == strip_perf(read_metrics(turn_run))


@pytest.mark.slow
def test_two_processes_take_the_single_process_step(tmp_path):
    """As tests/agents/test_distributed.py does for REFUEL and PPO: same groups, same step (tolerances there)."""
    from tests.agents.test_distributed import metrics, run

    log = run("grpo", tmp_path / "two", 2, "dialogues=4", "future_samples=2")
    run("grpo", tmp_path / "one", 1, "dialogues=4", "future_samples=2")
    assert "process 0 of 2" in log and "process 1 of 2" in log
    one, two = (load_file(str(tmp_path / d / "checkpoints" / "last" / "trainable.safetensors")) for d in ("one", "two"))
    assert set(one) == set(two) and len(one) > 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(m2) == 2 and [sorted(r) for r in m1] == [sorted(r) for r in m2]
    for r1, r2 in zip(m1, m2):
        assert all(r2[k] == r1[k] for k in ("env/groups", "env/equal_groups", "env/policy_samples",
                                            "env/trained_replies"))
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-2, abs=1e-5), k


# ---- the leaderboard's agent contract -------------------------------------------------------------------------


def test_both_credits_are_leaderboard_arms(tmp_path):
    import benchmarks.leaderboard as lb
    from tests.benchmarks.test_leaderboard import smoke_config

    cfg = smoke_config(tmp_path, "agents=[grpo_turn,grpo_traj]")
    cfg.overrides = {"grpo_traj": ["baseline=loo"]}
    lb.check_agents(cfg)
    assert {"grpo", "grpo_turn", "grpo_traj"} <= set(lb.available_agents())
    turn, traj = (lb.agent_config(cfg, n, 0, tmp_path / n, 3) for n in cfg.agents)
    assert isinstance(turn, GrpoConfig) and lb.agent_module("grpo_traj").Config is GrpoConfig
    assert (turn.credit, turn.baseline, traj.credit, traj.baseline) == ("turn", "mean", "trajectory", "loo")
    assert turn.policy.model == "tiny" and traj.iterations == 3 and traj.seed == 0
