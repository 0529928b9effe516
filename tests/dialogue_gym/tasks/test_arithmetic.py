"""The arithmetic task: problem generation, the answer verifier, the critic users, the verifier reward, the env."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest

import dialogue_gym  # noqa: F401  (registers the env)
from dialogue_gym.conversation import DialogueError
from dialogue_gym.generation.base import Generation
from dialogue_gym.tasks import TASKS, build_task
from dialogue_gym.tasks.arithmetic import (
    NO_ANSWER_CRITIQUES,
    WRONG_CRITIQUES,
    ArithmeticTask,
    CriticUser,
    LLMCriticUser,
    VerifierReward,
    extract_answer,
    find_numbers,
    generate_problem,
    is_correct,
)

# ---- the verifier -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 12.", 12),
        ("The answer is 12", 12),
        ("So the total is 12!", 12),
        ("Maya has 12 apples.", 12),
        ("It costs $12.", 12),
        ("Answer: $12.50", 12.5),
        ("**Answer:** 42", 42),
        ("The answer is: **7**", 7),
        ("\\boxed{8}", 8),
        ("The answer is twelve.", 12),
        ("She has twelve apples left.", 12),
        ("twenty-three", 23),
        ("twenty three", 23),
        ("one hundred and five", 105),
        ("two thousand three hundred", 2300),
        ("negative four", -4),
        ("The answer is -5.", -5),
        ("It dropped to \u22127 degrees", -7),
        ("10-3=7", 7),  # a minus between numbers is a subtraction, not a sign
        ("The answer is 3.75.", 3.75),
        ("That is 0.5 of the cake", 0.5),
        ("In total 1,234 people came.", 1234),
        ("It costs $1,234.50 in all", 1234.5),
        ("1, 2, 3", 3),  # a list is not a thousands separator
        ("5 + 7 = 12 apples, so she has 12 apples.", 12),
        ("Step 1: 8 - 3 = 5. Step 2: 5 + 2 = 7", 7),
        ("The answer is 14. Check: 7 x 2 = 14 and 2 + 2 = 4", 14),  # explicit answer beats later numbers
        ("5 + 7 = 12. The other bag has 3.", 3),  # the conclusion (last sentence with a number) wins
        ("We get 22 flowers. So, Yuki has 8 + 13 = 21 flowers.", 21),
        ("Yuki has 8 + 13 = 21 flowers. So, Yuki has 22 flowers now.", 22),
        ("So 7 x 2 = 14 apples in 2 bags.", 14),  # the result of the conclusion's equation
        ("The answer is 5 + 7 = 12.", 12),  # an expression after "answer is": its result
        ("She has 3 apples, and one of them is red.", 3),  # a lone "one" is weak
        ("The answer is one.", 1),
        ("The answer is <12>.", 12),
        ("The answer is approximately 3.14", 3.14),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "I don't know.", "The answer is <number>.", "Let me think about it...",
                                  "x2 and v1.5 are versions"])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="text must be a string"):
        extract_answer(12)  # type: ignore[arg-type]


def test_is_correct_tolerates_format_differences():
    assert is_correct("The answer is 10.30", 10.3)
    assert is_correct("The answer is $10.3.", 10.3)
    assert is_correct("twelve", 12)
    assert not is_correct("The answer is 13", 12)
    assert not is_correct("no idea", 12)


def test_find_numbers_positions():
    found = find_numbers("add 3 and twenty-one")
    assert [(n.value, "add 3 and twenty-one"[n.start:n.end]) for n in found] == [(3, "3"), (21, "twenty-one")]


# ---- problem generation -------------------------------------------------------------------------------------


def _solve(question: str) -> float:
    """An independent solver for the generated templates (re-derives the answer from the text)."""
    q = question
    money = "$" in q
    nums = lambda s: [float(x.replace("$", "")) for x in re.findall(r"\$?\d+(?:\.\d+)?", s)]  # noqa: E731
    sentences = re.split(r"(?<=[.?])\s+(?=[A-Z])", q)
    total = 0.0
    for s in sentences:
        n = nums(s)
        if " has " in s and ("with" in s and "in each" in s):
            total = n[0] * n[1]
        elif re.search(r" has \$?\d", s):
            total = n[0]
        elif money and " at " in s and " each" in s:
            total -= n[0] * n[1]
        elif money and "buys a" in s:
            total -= n[0]
        elif money and ("earns" in s or "gets" in s or "finds" in s):
            total += n[0]
        elif "more" in s:
            total += n[0]
        elif "of the" in s:
            total -= n[0]
        elif "doubles" in s:
            total *= 2
        elif "triples" in s:
            total *= 3
        elif "equally among" in s:
            total /= n[0]
    return round(total, 2)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_generated_answers_are_exact(difficulty):
    rng = np.random.default_rng(difficulty)
    for _ in range(300):
        question, answer, steps = generate_problem(rng, difficulty)
        assert _solve(question) == pytest.approx(answer), question
        assert 1 <= steps <= min(difficulty, 3)
        assert answer >= 0
        if difficulty < 4:
            assert float(answer).is_integer()


def test_splits_are_fixed_distinct_and_sized():
    a = ArithmeticTask(difficulty=2, n_train=300, n_test=50, seed=3)
    b = ArithmeticTask(difficulty=2, n_train=300, n_test=50, seed=3)
    assert [r.messages for r in a.rows("train")] == [r.messages for r in b.rows("train")]
    assert len(a.rows("train")) == 300 and len(a.rows("test")) == 50
    train_q = {r.profile["question"] for r in a.rows("train")}
    test_q = {r.profile["question"] for r in a.rows("test")}
    assert len(train_q) == 300 and len(test_q) == 50 and not train_q & test_q
    assert len({r.id for r in a.rows("train")} | {r.id for r in a.rows("test")}) == 350
    other = ArithmeticTask(difficulty=2, n_train=300, n_test=50, seed=4)
    assert [r.messages for r in other.rows("test")] != [r.messages for r in a.rows("test")]
    # the test split does not depend on the train size
    bigger = ArithmeticTask(difficulty=2, n_train=500, n_test=50, seed=3)
    assert [r.id for r in bigger.rows("test")] == [r.id for r in a.rows("test")]


def test_row_profile_and_prompt():
    task = ArithmeticTask(difficulty=1, n_train=5, n_test=5, system_prompt="Be brief.")
    row = task.rows("test")[0]
    assert set(row.profile) == {"answer", "steps", "difficulty", "question"}
    assert row.profile["steps"] == 1 and row.profile["difficulty"] == 1
    assert row.messages[0] == {"role": "system", "content": "Be brief."}
    assert row.messages[1]["content"].endswith("End your reply with: The answer is <number>.")
    assert task.describe()["difficulty"] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"difficulty": 5}, "difficulty is 5; allowed: 1, 2, 3, 4"),
        ({"difficulty": True}, "difficulty"),
        ({"n_train": 0}, "n_train must be a positive integer"),
        ({"n_test": 2.5}, "n_test must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"discount": 0}, r"discount must be a number in \(0, 1\]"),
        ({"discount": 1.5}, "discount"),
        ({"instruction": None}, "instruction must be a string"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(DialogueError, match=match):
        ArithmeticTask(**kwargs)


def test_bad_split():
    with pytest.raises(DialogueError, match="split is 'dev'; allowed: train, test"):
        ArithmeticTask(n_train=2, n_test=2).rows("dev")


def test_registered_and_built_by_name():
    assert TASKS["arithmetic"] is ArithmeticTask
    task = build_task("arithmetic", difficulty=3, n_train=10, n_test=5)
    assert task.default_user == "critic" and task.default_reward == "verifier"
    with pytest.raises(DialogueError, match="bad task_kwargs for task 'arithmetic'"):
        build_task("arithmetic", nonsense=1)


# ---- critic user --------------------------------------------------------------------------------------------


def _conv(answer_text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Maya has 7 apples. She buys 5 more. How many apples does Maya have now?"},
            {"role": "assistant", "content": answer_text}]


PROFILE = {"answer": 12, "steps": 1, "difficulty": 1, "question": "..."}


def test_critic_ends_on_correct_answer():
    turns = CriticUser().respond([_conv("7 + 5 = 12. The answer is 12.")], [PROFILE], [0])
    assert turns[0].done


def test_critic_critiques_wrong_and_missing_answers_without_revealing():
    user = CriticUser()
    profile = {"answer": 37, "steps": 3, "difficulty": 3, "question": "..."}
    seen_wrong, seen_missing = set(), set()
    for seed in range(60):
        wrong, missing = user.respond([_conv("The answer is 40."), _conv("Let me think.")], [profile] * 2,
                                      [seed, seed])
        assert not wrong.done and not missing.done
        for t in (wrong, missing):
            assert "37" not in t.text and "thirty" not in t.text.lower()
            assert extract_answer(t.text) is None  # no number at all in a critique
        seen_wrong.add(wrong.text)
        seen_missing.add(missing.text)
        assert missing.text in NO_ANSWER_CRITIQUES
    assert len(seen_wrong) > 4 and len(seen_missing) == len(NO_ANSWER_CRITIQUES)  # the seed picks the template
    assert any("second step" in t or "third step" in t for t in seen_wrong)


def test_critic_same_seed_same_critique_and_one_step_wording():
    user = CriticUser()
    a = user.respond([_conv("The answer is 11.")], [PROFILE], [5])[0]
    b = user.respond([_conv("The answer is 11.")], [PROFILE], [5])[0]
    assert a == b
    texts = {user.respond([_conv("The answer is 11.")], [PROFILE], [s])[0].text for s in range(30)}
    assert all("second" not in t and "third" not in t for t in texts)  # a one-step problem has no second step
    assert len(WRONG_CRITIQUES) >= 5


def test_critic_needs_answer_in_profile():
    with pytest.raises(DialogueError, match="needs the task profile's 'answer'"):
        CriticUser().respond([_conv("12")], [{}], [0])
    for bad in ("twelve", None, [12], True):  # a client's profile: a DialogueError naming the value, not a ValueError
        with pytest.raises(DialogueError, match=r"the critic user needs profile\['answer'\] to be a number"):
            CriticUser().respond([_conv("12")], [{**PROFILE, "answer": bad}], [0])
    assert CriticUser().respond([_conv("The answer is 12.")], [{**PROFILE, "answer": "12"}], [0])[0].done


class FakeEngine:
    """Returns fixed texts; records the prompts it was given."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.prompts = []

    def generate(self, prompts, params, seeds=None):
        self.prompts.extend(prompts)
        return [Generation(text=self.texts[i % len(self.texts)], token_ids=[]) for i in range(len(prompts))]

    def describe(self):
        return {"engine": "fake"}


