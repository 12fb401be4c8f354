"""Budgets: every driver stops cleanly at its evaluation, forward-token or wall-clock limit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from core.errors import SparseAllocError


@dataclass
class Budget:
    """At most ``max_evals`` evaluations, ``max_tokens`` fitness tokens scored and ``max_seconds`` of
    wall clock (None = unlimited).

    An evaluation's tokens are its candidate's fidelity (``Candidate.tokens``; all fitness tokens for
    None), so a 1024-token evaluation costs four times a 256-token one and the shares of drivers that
    score at different fidelities are comparable. Drivers charge every evaluation they request, with its
    tokens, also those a resumed run answers from its results table, so a resumed search stops where the
    uninterrupted one would; the clock counts this invocation only.
    """

    max_evals: int | None = None
    max_seconds: float | None = None
    max_tokens: int | None = None
    used_evals: int = 0
    used_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.max_evals is not None and self.max_evals < 1:
            raise SparseAllocError(f"the evaluation budget must be at least 1, got {self.max_evals}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise SparseAllocError(f"the time budget must be positive, got {self.max_seconds} s")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SparseAllocError(f"the token budget must be at least 1, got {self.max_tokens}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining_evals(self) -> int | None:
        return None if self.max_evals is None else max(0, self.max_evals - self.used_evals)

    def remaining_tokens(self) -> int | None:
        return None if self.max_tokens is None else max(0, self.max_tokens - self.used_tokens)

    def room(self, tokens_each: int = 0, keep_evals: int = 0, keep_tokens: int = 0) -> int | None:
        """How many more evaluations of ``tokens_each`` tokens fit in the evaluation and token budgets
        after keeping back ``keep_evals`` evaluations and ``keep_tokens`` tokens (the clock is not
        considered); None when neither budget is limited, never negative."""
        counts = []
        evals = self.remaining_evals()
        if evals is not None:
            counts.append(evals - keep_evals)
        tokens = self.remaining_tokens()
        if tokens is not None and tokens_each > 0:
            counts.append((tokens - keep_tokens) // tokens_each)
        elif tokens is not None and tokens < keep_tokens:
            counts.append(0)
        return max(0, min(counts)) if counts else None

    def fits(self, evaluations: int, tokens: int = 0) -> bool:
        """Whether ``evaluations`` more evaluations scoring ``tokens`` tokens in all fit in the evaluation
        and token budgets (the clock is not considered)."""
        evals, left = self.remaining_evals(), self.remaining_tokens()
        return (evals is None or evaluations <= evals) and (left is None or tokens <= left)

    def charge(self, evaluations: int = 1, tokens: int = 0) -> None:
        self.used_evals += evaluations
        self.used_tokens += tokens

    def exhausted(self) -> bool:
        out_of_evals = self.max_evals is not None and self.used_evals >= self.max_evals
        out_of_tokens = self.max_tokens is not None and self.used_tokens >= self.max_tokens
        out_of_time = self.max_seconds is not None and self.elapsed >= self.max_seconds
        return out_of_evals or out_of_tokens or out_of_time

    def fraction_used(self) -> float:
        """The largest of the used shares of evaluations, tokens and time (for ETAs), in [0, 1]."""
        shares = [0.0]
        if self.max_evals:
            shares.append(self.used_evals / self.max_evals)
        if self.max_tokens:
            shares.append(self.used_tokens / self.max_tokens)
        if self.max_seconds:
            shares.append(self.elapsed / self.max_seconds)
        return min(1.0, max(shares))


def eval_tokens(tokens: int | None, full: int | None, budget: Budget) -> int:
    """The tokens one evaluation at fidelity ``tokens`` scores: ``tokens``, or for None (all fitness
    tokens) ``full``, the size of the fitness set. When that is unknown too, 0 (not counted) — an error
    if ``budget`` limits tokens, since the driver could not keep to it."""
    if tokens is not None:
        return int(tokens)
    if full is not None:
        return int(full)
    if budget.max_tokens is not None:
        raise SparseAllocError("a token budget needs the number of fitness tokens an evaluation on all of them "
                               "scores; give the driver its top fidelity")
    return 0


def tokens_of(candidates: Iterable, full: int | None) -> int:
    """The fitness tokens a batch of candidates scores: each one's ``tokens``, ``full`` for None (0 when
    that is unknown as well)."""
    return sum(int(c.tokens) if c.tokens is not None else int(full or 0) for c in candidates)


def driver_allowance(total: float | None, spent: float, share: float, shares_left: float) -> float | None:
    """One driver's part of a search-wide budget (evaluations, tokens or seconds) when drivers run in turn.

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
