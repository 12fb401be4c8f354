"""Budgets: every driver stops cleanly at its evaluation or wall-clock limit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.errors import SparseAllocError


@dataclass
class Budget:
    """At most ``max_evals`` evaluations and ``max_seconds`` of wall clock (None = unlimited).

    Drivers charge every evaluation they request, also those a resumed run answers from its results
    table, so a resumed search stops where the uninterrupted one would; the clock counts this
    invocation only.
    """

    max_evals: int | None = None
    max_seconds: float | None = None
    used_evals: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.max_evals is not None and self.max_evals < 1:
            raise SparseAllocError(f"the evaluation budget must be at least 1, got {self.max_evals}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise SparseAllocError(f"the time budget must be positive, got {self.max_seconds} s")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining_evals(self) -> int | None:
        return None if self.max_evals is None else max(0, self.max_evals - self.used_evals)

    def charge(self, evaluations: int = 1) -> None:
        self.used_evals += evaluations

    def exhausted(self) -> bool:
        out_of_evals = self.max_evals is not None and self.used_evals >= self.max_evals
        out_of_time = self.max_seconds is not None and self.elapsed >= self.max_seconds
        return out_of_evals or out_of_time

    def fraction_used(self) -> float:
        """The larger of the used shares of evaluations and time (for ETAs), in [0, 1]."""
        shares = [0.0]
        if self.max_evals:
            shares.append(self.used_evals / self.max_evals)
        if self.max_seconds:
            shares.append(self.elapsed / self.max_seconds)
        return min(1.0, max(shares))


def driver_allowance(total: float | None, spent: float, share: float, shares_left: float) -> float | None:
    """One driver's part of a search-wide budget (evaluations or seconds) when drivers run in turn.

    ``share`` is the driver's fraction of the search (all shares sum to 1). It gets at least
    ``share`` × ``total``; what earlier drivers left unspent is handed on in
    proportion to the shares still to run (``shares_left`` includes this driver's), so the search
    uses the whole budget it was given. None when there is no such budget.
    """
    if total is None:
        return None
    if not 0 < share <= shares_left:
        raise SparseAllocError(f"a driver's share must lie in (0, {shares_left}], got {share}")
    return max(total * share, (total - spent) * share / shares_left)