def test_llm_critic_uses_model_text_but_never_leaks_the_answer():
    engine = FakeEngine(["Check how many apples she bought.", "The right answer is 12."])
    user = LLMCriticUser(lambda: engine)
    turns = user.respond([_conv("The answer is 11."), _conv("Hmm."), _conv("The answer is 12.")],
                         [PROFILE] * 3, [1, 2, 3])
    assert turns[0].text == "Check how many apples she bought." and not turns[0].done
    assert "12" not in turns[1].text and not turns[1].done  # the leaking critique was replaced
    assert turns[1].text in NO_ANSWER_CRITIQUES
    assert turns[2].done
    assert len(engine.prompts) == 2  # the correct reply needed no model call
    assert "12" not in engine.prompts[0][0]["content"].replace("The answer is 11.", "")  # answer never shown
    assert user.describe()["user"] == "critic_llm"


def test_task_makes_its_users_and_reward():
    task = ArithmeticTask(n_train=2, n_test=2, discount=0.5)
    assert isinstance(task.make_user("critic", lambda: None), CriticUser)
    assert isinstance(task.make_user("critic_llm", lambda: None), LLMCriticUser)
    assert task.make_user("llm", lambda: None) is None
    reward = task.make_reward("verifier")
    assert isinstance(reward, VerifierReward) and reward.discount == 0.5
    assert task.make_reward("judge") is None


