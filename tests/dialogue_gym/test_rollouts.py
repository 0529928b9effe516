"""Rollout store: exact round trip, field-naming validation, crash remnants, concurrent writers and readers, stored
evaluation states."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import gymnasium as gym
import pytest

import dialogue_gym  # noqa: F401
from dialogue_gym.conversation import DialogueState, new_rng_state
from dialogue_gym.rollouts import (
    DialogueRecord,
    RolloutError,
    RolloutStore,
    StateRecord,
    config_hashes,
    make_states,
    record_from_dict,
    stored_states,
)
from tests.conftest import LengthReward

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure? ünïcødé ✓"},
            {"role": "assistant", "content": "Yes: 4.\nLine two"}]


def a_state() -> DialogueState:
    return DialogueState(messages=MESSAGES[:2], turn=0, max_turns=3, task_row="row-1", profile={"answer": 4.0},
                         rng=new_rng_state(7), config_fingerprint="abc123", last_score=0.1 + 0.2)


def a_dialogue(i: int = 0, content: str = "4") -> DialogueRecord:
    msgs = [dict(m) for m in MESSAGES]
    msgs[2]["content"] = content
    return DialogueRecord(id=f"d-{i}", policy="initial", messages=msgs, rewards=[1 / 3, None],
                          token_ids=[[19, 2], [1, 5, 2]], logprobs=[[-0.1, -1e-300], [-2.5, -0.0, -7.25]],
                          terminated=False, truncated=True, start="eval-0000", start_hash="ff00",
                          state_fingerprint="abc123", config={"env": "abc123", "user": "u1"},
                          seeds={"policy": 2**62 + 1}, tags={"seed": 0, "x": [1.5]})


# ---- round trip and validation ------------------------------------------------------------------------------

def test_round_trip_is_exact(tmp_path):
    store = RolloutStore(tmp_path / "r.jsonl")
    state = StateRecord(id="eval-0000", state=a_state(), policy_seed=2**63 - 1, config={"env": "abc123"},
                        tags={"split": "test"})
    dialogue = a_dialogue()
    assert store.append([state, dialogue]) == 2
    back = store.read()
    assert [type(r) for r in back] == [StateRecord, DialogueRecord]
    assert back[0].to_dict() == state.to_dict() and back[0].state == state.state
    assert back[0].state_hash == state.state_hash
    assert back[1].to_dict() == dialogue.to_dict()
    assert back[1].rewards == [1 / 3, None] and back[1].logprobs[0][1] == -1e-300  # floats survive bit for bit
    assert back[1].seeds["policy"] == 2**62 + 1 and back[1].turns == 2
    assert store.states()[0].id == "eval-0000" and [d.id for d in store.dialogues("initial")] == ["d-0"]
    assert store.dialogues("someone else") == []
    line = (tmp_path / "r.jsonl").read_text().splitlines()[1]
    assert json.loads(line)["schema"] == 1 and json.loads(line)["kind"] == "dialogue"


def test_reading_a_missing_store_gives_no_records(tmp_path):
    assert RolloutStore(tmp_path / "nothing.jsonl").read() == []


@pytest.mark.parametrize("change, field", [
    ({"rewards": [1.0, "x"]}, "record.rewards[1]"),
    ({"rewards": [1.0, 2.0, 3.0]}, "record.rewards has 3 entries but messages hold only 2"),
    ({"rewards": [1.0]}, "record.token_ids must be a list of 1 lists"),
    ({"rewards": [1.0, float("nan")]}, "record.rewards[1]"),
    ({"token_ids": [[1], [2.5]]}, "record.token_ids[1][0]"),
    ({"token_ids": [[1]]}, "record.token_ids"),
    ({"logprobs": [[-0.1, -0.2], [-1.0]]}, "record.logprobs[1]"),
    ({"messages": [{"role": "user", "content": ""}]}, "record.messages[0].content"),
    ({"seeds": {"policy": "x"}}, "record.seeds.policy"),
    ({"terminated": "no"}, "record.terminated"),
    ({"policy": ""}, "record.policy"),
    ({"config": {"env": 3}}, "record.config.env"),
    ({"colour": "red"}, "unknown field(s) ['colour']"),
    ({"schema": 2}, "record.schema is 2"),
    ({"kind": "episode"}, "record.kind is 'episode'"),
])
def test_bad_fields_are_named(change, field):
    data = {**a_dialogue().to_dict(), **change}
    with pytest.raises(RolloutError, match=field.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        record_from_dict(data)


def test_records_are_checked_when_built_and_states_by_the_state_rules():
    with pytest.raises(RolloutError, match=r"record.rewards\[0\]"):
        DialogueRecord(id="d", policy="p", messages=MESSAGES, rewards=[True, 1.0], token_ids=[[], []])
    data = StateRecord(id="s", state=a_state(), policy_seed=1).to_dict()
    data["state"]["turn"] = 3
    with pytest.raises(RolloutError, match=r"record.state: state.turn is 3"):
        record_from_dict(data)
    with pytest.raises(RolloutError, match=r"record.policy_seed must be an integer"):
        record_from_dict({**StateRecord(id="s", state=a_state(), policy_seed=1).to_dict(), "policy_seed": "1"})


def test_a_bad_line_is_an_error_naming_the_line(tmp_path):
    store = RolloutStore(tmp_path / "r.jsonl")
    store.append(a_dialogue(0))
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write(json.dumps({**a_dialogue(1).to_dict(), "rewards": [0.0, "bad"]}) + "\n")
    with pytest.raises(RolloutError, match=r"r.jsonl line 2.rewards\[1\]"):
        store.read()


def test_append_rejects_bad_records_and_writes_nothing(tmp_path):
    store = RolloutStore(tmp_path / "r.jsonl")
    good = a_dialogue(0)
    bad = a_dialogue(1)
    bad.rewards = [0.0]  # broken after construction
    with pytest.raises(RolloutError, match=r"records\[1\] \(id 'd-1'\).token_ids must be a list of 1 lists"):
        store.append([good, bad])
    assert store.read() == []
    with pytest.raises(RolloutError, match=r"records\[0\] must be a StateRecord or DialogueRecord"):
        store.append([{"id": "x"}])


# ---- crashes --------------------------------------------------------------------------------------------------

def test_truncated_last_line_is_skipped_and_sealed_by_the_next_append(tmp_path):
    path = tmp_path / "r.jsonl"
    store = RolloutStore(path)
    store.append([a_dialogue(i) for i in range(3)])
    whole = json.dumps(a_dialogue(3).to_dict()) + "\n"
    with path.open("a") as f:
        f.write(whole[: len(whole) // 2])  # a writer died mid-line
    assert [r.id for r in store.read()] == ["d-0", "d-1", "d-2"]
    assert store.partial_tail and store.skipped_lines == []
    store.append(a_dialogue(4))
    assert [r.id for r in store.read()] == ["d-0", "d-1", "d-2", "d-4"]
    assert store.skipped_lines == [4] and not store.partial_tail
    assert path.read_text().count("\n") == 5  # the remnant kept its own line


# ---- concurrency ----------------------------------------------------------------------------------------------

def _writer(path: str, who: int, n: int) -> None:
    store = RolloutStore(path)
    for i in range(n):
        # ~200 KB per record: each write spans many pages, so a torn read would show
        store.append(a_dialogue(who * 1000 + i, content=f"{who}:{i}:" + "x" * 200_000))


def test_concurrent_writers_never_interleave_and_readers_see_whole_records(tmp_path):
    path = tmp_path / "r.jsonl"
    n = 25
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(path), w, n)) for w in (1, 2)]
    for p in writers:
        p.start()
    store = RolloutStore(path)
    seen, reads = 0, 0
    deadline = time.time() + 120
    while any(p.is_alive() for p in writers) and time.time() < deadline:
        records = store.read()
        reads += 1
        assert store.skipped_lines == []
        assert len(records) >= seen  # append-only: a reader never loses records
        seen = len(records)
        for r in records:
            who, i = divmod(int(r.id[2:]), 1000)
            assert r.messages[2]["content"] == f"{who}:{i}:" + "x" * 200_000
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    records = store.read()
    assert len(records) == 2 * n and len({r.id for r in records}) == 2 * n and store.skipped_lines == []
    for w in (1, 2):  # each writer's records appear in its own order
        ids = [int(r.id[2:]) for r in records if int(r.id[2:]) // 1000 == w]
        assert ids == sorted(ids)
    assert reads >= 2


# ---- evaluation states ----------------------------------------------------------------------------------------

def eval_core(**over):
    kw = dict(task="arithmetic", task_kwargs={"n_train": 20, "n_test": 10}, split="test", reward_mode="per_turn",
              max_turns=3)
    kw.update(over)
    return gym.make_vec("MultiTurnDialogue-v0", num_envs=1, **kw).core


def test_states_are_made_once_and_reused_by_everyone(tmp_path):
    core = eval_core()
    store = RolloutStore(tmp_path / "states.jsonl")
    first = stored_states(store, core, 5, seed=3)
    again = stored_states(RolloutStore(tmp_path / "states.jsonl"), eval_core(), 5, seed=3)  # another agent's process
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert len(store.read()) == 5  # not appended twice
    assert [s.id for s in first] == [f"eval-{i:04d}" for i in range(5)]
    assert [s.tags["row"] for s in first] == [core.rows[i].id for i in range(5)]
    assert len({s.state_hash for s in first}) == 5 and len({s.policy_seed for s in first}) == 5
    assert first[0].config == config_hashes(core) and set(first[0].config) == {"env", "task", "user", "reward"}
    # the seed decides the user seed streams: another seed gives other streams at the same rows
    other = make_states(core, 5, seed=4)
    assert [s.state.messages for s in other] == [s.state.messages for s in first]
    assert all(a.state.rng != b.state.rng for a, b in zip(first, other))


def test_stored_states_refuse_another_configuration_or_size(tmp_path):
    store = RolloutStore(tmp_path / "states.jsonl")
    stored_states(store, eval_core(), 3, seed=0)
    with pytest.raises(RolloutError, match="env configuration"):
        stored_states(store, eval_core(max_turns=2), 3, seed=0)
    with pytest.raises(RolloutError, match="holds 3 states made with seed 0; asked for 4 with seed 0"):
        stored_states(store, eval_core(), 4, seed=0)
    with pytest.raises(ValueError, match=r"must be an integer in \[1, 10\]"):
        make_states(eval_core(), 11, seed=0)


def test_stored_states_restore_in_an_env_exactly(tmp_path):
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, autoreset_mode="Disabled", task="arithmetic",
                        task_kwargs={"n_train": 20, "n_test": 10}, split="test", user="scripted",
                        reward=LengthReward(), reward_mode="per_turn", max_turns=3)
    states = stored_states(RolloutStore(tmp_path / "s.jsonl"), venv.core, 2, seed=0)
    obs, _ = venv.reset(options={"states": [s.state for s in states]})
    assert [list(o) for o in obs] == [s.state.messages for s in states]
