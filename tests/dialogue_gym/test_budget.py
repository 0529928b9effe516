"""Budgets counted by the env: what every step costs, the stop at the limit, splits, and bad settings."""

from __future__ import annotations

from dataclasses import replace

import gymnasium as gym
import pytest

import dialogue_gym  # noqa: F401
from dialogue_gym.budget import Budget, BudgetExhausted, Usage, active_budget, use_budget
from tests.conftest import LengthReward


def venv(n=3, reward=None, **over):
    kw = dict(task="arithmetic", task_kwargs={"n_train": 20, "n_test": 10}, user="scripted",
              reward=reward or LengthReward(), reward_mode="per_turn", max_turns=3)
    kw.update(over)
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=n, autoreset_mode="Disabled", **kw)


def test_every_step_is_counted_in_every_env_of_the_process():
    a, b = venv(3), venv(2, reward_mode="terminal", max_turns=2)
    a.reset(seed=0)
    b.reset(seed=1)
    with use_budget(Budget(count_tokens=len)) as budget:  # "tokens" = characters here
        assert active_budget() is budget
        a.step(["one", "two", None])  # a sit-out costs nothing
        a.step(["x", "yy", "zzz"])
        b.step(["four", "five"])  # terminal mode, turn 1 of 2: nothing scored
        b.step(["a", "b"])  # the horizon: both scored in one call
    assert active_budget() is None
    # a: 2 + 3 samples, 2 + 3 scored in 2 calls; b: 2 + 2 samples, 0 + 2 scored in 1 call
    assert budget.usage("train") == Usage(policy_samples=9, policy_tokens=3 + 3 + 1 + 2 + 3 + 4 + 4 + 1 + 1,
                                          scored_conversations=7, reward_calls=3, steps=4, user_calls=3)
    assert budget.usage("test") == Usage()


def test_the_step_that_would_exceed_the_limit_raises_before_the_reward_call_and_changes_nothing():
    reward = LengthReward()
    env = venv(3, reward=reward)
    obs, _ = env.reset(seed=0)
    with use_budget(Budget(policy_samples=5)) as budget:
        obs, *_ = env.step(["one", "two", "three"])
        before = env.get_states()
        with pytest.raises(BudgetExhausted, match="policy_samples would reach 6 .3 used . 3 in this step., the limit "
                                                  "is 5"):
            env.step(["a", "b", "c"])
        assert reward.calls == 1  # the second step never reached the reward model
        assert budget.usage() == Usage(policy_samples=3, scored_conversations=3, reward_calls=1, steps=1, user_calls=1)
        assert [s.to_dict() for s in env.get_states()] == [s.to_dict() for s in before]
        env.step(["a", "b", None])  # exactly reaching the limit is allowed
        assert budget.usage().policy_samples == 5
        with pytest.raises(BudgetExhausted):
            env.step([None, None, "c"])
    env.step(["c", "d", "e"])  # outside the budget the env goes on


def test_scored_conversations_limit_and_single_env():
    env = gym.make("MultiTurnDialogue-v0", task="arithmetic", task_kwargs={"n_train": 20, "n_test": 10},
                   user="scripted", reward=LengthReward(), reward_mode="per_turn", max_turns=3)
    env.reset(seed=0)
    with use_budget(Budget(scored_conversations=1)) as budget:
        env.step("first")
        with pytest.raises(BudgetExhausted, match="scored_conversations would reach 2"):
            env.step("second")
    assert budget.usage() == Usage(policy_samples=1, scored_conversations=1, reward_calls=1, steps=1, user_calls=1)
    assert env.unwrapped.get_state().turn == 1


def test_only_limited_splits_are_stopped():
    train, test = venv(2), venv(2, split="test")
    train.reset(seed=0)
    test.reset(seed=0)
    with use_budget(Budget(policy_samples=2)) as budget:
        train.step(["a", "b"])
        for _ in range(3):
            test.step(["c", "d"])  # an agent's own held-out evaluation is counted, never stopped
        with pytest.raises(BudgetExhausted):
            train.step(["a", "b"])
    assert budget.usage("train").policy_samples == 2 and budget.usage("test").policy_samples == 6


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="budget policy_samples must be a non-negative integer or None"):
        Budget(policy_samples=-1)
    with pytest.raises(ValueError, match="budget scored_conversations must be a non-negative integer"):
        Budget(scored_conversations=2.5)
    with pytest.raises(ValueError, match="limited_splits must be a tuple"):
        Budget(limited_splits="train")
    with pytest.raises(TypeError, match="use_budget needs a Budget"):
        with use_budget({"policy_samples": 3}):
            pass
    with use_budget(Budget()):
        with pytest.raises(RuntimeError, match="budgets do not nest"):
            with use_budget(Budget()):
                pass
    assert active_budget() is None