# ---- verifier reward ----------------------------------------------------------------------------------------


def test_verifier_reward_with_discount():
    conv1 = _conv("The answer is 12.")
    conv2 = _conv("The answer is 11.") + [{"role": "user", "content": "No."},
                                          {"role": "assistant", "content": "Sorry: 7 + 5 = 12"}]
    conv3 = conv2[:-1] + [{"role": "assistant", "content": "It is 13."}]
    assert VerifierReward().score([conv1, conv2, conv3], [PROFILE] * 3).tolist() == [1.0, 1.0, 0.0]
    # discount 0.9: solved at turn 1 -> 1.0, at turn 2 -> 0.9; at turn 3 it would be 0.81
    conv4 = conv2 + [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "12"}]
    got = VerifierReward(discount=0.9).score([conv1, conv2, conv3, conv4], [PROFILE] * 4)
    assert got == pytest.approx([1.0, 0.9, 0.0, 0.81])


def test_verifier_reward_bad_input():
    with pytest.raises(DialogueError, match="discount"):
        VerifierReward(discount=0)
    with pytest.raises(DialogueError, match="one profile"):
        VerifierReward().score([_conv("12")], None)


# ---- through the env ----------------------------------------------------------------------------------------


def test_env_wrong_then_right_terminates_on_turn_two():
    env = gym.make("MultiTurnDialogue-v0", task="arithmetic", task_kwargs={"n_train": 20, "n_test": 5},
                   max_turns=3)
    obs, info = env.reset(seed=0)
    answer = env.unwrapped.get_state().profile["answer"]
    obs, reward, terminated, truncated, info = env.step(f"The answer is {answer + 1}.")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert obs[-1]["role"] == "user" and str(answer) not in obs[-1]["content"]
    obs, reward, terminated, truncated, info = env.step(f"Sorry, the answer is {answer}.")
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert env.unwrapped.get_state().turn == 2


