"""Wall-clock seconds per phase of a run, kept in the run directory so a resumed run counts the time
spent before its interrupt (time budgets and the deadline hold across a resume).

``RunClock(run_dir)`` loads ``clock.json``; ``with clock.phase(name) as offset:`` times one phase
(setup, a driver, the final passes), starting from the seconds that phase had already used in
earlier sessions (``offset``); a background thread writes the running figures every few seconds,
so even a SIGKILL loses at most that much.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.identity import write_json

TICK_SECONDS = 2.0


class RunClock:
    """Seconds spent per phase, across every session of one run directory."""

    def __init__(self, run_dir: Path, tick: float = TICK_SECONDS) -> None:
        self.path = Path(run_dir) / "clock.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._tick = tick
        self._running: dict[str, float] = {}  # phase -> monotonic start minus its earlier seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def spent(self, phase: str | None = None) -> float:
        """Seconds of ``phase`` (all phases when None) so far, the running ones included."""
        now = time.monotonic()
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
            self._running[name] = time.monotonic() - earlier - extra
        self._start_ticking()
        try:
            yield earlier
        finally:
            with self._lock:
                self.seconds[name] = time.monotonic() - self._running.pop(name)
            self.save()

    def save(self) -> None:
        """Write the figures (running phases at their current value) atomically."""
        now = time.monotonic()
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
