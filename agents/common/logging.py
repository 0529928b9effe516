"""Metrics to the console, a JSON-lines file and TensorBoard, under fixed namespaces (env/, loss/, policy/,
perf/, eval/)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("agents")


class MetricLogger:
    """Writes ``metrics.jsonl`` and TensorBoard event files in ``run_dir``; prints a one-line summary.

    ``resume`` appends to an existing ``metrics.jsonl``; otherwise it is replaced.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if not resume and self.path.exists():  # a fresh run in a used directory starts a fresh record
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(clean.items()) if k.startswith(("loss/", "env/")))
        log.info("step %d: %s", step, shown)

    def drop_after(self, step: int) -> None:
        """Forget the ``metrics.jsonl`` rows of steps after ``step`` (a resumed run: the rows a killed run logged
        after its last checkpoint, which the resumed run logs again). TensorBoard keeps its events."""
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
