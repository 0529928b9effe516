"""Kill a training run with SIGKILL right after it checkpointed iteration k: what a cluster does to a job at its time
limit or a node failure (no handler runs, no file is closed). Used by the kill-resume tests of the agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from agents.common.checkpoint import last_checkpoint


def checkpointed(run_dir: Path) -> int:
    """The iteration of ``run_dir``'s last complete checkpoint (0 while there is none, or while a save is renaming
    it into place)."""
    try:
        target = last_checkpoint(run_dir)
        return int(json.loads((target / "state.json").read_text())["iteration"]) if target else 0
    except (OSError, ValueError):
        return 0


def run_killed_after(cmd: Sequence[str], run_dir: Path, iteration: int, env: dict[str, str], cwd: Path,
                     timeout_s: float = 900.0) -> str:
    """Run ``cmd`` (a training run writing to ``run_dir``) and SIGKILL it, with every process it started (the
    workers of a launcher included, which start their own sessions), as soon as its checkpoint of ``iteration`` is
    complete on disk; the checkpoint is polled every 20 ms.

    Returns:
        The run's output (stdout and stderr).

    Raises:
        AssertionError: the run ended, or ran past ``timeout_s``, before that checkpoint; or it checkpointed a
            later iteration before the kill landed (the kill came too late to test what it should).
    """
    log = run_dir.with_name(run_dir.name + "-killed.log")
    with log.open("w") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while checkpointed(run_dir) < iteration:
                if proc.poll() is not None:
                    raise AssertionError(f"the run ended (exit {proc.returncode}) before its checkpoint of iteration "
                                         f"{iteration}:\n{log.read_text()[-5000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint of iteration {iteration} within {timeout_s} s")
                time.sleep(0.02)
        finally:
            _kill_tree(proc)
    output = log.read_text()
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed:\n{output[-3000:]}"
    assert checkpointed(run_dir) == iteration, "the run checkpointed a later iteration before the kill landed"
    return output


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and all its descendants (by process id), then reap ``proc``."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs(family[1:], timeout=30)