def test_usage_is_a_copy():
    budget = Budget()
    budget.charge("train", ["a"], 1)
    u = budget.usage()
    u.policy_samples = 99
    assert budget.usage().policy_samples == 1
    assert budget.usage().as_dict() == {"policy_samples": 1, "policy_tokens": 0, "scored_conversations": 1,
                                        "reward_calls": 1, "steps": 1, "optimizer_steps": 0,
                                        "user_calls": 0}
    assert budget.limits() == {"policy_samples": None, "scored_conversations": None, "optimizer_steps": None}


def test_optimizer_steps_are_counted_and_limited_for_every_optimizer_of_the_process():
    import torch

    w = torch.nn.Parameter(torch.ones(2))
    opt_a, opt_b = torch.optim.SGD([w], lr=0.5), torch.optim.AdamW([w], lr=0.1)

    def step(opt):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()

    with use_budget(Budget(optimizer_steps=3)) as budget:
        step(opt_a)  # w = 1 - 0.5 * 2 = 0
        step(opt_b)
        step(opt_a)
        before = w.detach().clone()
        with pytest.raises(BudgetExhausted, match="optimizer_steps would reach 4, the limit is 3"):
            step(opt_b)
        assert torch.equal(w.detach(), before)  # refused before the step: the weights did not move
    assert budget.usage("train").optimizer_steps == 3 and budget.usage("test").optimizer_steps == 0
    step(opt_a)  # outside the budget nothing is charged or refused
    assert budget.usage("train").optimizer_steps == 3
    with pytest.raises(ValueError, match="budget optimizer_steps must be a non-negative integer"):
        Budget(optimizer_steps=-1)



def test_the_env_counts_what_the_budget_counts():
    """One counter: a vector env's own ``usage`` and the budget's agree step by step (no tokenizer: tokens 0)."""
    env = venv(3)
    env.reset(seed=0)
    assert env.usage == Usage()
    with use_budget(Budget()) as budget:
        env.step(["one", "two", None])
        env.step(["x", "yy", "zzz"])
        assert env.usage == budget.usage("train")
    assert env.usage == Usage(policy_samples=5, scored_conversations=5, reward_calls=2, steps=2, user_calls=2)
    assert (env.unwrapped.core.user_calls, env.unwrapped.core.reward_calls) == (2, 2)
    u = env.usage
    u.steps = 99  # a copy: the env's counter is unchanged
    assert env.usage.steps == 2 and env.num_rows == 20 and env.max_turns == 3


def test_timings_say_where_the_step_time_went():
    """Seconds in the simulated user and in the reward model, and the user engine's tokens (0 for a scripted user);
    a copy, like ``usage``."""
    scripted = venv(2)
    scripted.reset(seed=0)
    assert scripted.timings == type(scripted.timings)()  # nothing yet
    scripted.step(["one", "two"])
    t = scripted.timings
    assert t.user_s > 0 and t.reward_s > 0 and t.user_tokens == 0
    t.user_s = -1.0
    assert scripted.timings.user_s > 0  # a copy: the env's record is unchanged
    llm = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, autoreset_mode="Disabled", model="tiny",
                       user_max_new_tokens=5, reward=LengthReward(), max_turns=3)
    llm.reset(seed=0)
    engine = llm.unwrapped.core.engine()  # may be shared with other envs of the process: count its tokens' change
    before = engine.tokens_generated
    llm.step(["one", "two"])
    assert 2 <= llm.timings.user_tokens <= 2 * 5  # the tiny model's user turns: 1 to 5 tokens each
    assert llm.timings.user_tokens == engine.tokens_generated - before


class FailingReward(LengthReward):
    """Raises a DialogueError when a reply says "boom" (a reward that cannot score one conversation)."""

    def score(self, conversations, profiles=None):
        if any("boom" in c[-1]["content"] for c in conversations):
            from dialogue_gym.conversation import DialogueError

            raise DialogueError("this reward cannot score 'boom'")
        return super().score(conversations, profiles)


def test_a_step_whose_reward_call_fails_is_not_charged_so_a_retry_pays_once():
    env = venv(2, reward=FailingReward())
    env.reset(seed=0)
    with use_budget(Budget(policy_samples=3, count_tokens=len)) as budget:
        env.step(["one", None])
        with pytest.raises(Exception, match="cannot score 'boom'"):
            env.step(["boom", "two"])
        # the failed step's samples, tokens, scored conversations and step are taken back; its user call was made
        assert budget.usage() == Usage(policy_samples=1, policy_tokens=3, scored_conversations=1, reward_calls=1,
                                       steps=1, user_calls=2)
        assert env.usage == replace(budget.usage(), policy_tokens=0)  # the env counts no tokens
        env.step(["two", "three"])  # a retry fits the limit of 3 (the failed step would have used it up)
        assert budget.usage().policy_samples == 3 and env.usage == replace(budget.usage(), policy_tokens=0)
