from __future__ import annotations

import json

import pytest

from dialogue_gym.conversation import (
    DialogueError,
    DialogueState,
    fork_rng_state,
    new_rng_state,
    rng_from_state,
    validate_messages,
)


def _state(**over):
    base = dict(messages=[{"role": "user", "content": "hi"}], turn=0, max_turns=5, task_row="r1",
                profile={"goal": "x"}, rng=new_rng_state(7), config_fingerprint="abc")
    base.update(over)
    return DialogueState(**base)


def test_validate_messages_accepts_system_then_alternation():
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert validate_messages(msgs) == msgs


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ("hello", "must be a list"),
        ([], "at least one user message"),
        ([{"role": "robot", "content": "x"}], "messages[0].role is 'robot'"),
        ([{"role": "user", "content": "  "}], "messages[0].content is empty"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
        ([{"role": "user"}], "must have keys"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role is 'user'"),
        ([{"role": "assistant", "content": "a"}], "messages[0].role is 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message is only allowed"),
        (["not a dict"], "messages[0] must be a dict"),
    ],
)
def test_validate_messages_errors_name_the_field(messages, fragment):
    with pytest.raises(DialogueError, match=None) as e:
        validate_messages(messages)
    assert fragment in str(e.value)


def test_state_round_trips_through_json():
    s = _state()
    back = DialogueState.from_json(json.dumps(json.loads(s.to_json())))
    assert back == s
    assert back.to_dict() == s.to_dict()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"turn": 1}, "state.turn is 1"),
        ({"max_turns": 0}, "state.max_turns must be >= 1"),
        ({"rng": {"bit_generator": "MT19937"}}, "state.rng must be a PCG64"),
        ({"rng": {"bit_generator": "PCG64", "state": "x"}}, "state.rng is not a usable PCG64"),  # read at a step
        ({"rng": {"bit_generator": "PCG64", "state": {"state": 1, "inc": 2}}}, "KeyError: 'has_uint32'"),
        ({"rng": {"bit_generator": "PCG64", "state": {"state": 2**130, "inc": 1}, "has_uint32": 0, "uinteger": 0}},
         "state.rng is not a usable PCG64"),
        ({"profile": [1]}, "state.profile must be a dict"),
        ({"version": 99}, "state.version is 99"),
        ({"extra_field": 1}, "unknown field(s) ['extra_field']"),
    ],
)
def test_state_validation_names_the_field(change, fragment):
    d = _state().to_dict()
    d.update(change)
    with pytest.raises(DialogueError) as e:
        DialogueState.from_dict(d)
    assert fragment in str(e.value)


def test_state_missing_field_is_named():
    d = _state().to_dict()
    del d["rng"]
    with pytest.raises(DialogueError, match=r"missing field\(s\) \['rng'\]"):
        DialogueState.from_dict(d)


def test_rng_state_restores_exactly_and_forks_differ():
    st = new_rng_state(3)
    a = rng_from_state(st).integers(0, 2**62, size=4)
    b = rng_from_state(st).integers(0, 2**62, size=4)
    assert (a == b).all()
    f1, f1_again, f2 = fork_rng_state(st, 1), fork_rng_state(st, 1), fork_rng_state(st, 2)
    assert f1 == f1_again
    assert rng_from_state(f1).integers(0, 2**62) != rng_from_state(f2).integers(0, 2**62)
    assert rng_from_state(f1).integers(0, 2**62) != rng_from_state(st).integers(0, 2**62)
