"""DialogueVectorEnv: equivalence with single envs, forking, autoreset modes, batching, bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import dialogue_gym  # noqa: F401
from dialogue_gym.conversation import DialogueError
from dialogue_gym.users import ScriptedUser
from dialogue_gym.vector import DialogueVectorEnv
from tests.conftest import LengthReward

N = 4
ACTIONS = [["Answer one.", "A longer answer two.", "Three", "Four is here."],
           ["Second turn a.", "b", "Second turn c, quite a bit longer.", "d d d"],
           ["x", "yy", "zzz", "wwww"]]


def kw(**over):
    base = dict(model="tiny", user_max_new_tokens=10, reward_mode="per_turn", max_turns=3)
    base.update(over)
    return base


def run_vector(venv, seed):
    obs, _ = venv.reset(seed=seed)
    trace = [obs]
    for acts in ACTIONS:
        obs, r, te, tr, _ = venv.step(acts)
        trace.append((obs, r.tolist(), te.tolist(), tr.tolist()))
    return trace


def run_singles(seed, **env_kw):
    per_env = []
    for i in range(N):
        env = gym.make("MultiTurnDialogue-v0", **env_kw)
        obs, _ = env.reset(seed=seed + i)
        steps = [obs]
        for acts in ACTIONS:
            o, r, te, tr, _ = env.step(acts[i])
            steps.append((o, r, te, tr))
        per_env.append(steps)
    # regroup as the vector env reports: per step, a tuple over sub-envs
    trace = [tuple(p[0] for p in per_env)]
    for k in range(1, len(ACTIONS) + 1):
        trace.append((tuple(p[k][0] for p in per_env), [p[k][1] for p in per_env],
                      [p[k][2] for p in per_env], [p[k][3] for p in per_env]))
    return trace


def test_make_vec_returns_the_native_vector_env():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, **kw(user="scripted", reward=LengthReward()))
    assert isinstance(venv, DialogueVectorEnv) and venv.num_envs == 2
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def test_equals_single_envs_with_scripted_user():
    reward = LengthReward()
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=N, **kw(user="scripted", reward=reward))
    assert run_vector(venv, 100) == run_singles(100, **kw(user="scripted", reward=LengthReward()))


def test_equals_single_envs_with_greedy_llm_user():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=N, **kw(user="llm", user_temperature=0.0,
                                                                    reward=LengthReward()))
    assert run_vector(venv, 7) == run_singles(7, **kw(user="llm", user_temperature=0.0, reward=LengthReward()))


def test_equals_single_envs_with_sampling_llm_user():
    # per-row generators make a row's sample independent of its batch-mates
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=N, **kw(user="llm", reward=LengthReward()))
    assert run_vector(venv, 3) == run_singles(3, **kw(user="llm", reward=LengthReward()))


def test_one_user_call_and_one_reward_call_per_step_for_active_envs_only():
    reward = LengthReward()
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=3, autoreset_mode=AutoresetMode.DISABLED,
                        **kw(user=ScriptedUser(end_phrase="STOP"), reward=reward, max_turns=5))
    venv.reset(seed=0)
    core = venv.core
    u0 = core.user_calls
    _, _, te, _, info = venv.step(["go on", "STOP now", "go on"])
    assert core.user_calls == u0 + 1 and reward.batch_sizes[-1] == 3
    assert te.tolist() == [False, True, False]
    _, r, _, _, info = venv.step(["more", "ignored: this sub-env has ended", "more"])
    assert core.user_calls == u0 + 2 and reward.batch_sizes[-1] == 2  # finished sub-env does no work
    assert info["active"].tolist() == [True, False, True] and r[1] == 0.0


def test_fork_branches_share_history_and_differ_reproducibly():
    user = ScriptedUser(replies=[f"follow-up {i}" for i in range(97)])
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=4, **kw(user=user, reward=LengthReward(), max_turns=5))
    venv.reset(seed=0)
    venv.step(["first"] * 4)
    s0, s1 = venv.get_state(0), venv.get_state(1)
    obs, _ = venv.reset(options={"states": [s0, s0, s1, s1]})
    assert obs[0] == obs[1] == s0.messages and obs[2] == obs[3] == s1.messages
    out1 = venv.step(["same reply"] * 4)[0]
    replies = [o[-1]["content"] for o in out1]
    assert replies[0] != replies[1] and replies[2] != replies[3]
    venv.reset(options={"states": [s0, s0, s1, s1]})
    assert [o[-1]["content"] for o in venv.step(["same reply"] * 4)[0]] == replies
    # the first occurrence continues exactly like a single env restored to the state; repeat k = branch k
    single = gym.make("MultiTurnDialogue-v0", **kw(user=user, reward=LengthReward(), max_turns=5))
    single.reset(options={"state": s0})
    assert single.step("same reply")[0][-1]["content"] == replies[0]
    single.reset(options={"state": s0, "branch": 1})
    assert single.step("same reply")[0][-1]["content"] == replies[1]


def test_next_step_autoreset_resets_finished_envs_on_the_following_step():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, **kw(user="scripted", reward=LengthReward(),
                                                                    max_turns=1))
    venv.reset(seed=0)
    obs, r, te, tr, _ = venv.step(["done a", "done b"])
    assert tr.tolist() == [True, True] and obs[0][-1] == {"role": "assistant", "content": "done a"}
    obs, r, te, tr, info = venv.step(["ignored", "ignored"])
    assert r.tolist() == [0.0, 0.0] and not tr.any() and all(len(o) == 1 for o in obs)
    assert info["active"].tolist() == [False, False]
    obs, r, te, tr, _ = venv.step(["now counted", "now counted"])
    assert tr.all() and r.tolist() == pytest.approx([1.1, 1.1])


def test_disabled_autoreset_with_reset_mask():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, autoreset_mode="Disabled",
                        **kw(user="scripted", reward=LengthReward(), max_turns=1))
    venv.reset(seed=0)
    venv.step(["a", "b"])
    assert venv.done.tolist() == [True, True]
    with pytest.raises(DialogueError, match="every sub-env has ended"):
        venv.step(["c", "d"])
    obs, info = venv.reset(options={"reset_mask": np.array([True, False])})
    assert venv.done.tolist() == [False, True] and info["_turn"].tolist() == [True, False]
    _, _, _, tr, info = venv.step(["e", "ignored"])
    assert tr.tolist() == [True, False] and info["active"].tolist() == [True, False]


def test_info_uses_vector_masks():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, **kw(user="scripted", reward=LengthReward(),
                                                                    reward_mode="terminal", max_turns=2))
    venv.reset(seed=0)
    _, _, _, _, info = venv.step(["a", "b"])
    assert info["turn"].tolist() == [1, 1] and info["_turn"].all()
    assert "score" not in info  # nothing scored in terminal mode before the end
    _, _, _, _, info = venv.step(["abcdefghij", "b"])
    assert info["_score"].tolist() == [True, True] and info["score"].tolist() == pytest.approx([1.0, 0.1])


def test_task_indices_and_messages_options():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, **kw(user="scripted", reward=LengthReward()))
    obs, info = venv.reset(options={"task_indices": [5, 6]})
    rows = venv.core.rows
    assert obs == (rows[5].messages, rows[6].messages)
    msgs = [{"role": "user", "content": "hello"}]
    obs, _ = venv.reset(options={"messages": [msgs, msgs]})
    assert obs == (msgs, msgs)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda v: v.step(["only one"]), "actions must be a sequence of 2"),
        (lambda v: v.step("a string"), "actions must be a sequence of 2"),
        (lambda v: v.step(["fine", ""]), "actions[1] is empty"),
        (lambda v: v.step(["fine", 7]), "actions[1] must be a string"),
        (lambda v: v.reset(options={"states": [None]}), "must be a list of 2 entries"),
        (lambda v: v.reset(options={"task_indices": [0, 10**6]}), "sub-env 1: task_index"),
        (lambda v: v.reset(options={"reset_mask": [1, 0]}), "reset_mask'] must be a bool array"),
        (lambda v: v.reset(options={"nope": 1}), "unknown reset option(s) ['nope']"),
        (lambda v: v.reset(seed=[1, 2, 3]), "seed must be an int, None, or a list of 2"),
    ],
)
def test_bad_input_is_clear_and_leaves_the_batch_untouched(call, fragment):
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, **kw(user="scripted", reward=LengthReward()))
    venv.reset(seed=0)
    venv.step(["one", "two"])
    before = venv.get_states()
    with pytest.raises(DialogueError) as e:
        call(venv)
    assert fragment in str(e.value)
    assert venv.get_states() == before
    venv.step(["still", "fine"])


def test_bad_constructor_arguments():
    with pytest.raises(DialogueError, match="num_envs must be a positive integer"):
        DialogueVectorEnv(num_envs=0, user="scripted", reward=LengthReward(), model="tiny")
    with pytest.raises(ValueError):
        DialogueVectorEnv(num_envs=2, autoreset_mode="Sometimes", user="scripted", reward=LengthReward())
    with pytest.raises(DialogueError, match="SameStep"):
        DialogueVectorEnv(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP, user="scripted",
                          reward=LengthReward())


def test_none_action_sits_out_and_state_horizon_truncates_early():
    reward = LengthReward()
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, autoreset_mode="Disabled",
                        **kw(user="scripted", reward=reward, reward_mode="terminal", max_turns=3))
    venv.reset(seed=0)
    s = venv.get_state(0)
    s.max_turns = 1  # a branch scored at its own horizon H' = 1
    venv.reset(options={"states": [s, venv.get_state(1)]})
    _, r, _, tr, info = venv.step(["abcde", None])
    assert tr.tolist() == [True, False] and r[0] == pytest.approx(0.5) and info["active"].tolist() == [True, False]
    assert venv.get_state(1).turn == 0 and reward.batch_sizes[-1] == 1
    with pytest.raises(DialogueError, match="state.max_turns is 4"):
        s2 = venv.get_state(1)
        s2.max_turns = 4
        venv.reset(options={"states": [s2, s2]})
