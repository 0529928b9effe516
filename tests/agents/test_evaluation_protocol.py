"""One evaluation protocol: an agent's in-run evaluation (``Evaluator``, eval.json) and the leaderboard play the same
stored states with the same seeds and report the same per-state scores for the same policy; the evaluation's
dialogues are kept in a rollout store."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dialogue_gym  # noqa: F401
from agents.common.config import EvalSettings, SamplingSettings
from agents.common.evaluation import carry_forward
from agents.common.run import Evaluator
from benchmarks import leaderboard as lb
from dialogue_gym.config import EnvConfig
from dialogue_gym.generation.hf import HFEngine
from dialogue_gym.models import load_model
from dialogue_gym.rollout_store import RolloutError, RolloutStore, stored_states
from tests.conftest import LengthReward

N, SEED = 3, 21


def env_config(**over) -> EnvConfig:
    """Arithmetic with its critic user; every turn scored by reply length, so scores differ between dialogues."""
    return EnvConfig(**{"task": "arithmetic", "task_kwargs": {"n_train": 20, "n_test": 10}, "max_turns": 2,
                        "reward": LengthReward(), **over})


def leaderboard_config() -> lb.LeaderboardConfig:
    return lb.LeaderboardConfig(policy="tiny", env=env_config(), max_new_tokens=8,
                                eval=lb.EvalProtocol(states=N, seed=SEED, temperature=1.0))


def in_run(tmp_path, resume: bool = False, split: str = "test", **env_over) -> Evaluator:
    settings = EvalSettings(dialogues=N, seed=SEED, temperature=1.0, split=split)
    return Evaluator(env_config(**env_over), settings, SamplingSettings(top_p=1.0, max_new_tokens=8), tmp_path,
                     resume=resume)


def test_eval_json_and_the_leaderboard_report_the_same_scores_on_the_same_states(tmp_path):
    cfg = leaderboard_config()
    venv = lb.eval_env(cfg, N)
    states = stored_states(RolloutStore(tmp_path / "lb" / "eval_states.jsonl"), venv, N, SEED, "eval")
    board = RolloutStore(tmp_path / "lb" / "dialogues.jsonl")
    records, _ = lb.evaluate(cfg, venv, "tiny", states, board, "initial", {})
    board_scores = lb.score_matrix(records, cfg.env.max_turns)  # states at turn 0: H columns

    evaluator = in_run(tmp_path / "run")
    summary = evaluator.evaluate(HFEngine(load_model("tiny", shared=False), seed=0), "initial")
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["evaluations"][0]
    eval_scores = np.array([[np.nan if x is None else x for x in row] for row in saved["scores"]], dtype=float)

    # the same states (ids, contents, seeds) ...
    assert [(s.id, s.state_hash, s.policy_seed) for s in evaluator.states] == \
        [(s.id, s.state_hash, s.policy_seed) for s in states]
    # ... the same dialogues, token for token ...
    mine = evaluator.store.dialogues("initial")
    assert [r.messages for r in mine] == [r.messages for r in records]
    assert [r.token_ids for r in mine] == [r.token_ids for r in records]
    # ... and the same per-state scores, which differ between states (the check can tell states apart)
    assert eval_scores.shape == board_scores.shape == (N, 2) and not np.isnan(eval_scores).any()
    np.testing.assert_array_equal(eval_scores, board_scores)
    assert len({tuple(row) for row in eval_scores}) > 1
    assert summary["mean_outcome"] == pytest.approx(carry_forward(board_scores).mean(axis=0).tolist())


def test_an_agents_states_are_the_first_of_the_leaderboards(tmp_path):
    """The leaderboard shrinks an agent's own evaluation to fewer dialogues: its states are the first ones of the
    leaderboard's (same seed), not other ones."""
    venv = lb.eval_env(leaderboard_config(), 5)
    board = stored_states(RolloutStore(tmp_path / "states.jsonl"), venv, 5, SEED, "eval")
    evaluator = in_run(tmp_path / "run")
    assert [s.state_hash for s in evaluator.states] == [s.state_hash for s in board[:N]]


def test_the_evaluation_store_keeps_every_evaluation_and_resumes(tmp_path):
    engine = HFEngine(load_model("tiny", shared=False), seed=0)
    first = in_run(tmp_path)
    first.evaluate(engine, "initial")
    first.evaluate(engine, "iteration 1")
    store = RolloutStore(tmp_path / Evaluator.STORE)
    assert len(store.states()) == N and [r.policy for r in store.dialogues()] == ["initial"] * N + ["iteration 1"] * N
    assert [r.tags["evaluation"] for r in store.dialogues()] == [0] * N + [1] * N
    resumed = in_run(tmp_path, resume=True)  # the stored states are played on, the store continued
    assert [s.state_hash for s in resumed.states] == [s.state_hash for s in first.states]
    resumed.evaluate(engine, "iteration 2")
    assert len(RolloutStore(tmp_path / Evaluator.STORE).dialogues()) == 3 * N
    # a fresh (not resumed) run replaces the store, as it replaces eval.json
    in_run(tmp_path)
    assert RolloutStore(tmp_path / Evaluator.STORE).dialogues() == []


def test_resuming_with_another_env_configuration_is_an_error(tmp_path):
    in_run(tmp_path).evaluate(HFEngine(load_model("tiny", shared=False), seed=0), "initial")
    with pytest.raises(RolloutError, match="env configuration"):
        in_run(tmp_path, resume=True, max_turns=3)
    assert len(RolloutStore(tmp_path / Evaluator.STORE).dialogues()) == N  # the store is left as it was


def test_eval_split_validation_plays_the_validation_rows_and_cannot_resume_as_test(tmp_path):
    """eval.split=validation (choices made by looking at results) plays the first validation rows, and a store of
    validation states is never continued by a test evaluation."""
    from dialogue_gym.tasks import build_task

    val = in_run(tmp_path, split="validation")
    rows = build_task("arithmetic", n_train=20, n_test=10).rows("validation")
    assert [s.tags["split"] for s in val.states] == ["validation"] * N
    assert [s.state.task_row for s in val.states] == [r.id for r in rows[:N]]
    assert {s.state.task_row for s in in_run(tmp_path / "test").states}.isdisjoint({r.id for r in rows})
    val.evaluate(HFEngine(load_model("tiny", shared=False), seed=0), "initial")
    with pytest.raises(RolloutError, match="env configuration"):
        in_run(tmp_path, resume=True)  # the test split on a validation store
    assert len(RolloutStore(tmp_path / Evaluator.STORE).dialogues()) == N
