"""Run outputs: a fresh run in a used directory starts fresh records; a resumed run continues them."""

from __future__ import annotations

from agents.common.logging import MetricLogger, read_metrics


def test_fresh_run_replaces_metrics_and_resume_appends(tmp_path):
    first = MetricLogger(tmp_path, tensorboard=False)
    first.log(1, {"loss/loss": 1.0})
    first.log(2, {"loss/loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    resumed = MetricLogger(tmp_path, tensorboard=False, resume=True)
    resumed.log(3, {"loss/loss": 0.25})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    fresh = MetricLogger(tmp_path, tensorboard=False)
    fresh.log(1, {"loss/loss": 2.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss/loss": 2.0}]


def test_a_resumed_run_drops_the_rows_logged_after_its_last_checkpoint(tmp_path):
    """A run killed between logging step 3 and checkpointing it resumes from step 2 and logs step 3 again."""
    killed = MetricLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        killed.log(step, {"loss/loss": float(step)})
    resumed = MetricLogger(tmp_path, tensorboard=False, resume=True)
    resumed.drop_after(2)
    resumed.log(3, {"loss/loss": 30.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss/loss": 1.0}, {"step": 2, "loss/loss": 2.0},
                                      {"step": 3, "loss/loss": 30.0}]
    resumed.drop_after(0)  # no checkpoint yet: the run starts over
    assert read_metrics(tmp_path) == []
