"""Input fixes found by a fuzz run and by real-schema data (issue 17): state fields checked like the others,
malformed dataset rows skipped with one warning, the async vector env, and dataset configs that name the hub id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import dialogue_gym  # noqa: F401
from dialogue_gym.conversation import DialogueError, DialogueState, new_rng_state
from dialogue_gym.tasks import AnthropicHHTask, UltraInteractTask

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
UI = FIXTURES / "ultrainteract_pair.jsonl"
HH_TRL = FIXTURES / "hh_rlhf_trl_style.jsonl"
ARITH = dict(task="arithmetic", user="critic", reward="verifier", max_turns=3)


def _state_dict(**over):
    base = dict(messages=[{"role": "user", "content": "hi"}], turn=0, max_turns=5, task_row="r1",
                profile={}, rng=new_rng_state(7), config_fingerprint="abc")
    base.update(over)
    return base


# ---- state fields ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [{"a": 1}, ["r1"], 3, None, b"r1"])
def test_state_task_row_must_be_a_string(value):
    with pytest.raises(DialogueError, match=r"state.task_row must be a string \(a task row id"):
        DialogueState.from_dict(_state_dict(task_row=value))


@pytest.mark.parametrize("value", ["0.5", [1.0], {"x": 1}, None, True])
def test_state_last_score_must_be_a_number(value):
    with pytest.raises(DialogueError, match="state.last_score must be a number"):
        DialogueState.from_dict(_state_dict(last_score=value))


@pytest.mark.parametrize("field", ["terminated", "truncated"])
def test_state_flags_must_be_booleans(field):
    with pytest.raises(DialogueError, match=rf"state.{field} must be true or false"):
        DialogueState.from_dict(_state_dict(**{field: "no"}))


def test_state_numbers_that_are_valid_still_load():
    s = DialogueState.from_dict(_state_dict(last_score=1, task_row=""))
    assert s.last_score == 1.0 and isinstance(s.last_score, float) and s.task_row == ""


def test_env_reset_rejects_a_bad_task_row_and_stays_usable():
    env = gym.make("MultiTurnDialogue-v0", **ARITH)
    obs, _ = env.reset(seed=0)
    state = env.unwrapped.get_state().to_dict()
    state["task_row"] = {"id": "x"}
    with pytest.raises(DialogueError, match="state.task_row must be a string"):
        env.reset(options={"state": state})
    state["task_row"], state["last_score"] = env.unwrapped.get_state().task_row, "high"
    with pytest.raises(DialogueError, match="state.last_score must be a number"):
        env.reset(options={"state": state})
    assert env.unwrapped.get_state().messages == obs  # the episode is untouched
    env.step("The answer is 1.")


# ---- malformed rows ----------------------------------------------------------------------------------------


def _with_bad_rows(tmp_path: Path, source: Path, bad: list[dict]) -> Path:
    lines = source.read_text().splitlines()
    out = tmp_path / source.name
    out.write_text("\n".join([lines[0], *(json.dumps(b) for b in bad), *lines[1:]]) + "\n")
    return out


def test_ultrainteract_skips_a_row_with_an_empty_trajectory_with_one_warning(tmp_path):
    bad = {"task": "Coding", "dataset": "x", "trajectory": [], "chosen": "a", "rejected": "b", "id": "bad-1",
           "parent_id": "p"}
    path = _with_bad_rows(tmp_path, UI, [bad, {**bad, "id": "bad-2"}])
    with pytest.warns(UserWarning) as caught:
        task = UltraInteractTask(path=path, test_fraction=0.3)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "skipped 2 malformed row(s) of 17" in msg and "row 1 (id 'bad-1'): trajectory must be a non-empty" in msg
    assert "strict=true" in msg
    clean = UltraInteractTask(path=UI, test_fraction=0.3)
    assert [r.id for r in task.rows("train")] == [r.id for r in clean.rows("train")]
    assert task.skipped["invalid"] == 2
    with pytest.raises(DialogueError, match=r"row 1 \(id 'bad-1'\): trajectory must be a non-empty list"):
        UltraInteractTask(path=path, strict=True)


def test_a_file_with_no_valid_row_is_still_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "trajectory": []}) + "\n" + json.dumps({"id": "b", "trajectory": 3}) + "\n")
    with pytest.raises(DialogueError, match=r"none of the 2 row\(s\).*is valid.*row 0 \(id 'a'\)"):
        UltraInteractTask(path=bad)
    with pytest.raises(DialogueError, match="task_kwargs.strict must be true or false"):
        UltraInteractTask(path=UI, strict="yes")


def test_anthropic_hh_skips_malformed_rows(tmp_path):
    path = _with_bad_rows(tmp_path, HH_TRL, [{"chosen": 3}])
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row\(s\) of 9.*row 1: 'chosen' must be"):
        task = AnthropicHHTask(path=path)
    clean = AnthropicHHTask(path=HH_TRL)
    assert [r.id for r in task.rows("train")] == [r.id for r in clean.rows("train")]
    with pytest.raises(DialogueError, match="row 1: 'chosen' must be a dialogue string"):
        AnthropicHHTask(path=path, strict=True)


# ---- the async vector env ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_memory", [True, False])
def test_async_vector_env_matches_the_native_one(shared_memory):
    actions = [["The answer is 3.", "The answer is 7."], ["I think 2.", "The answer is 7."]]
    native = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, **ARITH)
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, vectorization_mode="async",
                        vector_kwargs={"shared_memory": shared_memory}, **ARITH)
    try:
        a, _ = venv.reset(seed=3)
        b, _ = native.reset(seed=3)
        assert isinstance(a, tuple) and list(a) == list(b)
        for act in actions:
            got = venv.step(act)
            want = native.step(act)
            assert list(got[0]) == list(want[0])
            for x, y in zip(got[1:4], want[1:4]):
                np.testing.assert_array_equal(x, y)
    finally:
        venv.close()


def test_async_default_make_vec_works():
    venv = gym.make_vec("MultiTurnDialogue-v0", num_envs=2, vectorization_mode="async", **ARITH)
    try:
        obs, _ = venv.reset(seed=0)
        assert len(obs) == 2 and all(o[-1]["role"] == "user" for o in obs)
        obs2, *_ = venv.step(("The answer is 1.", "The answer is 2."))
        assert obs2[0][1] == {"role": "assistant", "content": "The answer is 1."}
        assert obs[0] == obs2[0][:1]  # the returned observations are copies, not live views
    finally:
        venv.close()


def test_shared_memory_slot_overflow_names_the_way_out():
    from gymnasium.vector.utils import create_shared_memory, write_to_shared_memory

    from dialogue_gym.shared_memory import SLOT_BYTES
    from dialogue_gym.spaces import Conversation

    buf = create_shared_memory(Conversation(), n=1)  # gymnasium's own functions, dispatching to this package's
    with pytest.raises(DialogueError, match=r"shared_memory': False"):
        write_to_shared_memory(Conversation(), 0, [{"role": "user", "content": "x" * SLOT_BYTES}], buf)


# ---- dataset configs name their hub id ---------------------------------------------------------------------


@pytest.mark.slow
def test_refuel_on_ultrainteract_offline_with_an_empty_cache_says_how_to_get_the_data(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "agents.refuel", "+env=ultrainteract",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "hub_id='openbmb/UltraInteract_pair' could not be loaded (offline mode is on" in out
    assert "+env=ultrainteract env.task_kwargs.path=" in out
    assert "hf download openbmb/UltraInteract_pair --repo-type dataset" in out


@pytest.mark.parametrize("name, hub_id", [("ultrainteract", "openbmb/UltraInteract_pair"),
                                          ("anthropic_hh", "trl-internal-testing/hh-rlhf-trl-style")])
def test_dataset_env_configs_name_their_hub_dataset_and_a_local_path_wins(name, hub_id):
    from omegaconf import OmegaConf

    from dialogue_gym.tasks import build_task

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "env" / f"{name}.yaml"))
    assert cfg["task_kwargs"]["hub_id"] == hub_id and cfg["task_kwargs"]["path"] is None
    path = {"ultrainteract": UI, "anthropic_hh": HH_TRL}[name]
    task = build_task(name, **{**cfg["task_kwargs"], "path": str(path)})  # offline: only the path can work
    assert task.rows("train")
