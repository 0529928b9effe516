"""The branching primitive (agents/common/branching.py) and each of its callers: the row-sampling rule, the draw
order, per-dialogue seeds, the chunking rule (trees do not depend on the chunk size), branch 0 continuing the
roll-in, and what REFUEL, REBEL, DPO, PPO and the evaluation read off the trees."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import dialogue_gym  # noqa: F401
from agents.common.batching import Reply
from agents.common.branching import (
    Branch,
    Plan,
    Start,
    Tree,
    action_text,
    draw_rows,
    grow,
    plan_dialogues,
    policy_turn_seed,
)
from agents.common.evaluation import play, play_states, records_result
from agents.common.pairs import sample_turn
from agents.common.rollout import collect_dialogues, collect_pairs, make_pairs
from dialogue_gym.conversation import DialogueState, new_rng_state
from dialogue_gym.generation import SamplingParams
from dialogue_gym.generation.base import Generation
from dialogue_gym.rollout_store import make_states
from tests.conftest import LengthReward

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def engine():
    from dialogue_gym.generation.hf import HFEngine

    return HFEngine("tiny", seed=0)


def venv(n: int, mode: str = "terminal", max_turns: int = 3):
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", model="tiny", user="scripted",
                        reward=LengthReward(), reward_mode=mode, max_turns=max_turns)


def row_starts(rows, seed):
    """Task-row starts for hand-made plans: row i resets with env seed ``seed + i``."""
    return [Start(policy_seed=int(np.random.default_rng([seed, i]).integers(0, 2**63 - 1)), row=int(r),
                  env_seed=seed + i) for i, r in enumerate(rows)]


def signature(trees):
    return [(t.turn, t.state.messages, [(b.messages, b.reward, [r.token_ids for r in b.replies]) for b in t.branches])
            for t in trees]


# ---- the rules, as pure functions ---------------------------------------------------------------------------


def test_rows_are_drawn_without_replacement_in_whole_permutations():
    rows = draw_rows(np.random.default_rng(3), 7, 7)
    assert sorted(rows) == list(range(7))  # every row once
    assert rows == [int(r) for r in np.random.default_rng(3).permutation(7)]
    long = draw_rows(np.random.default_rng(3), 10, 4)  # more dialogues than rows: permutations follow each other
    assert sorted(long[:4]) == sorted(long[4:8]) == [0, 1, 2, 3] and len(set(long[8:])) == 2
    with pytest.raises(ValueError, match="has 0 rows"):
        draw_rows(np.random.default_rng(0), 1, 0)


def test_the_plan_draws_rows_turns_then_seeds_in_that_order():
    plan = plan_dialogues(np.random.default_rng(11), 5, 20, 5, "reference", "on_policy", future=True, k=3)
    rng = np.random.default_rng(11)  # replay the documented order by hand
    rows = [int(r) for r in rng.permutation(20)[:5]]
    drawn = [sample_turn(rng, 5, "reference") for _ in range(5)]
    env_seeds = [int(s) for s in rng.integers(0, 2**31, size=5)]
    policy_seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=5)]
    assert [s.row for s in plan.starts] == rows
    assert plan.turns == [h for _, h in drawn] and plan.horizons == [hp for hp, _ in drawn]
    assert [s.env_seed for s in plan.starts] == env_seeds and [s.policy_seed for s in plan.starts] == policy_seeds
    assert plan.k == 3 and plan.complete
    offline = plan_dialogues(np.random.default_rng(11), 5, 20, 5, "reference", "dataset", future=False)
    assert offline.turns == [1] * 5 and not offline.complete and [s.row for s in offline.starts] == rows
    with pytest.raises(ValueError, match="prefix is 'x'"):
        plan_dialogues(np.random.default_rng(0), 1, 2, 5, "reference", "x")


def test_turn_seeds_are_the_leaderboards_for_branch_0_and_differ_per_branch():
    expected = int(np.random.default_rng([42, 3]).integers(0, 2**63 - 1))
    assert policy_turn_seed(42, 3) == expected
    assert len({policy_turn_seed(42, 3, j) for j in range(4)} | {policy_turn_seed(42, 4)}) == 5


def test_a_blank_reply_is_sent_as_three_dots():
    assert action_text(Generation(text=" \n", token_ids=[5])) == "..."
    assert action_text(Generation(text=" ok", token_ids=[5])) == " ok"


def test_bad_plans_and_starts_are_errors():
    with pytest.raises(ValueError, match="exactly one of row and state"):
        Start(policy_seed=1)
    with pytest.raises(ValueError, match="one turn and one horizon per start"):
        Plan([Start(1, row=0)], [1, 2], [1])
    with pytest.raises(ValueError, match="k .* must be >= 1"):
        Plan([Start(1, row=0)], [1], [1], k=0)


# ---- the primitive on a real env and a real (tiny) policy ----------------------------------------------------


def test_trees_do_not_depend_on_the_chunk_size(engine):
    plan = plan_dialogues(np.random.default_rng(0), 6, 40, 3, "reference", k=2)
    whole = grow(venv(6), venv(12), engine, PARAMS, plan)
    assert signature(grow(venv(4), venv(8), engine, PARAMS, plan)) == signature(whole)  # last chunk of 2
    assert signature(grow(venv(2), venv(4), engine, PARAMS, plan)) == signature(whole)
    assert [t.turn for t in whole] == plan.turns  # the scripted user never ends early
    for t, hp in zip(whole, plan.horizons):
        assert all(b.final.turn == max(hp, t.turn) and b.reward == b.rewards[-1] for b in t.branches)
        assert t.state.turn == t.turn - 1 and t.state.messages == t.branches[0].messages[:len(t.state.messages)]
    assert any(t.branches[0].reply.token_ids != t.branches[1].reply.token_ids for t in whole)
    assert [t.rollin_replies for t in whole] == [h - 1 for h in plan.turns]  # rows start at turn 0
    assert whole[0].policy_samples == whole[0].rollin_replies + sum(b.turns for b in whole[0].branches)
    reply = whole[0].branches[0].reply
    assert reply.logprobs is not None and len(reply.logprobs) == len(reply.token_ids)


def test_branch_0_continues_the_roll_in_exactly(engine):
    start = Start(policy_seed=7, row=3, env_seed=5)
    played = grow(venv(1), venv(1), engine, PARAMS, Plan([start], [1], [3], k=1))[0].branches[0]
    forked = grow(venv(1), venv(2), engine, PARAMS, Plan([start], [3], [3], k=2))[0]
    assert forked.branches[0].messages == played.messages  # rolled in to turn 3, then branch 0 = the same dialogue
    assert forked.branches[1].messages[:-1] == played.messages[:-1]  # branch 1 differs only from turn 3 on
    assert forked.branches[1].reply.token_ids != played.replies[-1].token_ids


def test_a_wrong_branch_env_size_is_an_error(engine):
    plan = plan_dialogues(np.random.default_rng(0), 2, 10, 3, "reference", k=2)
    with pytest.raises(ValueError, match="branch env has 2 sub-envs; 2 branches of 2 dialogues need 4"):
        grow(venv(2), venv(2), engine, PARAMS, plan)


# ---- each caller ----------------------------------------------------------------------------------------------


def test_refuel_and_rebel_pairs(engine):
    for future in (True, False):
        pairs, stats = collect_pairs(venv(4), venv(8), engine, PARAMS, np.random.default_rng(1), 4, 30, "reference",
                                     future, "on_policy")
        plan = plan_dialogues(np.random.default_rng(1), 4, 30, 3, "reference", "on_policy", future)
        trees = grow(venv(4), venv(8), engine, PARAMS, plan)
        assert [(p.a.token_ids, p.b.token_ids, p.reward_a, p.reward_b, p.turn) for p in pairs] == [
            (t.branches[0].reply.token_ids, t.branches[1].reply.token_ids, t.branches[0].reward,
             t.branches[1].reward, t.turn) for t in trees]  # the pair is the two branches, in order
        turns_taken = [b.final.turn - t.state.turn for t in trees for b in t.branches]
        if future:  # completed to H' >= h
            assert any(n > 1 for n in turns_taken)
        else:  # REBEL: the immediate reward of the turn-h reply
            assert turns_taken == [1] * 8
        assert stats["env/pairs"] == 4 and stats["env/ties_dropped"] == 0


def test_dpo_pairs_are_best_vs_worst_of_n(engine):
    pairs, stats = collect_pairs(venv(2), venv(8), engine, PARAMS, np.random.default_rng(2), 4, 30, "uniform", False,
                                 "dataset", k=4, pairing="best_worst")
    trees = grow(venv(2), venv(8), engine, PARAMS,
                 plan_dialogues(np.random.default_rng(2), 4, 30, 3, "uniform", "dataset", False, k=4))
    assert [t.turn for t in trees] == [1] * 4
    for p, t in zip(pairs, trees):
        rewards = [b.reward for b in t.branches]
        assert (p.reward_a, p.reward_b) == (max(rewards), min(rewards))
    assert stats["env/pairs"] + stats["env/ties_dropped"] + stats["env/identical_pairs_dropped"] == 4


def test_ppo_dialogues_play_each_row_to_the_horizon(engine):
    env = venv(3)
    played = collect_dialogues(env, engine, PARAMS, np.random.default_rng(4), 3, 30)
    plan = plan_dialogues(np.random.default_rng(4), 3, 30, 3, "uniform", "dataset", True, k=1)
    assert [b.final.task_row for b in played] == [env.core.rows[s.row].id for s in plan.starts]
    assert [b.turns for b in played] == [3, 3, 3] and all(len(b.replies) == len(b.rewards) == 3 for b in played)
    assert all(b.rewards[:2] == [0.0, 0.0] for b in played)  # terminal mode: the score comes at the end


def test_evaluation_plays_stored_states_on_the_primitive(engine):
    env = venv(3, "per_turn")
    states = make_states(env, 3, seed=9)
    raw = records_result(play_states(env, engine, PARAMS, states, "p"), 3)
    again = records_result(play_states(venv(3, "per_turn"), engine, PARAMS, make_states(env, 3, seed=9), "p"), 3)
    assert np.array_equal(raw["scores"], again["scores"]) and raw["conversations"] == again["conversations"]
    assert raw["scores"].shape == (3, 3) and not np.isnan(raw["scores"]).any()
    assert raw["ended_at"].tolist() == [3, 3, 3] and raw["tokens"] > 0
    # the evaluation is k = 1 from the stored state: the same dialogues the primitive grows for the same starts
    starts = [Start(policy_seed=s.policy_seed, state=s.state) for s in states]
    trees = grow(venv(3, "per_turn"), venv(3, "per_turn"), engine, PARAMS, Plan(starts, [1] * 3, [3] * 3, k=1))
    assert [t.branches[0].messages for t in trees] == raw["conversations"]
    # a mid-dialogue state plays on from where it stands: with the dialogue's policy seed it continues exactly as
    # the dialogue did
    rolled_env = venv(1, "per_turn")
    (rolled,) = grow(rolled_env, rolled_env, engine, PARAMS, Plan([starts[0]], [2], [3], k=1))
    assert rolled.state.turn == 1
    (b,) = play(venv(1, "per_turn"), engine, PARAMS, [Start(policy_seed=starts[0].policy_seed, state=rolled.state)])
    assert b.messages == raw["conversations"][0] and b.turns == 2 and b.scores == list(raw["scores"][0, 1:])


# ---- pairs from hand-made trees -------------------------------------------------------------------------------


def _tree(rewards, ids=None, h=2):
    state = DialogueState([{"role": "user", "content": "q"}], 0, 5, "r", {}, new_rng_state(0), "f")
    row = []
    for j, r in enumerate(rewards):
        reply = Reply([1], ids[j] if ids else [10 + j, 2], "x" * (j + 1))
        row.append(Branch(reply, r, [], 1, [reply], [r]))
    return Tree(state, h, row)


def test_make_pairs_both_keeps_equal_returns_and_drops_identical_replies():
    pairs, stats = make_pairs([_tree([0.5, 0.5]), _tree([1.0, 0.0], ids=[[3], [3]]), _tree([0.0, 2.0])], "both")
    assert [(p.reward_a, p.reward_b) for p in pairs] == [(0.5, 0.5), (0.0, 2.0)]
    assert stats["env/identical_pairs_dropped"] == 1 and stats["env/mean_return"] == pytest.approx(4.0 / 6)
    with pytest.raises(ValueError, match="exactly 2 branches"):
        make_pairs([_tree([0.0, 1.0, 2.0])], "both")
    with pytest.raises(ValueError, match="pairing is 'x'"):
        make_pairs([], "x")


def test_make_pairs_best_worst_drops_ties_and_applies_the_length_penalty():
    pairs, stats = make_pairs([_tree([0.1, 0.9, 0.5]), _tree([0.3, 0.3, 0.3])], "best_worst")
    assert [(p.reward_a, p.reward_b) for p in pairs] == [(0.9, 0.1)] and stats["env/ties_dropped"] == 1
    assert stats["env/reward_chosen"] == 0.9 and stats["env/reward_rejected"] == 0.1
    flipped, _ = make_pairs([_tree([1.0, 1.001])], "best_worst", length_penalty=0.01)  # 1.001 - 0.02 < 1.0 - 0.01
    assert (flipped[0].reward_a, flipped[0].reward_b) == (1.0, 1.001)


# ---- progress per turn ---------------------------------------------------------------------------------------


def test_planned_replies_count_the_roll_in_and_every_branch_to_its_horizon():
    from agents.common.branching import planned_replies

    starts = [Start(policy_seed=1, row=0, env_seed=0)] * 3
    plan = Plan(starts, turns=[1, 2, 3], horizons=[3, 2, 1], k=2)
    # h=1, H'=3: 0 + 2x3; h=2, H'=2: 1 + 2x1; h=3, H'=1 (completed to h): 2 + 2x1
    assert planned_replies(plan, 3) == [6, 3, 4]
    assert planned_replies(Plan(starts, [1, 2, 3], [3, 2, 1], k=2, complete=False), 3) == [2, 3, 4]
    assert planned_replies(Plan(starts, [1, 2, 3], [3, 3, 3], k=1), 2) == [2, 2, 2]  # capped at the env's turns


def test_progress_moves_every_turn_of_a_chunk_with_tokens_per_second(engine, caplog, monkeypatch):
    import logging

    import agents.common.branching as branching

    monkeypatch.setenv("DIALOGUE_GYM_PROGRESS", "log")
    monkeypatch.setattr(branching, "PROGRESS_INTERVAL_S", 0.0)  # a line for every step
    caplog.set_level(logging.INFO, logger="dialogue_gym.progress")
    plan = Plan(row_starts([0, 1, 2, 3], 5), turns=[1, 2, 3, 3], horizons=[3, 3, 3, 3], k=2)
    trees = grow(venv(4), venv(8), engine, PARAMS, plan)
    lines = [r.getMessage() for r in caplog.records]
    total = sum(branching.planned_replies(plan, 3))
    assert lines[0].startswith(f"rollouts (4 dialogues x 2, 1 chunk of 4): 0/{total} policy replies (0%)")
    steps = [ln for ln in lines if "tokens_per_s=" in ln]
    # roll-in: 2 steps (turns 1, 2); branches: 3 steps at most (turns 1..3); one line per step, then the end
    assert len(steps) >= 4 and any("phase=roll-in, turn=1" in ln for ln in steps)
    assert any("phase=branches, turn=3" in ln for ln in steps)
    counts = [int(ln.split(": ")[1].split("/")[0]) for ln in lines]
    assert counts == sorted(counts) and counts[-1] == total  # monotone, ends at the plan's most
    assert 0 < counts[1] < total  # the first step already moved it, before the chunk ended
    tokens = int(steps[-1].split("tokens=")[1].split(",")[0])
    branch_tokens = sum(len(r.token_ids) for t in trees for b in t.branches for r in b.replies)
    rollin = sum(t.rollin_replies for t in trees)  # their tokens are counted too, at most max_new_tokens each
    assert rollin > 0 and branch_tokens + rollin <= tokens <= branch_tokens + rollin * PARAMS.max_new_tokens

def test_future_samples_score_a_reply_by_the_mean_of_m_continuations(engine):
    """CollabLLM's multiturn-aware reward: each branch's turn-h reply is sent on m forks and completed m times;
    continuation 0 is exactly the plain branch, the reward is the mean of the m final scores, and every
    continuation's turns are counted."""
    plain = grow(venv(2), venv(4), engine, PARAMS, plan_dialogues(np.random.default_rng(5), 2, 30, 3, "uniform", k=2))
    plan = plan_dialogues(np.random.default_rng(5), 2, 30, 3, "uniform", k=2, futures=3)
    trees = grow(venv(2), venv(12), engine, PARAMS, plan)
    assert [t.turn for t in trees] == [t.turn for t in plain]
    for tree, ref in zip(trees, plain):
        for b, r in zip(tree.branches, ref.branches):
            assert b.messages == r.messages and b.replies[0].token_ids == r.reply.token_ids  # continuation 0
            assert len(b.futures) == 3 and b.futures[0] == r.reward
            assert b.reward == pytest.approx(np.mean(b.futures))
            assert b.turns == 3 * r.turns  # the scripted user never ends early: m continuations of equal length
    assert any(len(set(b.futures)) > 1 for t in trees for b in t.branches if t.turn < 3)  # the futures differ
    with pytest.raises(ValueError, match="2 branches x 3 continuations of 2 dialogues need 12"):
        grow(venv(2), venv(4), engine, PARAMS, plan)
    with pytest.raises(ValueError, match="futures=2 continuations need complete=True"):
        Plan(plan.starts, plan.turns, plan.horizons, k=2, complete=False, futures=2)
