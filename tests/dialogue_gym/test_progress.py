"""The progress helper: log lines when output is not a terminal, a bar on one, and the override."""

from __future__ import annotations

import io
import logging

import pytest

from dialogue_gym.progress import Progress, progress_mode, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_override(monkeypatch):
    monkeypatch.delenv("DIALOGUE_GYM_PROGRESS", raising=False)
    assert progress_mode(io.StringIO()) == "log"
    assert progress_mode(_Tty()) == "bar"
    monkeypatch.setenv("DIALOGUE_GYM_PROGRESS", "off")
    assert progress_mode(_Tty()) == "off"
    monkeypatch.setenv("DIALOGUE_GYM_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="DIALOGUE_GYM_PROGRESS is 'fancy'; allowed: bar, log, off"):
        progress_mode()


def test_log_mode_writes_first_and_last_line_and_throttles(caplog):
    caplog.set_level(logging.INFO, logger="dialogue_gym.progress")
    out = list(track(range(5), desc="iterations", unit="iteration", interval=3600, mode="log"))
    assert out == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    # one line at the start, none in between (the interval is an hour), one at the end
    assert len(lines) == 2
    assert lines[0].startswith("iterations: 0/5 iteration (0%)")
    assert lines[1].startswith("iterations: 5/5 iteration (100%)")


def test_log_mode_every_update_with_zero_interval_and_postfix(caplog):
    caplog.set_level(logging.INFO, logger="dialogue_gym.progress")
    with Progress(total=None, desc="rollout", unit="dialogue", interval=0, mode="log") as bar:
        bar.update(3)
        bar.set_postfix(reward=0.123456, turn=2)
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("rollout: 0 dialogue")
    assert lines[1].startswith("rollout: 3 dialogue")
    assert lines[2].startswith("rollout: 4 dialogue") and lines[2].endswith("reward=0.1235, turn=2")
    assert len(lines) == 3  # close() adds nothing: the last count was already written


def test_resumed_loop_counts_from_initial(caplog):
    caplog.set_level(logging.INFO, logger="dialogue_gym.progress")
    list(track(range(3, 5), total=5, initial=3, desc="it", interval=3600, mode="log"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("it: 3/5 it (60%)") and lines[-1].startswith("it: 5/5 it (100%)")


def test_off_and_bar_modes(caplog, capsys):
    caplog.set_level(logging.INFO, logger="dialogue_gym.progress")
    assert list(track([1, 2], mode="off")) == [1, 2]
    assert caplog.records == []
    assert list(track([1, 2], mode="bar", desc="bar")) == [1, 2]
    assert "bar: 100%" in capsys.readouterr().err  # tqdm writes to stderr
    with pytest.raises(ValueError, match="mode is 'x'"):
        Progress(mode="x")
