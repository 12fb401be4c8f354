"""Wall-clock seconds per phase of a run, kept in the run directory so a resumed run counts the time
spent before its interrupt (time budgets and the deadline hold across a resume).

``RunClock(run_dir)`` loads ``clock.json``; ``with clock.phase(name) as offset:`` times one phase
(setup, a driver, the final passes), starting from the seconds that phase had already used in
earlier sessions (``offset``); a background thread writes the running figures every few seconds,
so even a SIGKILL loses at most that much. A ``clock.json`` lost or unreadable on resume is rebuilt
from the results table's timestamps (each driver's first to last row), and the log says so: the
seconds of setup and final passes spent before are then not counted.

Every wall-clock reading of a run goes through :func:`monotonic`, one place a test can replace.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.identity import write_json

TICK_SECONDS = 2.0
log = logging.getLogger(__name__)


def monotonic() -> float:
    """Seconds on the run's clock (``time.monotonic``; tests substitute their own)."""
    return time.monotonic()


def phases_from_rows(rows: list[dict]) -> dict[str, float]:
    """Each driver's phase rebuilt from its rows' timestamps: first row to last."""
    spans: dict[str, list[float]] = {}
    for row in rows:
        if row.get("driver") and row["driver"] != "setup" and row.get("timestamp") is not None:
            spans.setdefault(row["driver"], []).append(row["timestamp"])
    return {f"driver:{name}": max(times) - min(times) for name, times in spans.items()}


class RunClock:
    """Seconds spent per phase, across every session of one run directory."""

    def __init__(self, run_dir: Path, tick: float = TICK_SECONDS, rows: list[dict] | None = None) -> None:
        """The clock of ``run_dir``; ``rows``: its results table's rows, to rebuild a lost clock from."""
        self.path = Path(run_dir) / "clock.json"
        self.seconds: dict[str, float] = self._load(rows or [])
        self._tick = tick
        self._running: dict[str, float] = {}  # phase -> monotonic start minus its earlier seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, rows: list[dict]) -> dict[str, float]:
        if self.path.exists():
            try:
                seconds = json.loads(self.path.read_text())
                if isinstance(seconds, dict) and all(isinstance(v, (int, float)) for v in seconds.values()):
                    return seconds
                problem = "not a mapping of phases to seconds"
            except (OSError, ValueError) as exc:
                problem = str(exc)
            state = f"unreadable ({problem})"
        elif rows:
            state = "missing"
        else:
            return {}
        seconds = phases_from_rows(rows)
        log.warning("%s was %s; rebuilt from the results table's timestamps (%.0f s in the drivers); the seconds "
                    "of setup and final passes spent before are not counted", self.path, state, sum(seconds.values()))
        return seconds

    def spent(self, phase: str | None = None) -> float:
        """Seconds of ``phase`` (all phases when None) so far, the running ones included."""
        now = monotonic()
        with self._lock:
            current = dict(self.seconds)
            current.update({name: now - start for name, start in self._running.items()})
        return current.get(phase, 0.0) if phase is not None else sum(current.values())

    @contextmanager
    def phase(self, name: str, extra: float = 0.0) -> Iterator[float]:
        """Time ``name``; yields the seconds it had used before (0 for a new phase). ``extra``: seconds of
        this phase that ran before the clock existed (counted as part of it)."""
        earlier = self.seconds.get(name, 0.0)
        with self._lock:
            self._running[name] = monotonic() - earlier - extra
        self._start_ticking()
        try:
            yield earlier
        finally:
            with self._lock:
                self.seconds[name] = monotonic() - self._running.pop(name)
            self.save()

    def save(self) -> None:
        """Write the figures (running phases at their current value) atomically."""
        now = monotonic()
        with self._lock:
            figures = dict(self.seconds)
            figures.update({name: now - start for name, start in self._running.items()})
        write_json(self.path, figures)

    def _start_ticking(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._ticking, name="run-clock", daemon=True)
            self._thread.start()

    def _ticking(self) -> None:
        while not self._stop.wait(self._tick):
            self.save()

    def close(self) -> None:
        """Stop the background writer and write once more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.save()
