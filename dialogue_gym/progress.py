"""Progress reporting for long runs: a tqdm bar on a terminal, plain log lines otherwise.

Agents' iterations and rollouts, reward-model training, benchmarks and leaderboard jobs take minutes to hours.
On a terminal a live bar is what a person wants; in CI logs or a file a bar's carriage returns become thousands of
half-lines, so when stderr is not a terminal the same calls write a plain ``logging`` line at most every
``interval`` seconds (and always at the start and at the end).

Usage::

    from dialogue_gym.progress import Progress, track

    for t in track(range(cfg.iterations), desc="iterations"):
        ...

    with Progress(total=n_dialogues, desc="rollout", unit="dialogue") as bar:
        ...
        bar.update(len(done))
        bar.set_postfix(reward=0.42)

``DIALOGUE_GYM_PROGRESS`` overrides the choice: ``bar`` (always a bar), ``log`` (always log lines) or ``off``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
MODES = ("bar", "log", "off")
_log = logging.getLogger("dialogue_gym.progress")


def progress_mode(stream: Any = None) -> str:
    """``bar`` when ``stream`` (default stderr) is a terminal, else ``log``; ``DIALOGUE_GYM_PROGRESS`` wins.

    Raises:
        ValueError: ``DIALOGUE_GYM_PROGRESS`` is set to something other than bar, log or off.
    """
    forced = os.environ.get("DIALOGUE_GYM_PROGRESS", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"DIALOGUE_GYM_PROGRESS is {forced!r}; allowed: {', '.join(MODES)}")
        return forced
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A progress counter shown as a tqdm bar (terminal) or as throttled log lines (anything else).

    Args:
        total: Expected number of units, or None when unknown.
        desc: What is counted, shown first (``"REFUEL iterations"``).
        unit: The unit's name (``"dialogue"``, ``"step"``).
        interval: In log mode, the least number of seconds between two lines.
        mode: ``bar``, ``log`` or ``off``; default from :func:`progress_mode`.
        logger: Where log lines go (default ``dialogue_gym.progress``).
        initial: Units already done (a resumed run).
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", interval: float = 30.0,
                 mode: str | None = None, logger: logging.Logger | None = None, initial: int = 0):
        self.mode = progress_mode() if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"mode is {self.mode!r}; allowed: {', '.join(MODES)}")
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = initial
        self.postfix: dict[str, Any] = {}
        self.logger = logger or _log
        self._start = time.monotonic()
        self._last_line = -float("inf")
        self._last_n: int | None = None
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
        elif self.mode == "log":
            self._emit(force=True)

    def line(self) -> str:
        """The plain-text status: ``desc: 3/10 dialogue (30%), 0:12 elapsed, ~0:28 left, reward=0.42``."""
        elapsed = time.monotonic() - self._start
        parts = [f"{self.n}/{self.total}" if self.total is not None else str(self.n), self.unit]
        text = f"{self.desc}: " if self.desc else ""
        text += " ".join(parts)
        if self.total:
            text += f" ({100.0 * self.n / self.total:.0f}%)"
        text += f", {_fmt_seconds(elapsed)} elapsed"
        if self.total and self.n and self.n < self.total:
            text += f", ~{_fmt_seconds(elapsed / self.n * (self.total - self.n))} left"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in self.postfix.items())
        return text

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_line >= self.interval:
            self.logger.info("%s", self.line())
            self._last_line = now
            self._last_n = self.n

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            self._emit(force=self.total is not None and self.n >= self.total)

    def set_postfix(self, **values: Any) -> None:
        """Show these values after the count (the latest loss, reward, ...)."""
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in self.postfix.items()},
                                  refresh=False)

    def close(self) -> None:
        """End the bar (or write the final log line if the last one is stale)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and self._last_n != self.n:
            self._emit(force=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
          interval: float = 30.0, mode: str | None = None, logger: logging.Logger | None = None,
          initial: int = 0) -> Iterator[T]:
    """Iterate ``iterable`` with a :class:`Progress` that counts one unit per item.

    ``total`` defaults to ``len(iterable)`` where it has one. ``initial`` counts units done before (a resumed
    loop over ``range(start, n)`` passes ``total=n, initial=start``).
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable) + initial  # type: ignore[arg-type]
    with Progress(total=total, desc=desc, unit=unit, interval=interval, mode=mode, logger=logger,
                  initial=initial) as bar:
        for item in iterable:
            yield item
            bar.update(1)