def test_env_never_right_is_truncated_with_zero_reward_and_discount_applies():
    env = gym.make("MultiTurnDialogue-v0", task="arithmetic", split="test", reward_mode="per_turn",
                   task_kwargs={"n_train": 5, "n_test": 5, "discount": 0.5}, max_turns=3)
    env.reset(seed=1, options={"task_index": 0})
    answer = env.unwrapped.get_state().profile["answer"]
    rewards = []
    for text in ("I am not sure.", f"It is {answer + 2}.", f"Maybe {answer + 3}?"):
        _, r, terminated, truncated, _ = env.step(text)
        rewards.append(r)
    assert rewards == [0.0, 0.0, 0.0] and truncated and not terminated
    env.reset(seed=1, options={"task_index": 0})
    env.step("No idea.")
    env.step("Hmm.")
    _, r, terminated, truncated, _ = env.step(f"The answer is {answer}.")
    assert r == pytest.approx(0.25)  # 0.5 ** (3 - 1)
    # solved on the last allowed turn: the verifier (not the user, who is not asked) makes it a terminal state
    assert terminated and not truncated and env.unwrapped.get_state().messages[-1]["role"] == "assistant"


def test_vector_env_solved_on_the_last_turn_terminates_and_a_wrong_one_truncates():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=3, autoreset_mode="Disabled", task="arithmetic",
                        task_kwargs={"n_train": 5, "n_test": 5}, max_turns=2, split="test")
    venv.reset(seed=0)
    answers = [venv.get_state(i).profile["answer"] for i in range(3)]
    _, _, term, trunc, _ = venv.step(["I am not sure."] * 3)
    assert not term.any() and not trunc.any()
    calls = venv.core.user_calls
    _, rewards, term, trunc, _ = venv.step([f"The answer is {answers[0]}.", f"The answer is {answers[1] + 1}.",
                                            "No idea."])
    assert term.tolist() == [True, False, False] and trunc.tolist() == [False, True, True]
    assert rewards.tolist() == [1.0, 0.0, 0.0] and venv.core.user_calls == calls  # no user call after the last turn
    states = venv.get_states()
    assert states[0].terminated and not states[0].truncated and states[1].truncated and not states[1].terminated


def test_free_form_start_without_the_answer_is_refused_at_reset_and_the_env_stays_usable():
    # the critic user and the verifier read profile['answer']: a start without it used to fail only at the first step
    env = gym.make("MultiTurnDialogue-v0", task="arithmetic", task_kwargs={"n_train": 5, "n_test": 5}, max_turns=2)
    env.reset(seed=0)  # (gymnasium's passive checker cannot take a failed first reset: a later reset then fails)
    opening = [{"role": "user", "content": "What is 2 + 3?"}]
    with pytest.raises(DialogueError, match=r"the critic user needs the task profile's 'answer' \(got profile keys "
                                            r"\['question'\]\)"):
        env.reset(seed=0, options={"messages": opening, "profile": {"question": "2 + 3"}})
    with pytest.raises(DialogueError, match=r"the critic user needs profile\['steps'\] to be an integer >= 0 when "
                                            r"given, got 'two'"):
        env.reset(seed=0, options={"messages": opening, "profile": {"answer": 5, "steps": "two"}})
    obs, _ = env.reset(seed=0, options={"messages": opening, "profile": {"answer": 5}})
    assert obs == opening
    assert env.step("The answer is 5.")[1:3] == (1.0, True)
    env.reset(seed=0)  # rows still start
    saved = env.unwrapped.get_state().to_dict()
    with pytest.raises(DialogueError, match=r"the critic user needs profile\['answer'\] to be a number, got 'five'"):
        env.reset(options={"state": {**saved, "profile": {**saved["profile"], "answer": "five"}}})
    assert env.reset(options={"state": saved})[0] == saved["messages"]
    with pytest.raises(DialogueError, match="the verifier reward needs the task profile's 'answer'"):
        VerifierReward().check_profile({})
