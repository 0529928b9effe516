"""The clarify task: withheld numbers, the user's rules worked by hand, splits, the env end to end."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dialogue_gym  # noqa: F401
from dialogue_gym.conversation import DialogueError
from dialogue_gym.tasks import ClarifyTask, ClarifyUser, build_task
from dialogue_gym.tasks.clarify import REVEAL_INTROS, UNKNOWN_TEMPLATES, VAGUE_REPLIES, asks_or_holds_back

PROFILE = {"answer": 17.0, "steps": 1, "question": "Maya has some apples. Maya buys 5 more apples.",
           "facts": [{"text": "Maya has 12 apples at the start.", "unknown": "how many apples Maya has at the start"}]}
OPENING = {"role": "user", "content": PROFILE["question"] + " How many apples does Maya have now?"}


def respond(replies: list[str], profile=PROFILE, seed: int = 0, user=None):
    conv = [OPENING]
    for k, r in enumerate(replies):
        conv = conv + [{"role": "assistant", "content": r}]
        if k < len(replies) - 1:
            conv.append({"role": "user", "content": respond(replies[:k + 1], profile, seed, user).text})
    return (user or ClarifyUser()).respond([conv], [profile], [seed])[0]


def test_asking_or_holding_back_gets_the_number_a_wrong_guess_is_told_what_is_unknown():
    for reply in ("How many apples did she have?", "Maya buys 5 more, so we need the start.", "I can't tell."):
        turn = respond([reply])
        assert not turn.done and turn.text.endswith("Maya has 12 apples at the start.")
        assert turn.text.split(" Maya")[0] in REVEAL_INTROS
    wrong = respond(["The answer is 9."])  # commits to a wrong answer without asking
    assert not wrong.done and "12" not in wrong.text and "how many apples Maya has at the start" in wrong.text
    assert any(wrong.text == t.format(unknown=PROFILE["facts"][0]["unknown"]) for t in UNKNOWN_TEMPLATES)
    assert respond(["What is the start? The answer is 9."]).text.endswith("at the start.")  # asks: gets it
    assert respond(["The answer is 17."]).done  # a lucky guess before asking is judged by the verifier
    assert respond(["How many?", "The answer is 17."]).done  # ask, then answer
    # once every number is out: the arithmetic critic's rules (no answer in the critique)
    late = respond(["How many?", "The answer is 16."])
    assert not late.done and "17" not in late.text and "Maya has 12" not in late.text


@pytest.mark.parametrize("profile, message", [
    ({"answer": 17.0}, r"needs the profile's 'answer' and 'facts' \(got keys \['answer'\]\)"),
    ({**PROFILE, "answer": "x"}, r"profile\['answer'\] to be a number, got 'x'"),
    ({**PROFILE, "answer": True}, r"profile\['answer'\] to be a number, got True"),
    ({**PROFILE, "facts": "Maya has 12"}, r"profile\['facts'\] to be a list of \{'text': str, 'unknown': str\}"),
    ({**PROFILE, "facts": [{}]}, r"profile\['facts'\] to be a list of"),
    ({**PROFILE, "facts": [{"text": 12, "unknown": "u"}]}, r"profile\['facts'\] to be a list of"),
])
def test_a_profile_the_user_cannot_read_is_a_dialogue_error(profile, message):
    # a profile can come from a client (a free-form start, a restored state): what is wrong is named, per profile
    with pytest.raises(DialogueError, match=message):
        respond(["How many apples?"], profile=profile)
    assert respond(["How many apples?"], profile={**PROFILE, "answer": np.float32(17)}).text.endswith("start.")


def test_holding_back_means_no_stated_final_answer():
    assert asks_or_holds_back("So she has 12 + 5 apples") and asks_or_holds_back("Is it 17?")
    assert not asks_or_holds_back("12 + 5 = 17. The answer is 17.") and not asks_or_holds_back("\\boxed{3}")


def test_a_vague_user_sometimes_keeps_the_number_and_is_seeded():
    user = ClarifyUser(vague=0.5)
    texts = [respond(["How many?"], seed=s, user=user).text for s in range(200)]
    vague = [t in VAGUE_REPLIES for t in texts]
    assert 70 < sum(vague) < 130  # about half
    assert texts == [respond(["How many?"], seed=s, user=user).text for s in range(200)]  # same seed, same reply
    # a vague reply keeps the number withheld: the next request may get it
    seed = next(s for s, v in enumerate(vague) if v)
    conv = [OPENING, {"role": "assistant", "content": "How many?"}, {"role": "user", "content": texts[seed]},
            {"role": "assistant", "content": "Please tell me the number?"}]
    again = [ClarifyUser(vague=0.5).respond([conv], [PROFILE], [s])[0].text for s in range(20)]
    assert any(t.endswith("Maya has 12 apples at the start.") for t in again)


def test_two_withheld_numbers_come_out_one_request_at_a_time():
    task = ClarifyTask(steps=1, withheld=2, n_train=5, n_validation=5, n_test=5)
    row = task.rows("test")[0]
    facts = row.profile["facts"]
    assert len(facts) == 2 and all(f["text"] not in row.messages[0]["content"] for f in facts)
    assert row.messages[0]["content"].count("some") == 2
    user = task.make_user("clarify", None)
    conv = list(row.messages) + [{"role": "assistant", "content": "What do I need?"}]
    first = user.respond([conv], [row.profile], [1])[0].text
    assert first.endswith(facts[0]["text"])
    conv += [{"role": "user", "content": first}, {"role": "assistant", "content": "And the other?"}]
    assert user.respond([conv], [row.profile], [2])[0].text.endswith(facts[1]["text"])


def test_generation_is_seeded_splits_are_disjoint_and_answers_follow_the_facts():
    a, b = ClarifyTask(distractors=2, seed=3), ClarifyTask(distractors=2, seed=3)
    assert [r.messages for r in a.rows("test")] == [r.messages for r in b.rows("test")]
    keys = {s: {(r.messages[0]["content"], str(r.profile["facts"])) for r in a.rows(s)}
            for s in ("train", "validation", "test")}
    assert not keys["train"] & keys["test"] and not keys["validation"] & (keys["train"] | keys["test"])
    assert [len(a.rows(s)) for s in ("train", "validation", "test")] == [2000, 100, 200]
    for row in a.rows("validation")[:50]:
        text = row.messages[0]["content"]
        assert text.count(" has ") >= 3 and "The answer is <number>" in text  # 2 distractor sentences
        # the story with the withheld number filled in gives the answer: start, then + or - the change
        name, full = text.split(" ", 1)[0], text
        for f in row.profile["facts"]:
            hidden = re.sub(r"\d+", "some", f["text"]).replace(" at the start", "")
            assert hidden in full
            full = full.replace(hidden, f["text"])
        start = int(re.search(rf"{name} has (\d+) ", full).group(1))
        change = re.search(rf"{name} (buys|finds|gets|is given|gives away|loses|uses|sells) (\d+) ", full)
        sign = -1 if change.group(1) in ("gives away", "loses", "uses", "sells") else 1
        assert row.profile["answer"] == start + sign * int(change.group(2))
    assert ClarifyTask(seed=4).rows("test")[0].messages != a.rows("test")[0].messages


@pytest.mark.parametrize("kwargs, message", [
    (dict(withheld=3), r"task_kwargs.withheld must be an integer in \[1, 2\]"),
    (dict(steps=3), r"task_kwargs.steps must be an integer in \[0, 2\]"),
    (dict(steps=0, withheld=2), r"task_kwargs.withheld must be an integer in \[1, 1\]"),
    (dict(distractors=-1), "task_kwargs.distractors"),
    (dict(vague=1.0), r"task_kwargs.vague must be a probability in \[0, 1\)"),
    (dict(discount=0), "task_kwargs.discount"),
    (dict(n_test=0), "task_kwargs.n_test"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(DialogueError, match=message):
        build_task("clarify", **kwargs)


def test_the_env_asks_then_solves_and_passes_the_checker():
    env = gym.make("MultiTurnDialogue-v0", task="clarify", task_kwargs={"n_train": 20, "n_validation": 5,
                                                                        "n_test": 5}, max_turns=3)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=0)
    profile = env.unwrapped.get_state().profile
    obs, r, term, trunc, _ = env.step("Which number is missing?")
    assert (r, term, trunc) == (0.0, False, False) and obs[-1]["content"].endswith(profile["facts"][0]["text"])
    _, r, term, trunc, _ = env.step(f"The answer is {profile['answer']:g}.")
    assert (r, term, trunc) == (1.0, True, False)
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, autoreset_mode="Disabled", task="clarify",
                        task_kwargs={"n_train": 5, "n_validation": 5, "n_test": 5}, split="validation", max_turns=3)
    obs, _ = venv.reset(seed=1)
    answers = [s.profile["answer"] for s in venv.get_states()]
    for _ in range(2):
        venv.step(["Hmm?", "The answer is -3."])
    _, rewards, term, trunc, _ = venv.step([f"The answer is {answers[0]:g}.", "The answer is -3."])
    assert term.tolist() == [True, False] and trunc.tolist() == [False, True] and rewards.tolist() == [1.0, 0.0]
    assert np.all([s.task_row.startswith("clarify-s0-validation") for s in venv.get_states()])


def test_tasks_without_a_validation_split_say_so():
    with pytest.raises(DialogueError, match="no rows in split 'validation'"):
        gym.make("MultiTurnDialogue-v0", task="embedded", split="validation", model="tiny", user="scripted",
                 reward="judge")


def test_zero_steps_withholds_the_start_and_the_answer_is_it():
    task = ClarifyTask(steps=0, n_train=5, n_validation=5, n_test=5)
    for row in task.rows("test"):
        opening = row.messages[-1]["content"]
        (fact,) = row.profile["facts"]
        assert " has some " in opening and not any(ch.isdigit() for ch in opening.split(" How many")[0])
        assert fact["text"].endswith("at the start.") and str(int(row.profile["answer"])) in fact["text"]


def test_a_strict_user_gives_the_number_only_to_a_reply_that_asks_or_clearly_holds_back():
    strict = ClarifyUser(reveal="strict")
    for reply in ("How many apples did she have?", "I can't tell yet.", "Is it 20?"):  # asks, or no number at all
        assert respond([reply], user=strict).text.endswith("Maya has 12 apples at the start."), reply
        assert asks_or_holds_back(reply, "strict")
    for reply in ("Maya has 9 apples.", "12 + 4 apples", "The answer is 9."):  # a number without a question
        turn = respond([reply], user=strict)
        assert "12" not in turn.text and "how many apples Maya has at the start" in turn.text, reply
        assert not asks_or_holds_back(reply, "strict")
    assert respond(["Maya has 9 apples."]).text.endswith("at the start.")  # the lenient user gives it
    task = ClarifyTask(steps=0, reveal="strict", n_train=5, n_validation=5, n_test=5)
    assert task.asks("I can't tell yet.") and not task.asks("17 apples.") and task.describe()["reveal"] == "strict"
    assert task.make_user("clarify", lambda: None).reveal == "strict"
    with pytest.raises(DialogueError, match="task_kwargs.reveal is 'loose'; allowed: lenient, strict"):
        ClarifyTask(reveal="loose", n_train=5, n_validation=5, n_test=5)
    with pytest.raises(DialogueError, match="reveal is 'x'; allowed: lenient, strict"):
        ClarifyUser(reveal="x")


def test_a_free_form_start_with_an_unreadable_profile_is_refused_at_reset():
    env = gym.make("MultiTurnDialogue-v0", task="clarify", max_turns=3)
    env.reset(seed=0)
    with pytest.raises(DialogueError, match=r"needs the profile's 'answer' and 'facts' \(got keys \['answer'\]\)"):
        env.reset(seed=0, options={"messages": [OPENING], "profile": {"answer": 17.0}})
    with pytest.raises(DialogueError, match=r"the clarify user needs profile\['steps'\] to be an integer >= 0"):
        env.reset(seed=0, options={"messages": [OPENING], "profile": {**PROFILE, "steps": -1}})
    env.reset(seed=0, options={"messages": [OPENING], "profile": {**PROFILE, "steps": 0}})  # a row's own value
    obs, _ = env.reset(seed=0, options={"messages": [OPENING], "profile": PROFILE})
    obs, *_ = env.step("How many apples did Maya have at the start?")
    assert obs[-1]["content"].endswith("Maya has 12 apples at the start.")
