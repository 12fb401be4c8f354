"""Budgets: every driver stops cleanly at its evaluation, forward-token or wall-clock limit.

A driver plans with its :class:`Budget` (``room``, ``fits``, ``exhausted``) and evaluates through a
:class:`Charged` pool, the one place where evaluations are charged: every candidate asked for costs
one evaluation and its tokens, also when the results table answers it (a resumed run stops where
the uninterrupted one would).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import SparseAllocError
from orchestrator.runtime import clock

if TYPE_CHECKING:
    from orchestrator.search.config import SearchConfig
    from orchestrator.search.settings import Settings, Tokens


@dataclass
class Budget:
    """At most ``max_evals`` evaluations, ``max_tokens`` fitness tokens scored and ``max_seconds`` of
    wall clock (None = unlimited).

    An evaluation's tokens are its candidate's fidelity (``Candidate.tokens``; all fitness tokens for
    None), so a 1024-token evaluation costs four times a 256-token one and the shares of drivers that
    score at different fidelities are comparable (:class:`Charged` charges them); the clock counts this
    invocation only.
    """

    max_evals: int | None = None
    max_seconds: float | None = None
    max_tokens: int | None = None
    used_evals: int = 0
    used_tokens: int = 0
    started: float = field(default_factory=lambda: clock.monotonic())

    def __post_init__(self) -> None:
        if self.max_evals is not None and self.max_evals < 1:
            raise SparseAllocError(f"the evaluation budget must be at least 1, got {self.max_evals}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise SparseAllocError(f"the time budget must be positive, got {self.max_seconds} s")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SparseAllocError(f"the token budget must be at least 1, got {self.max_tokens}")

    @property
    def elapsed(self) -> float:
        return clock.monotonic() - self.started

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


class Charged:
    """An evaluator pool (or any ``evaluate`` callable) whose every evaluation is charged to ``budget``.

    An evaluation costs its candidate's fidelity in tokens (``full_tokens``, all fitness tokens, for
    None) plus ``sequential_tokens`` for a ``kl-seq`` candidate (its sequential pass's calibration
    forwards). The seconds the pool spent waiting for lost nodes to be replaced (its ``stalled_s``) are
    not charged: the budget's clock is moved on by them. Everything else (``num_blocks``,
    ``block_weights``, ``call`` …) is the pool's."""

    def __init__(self, pool, budget: Budget, full_tokens: int | None = None, sequential_tokens: int = 0) -> None:
        self._pool = pool
        self.budget = budget
        self.full_tokens = full_tokens if full_tokens is not None else getattr(pool, "max_tokens", None)
        if self.full_tokens is not None and self.full_tokens < 1:
            raise SparseAllocError(f"full_tokens={self.full_tokens} must be a positive token count or None")
        self.sequential_tokens = sequential_tokens

    def cost(self, tokens: int | None, metric: str = "kl") -> int:
        """The tokens one evaluation at fidelity ``tokens`` with ``metric`` is charged."""
        extra = self.sequential_tokens if metric == "kl-seq" else 0
        return eval_tokens(tokens, self.full_tokens, self.budget) + extra

    def evaluate(self, candidates: list) -> list[float]:
        """The pool's fitnesses of ``candidates``, each charged before it is sent."""
        self.charge(candidates)
        evaluate = getattr(self._pool, "evaluate", self._pool)
        with self.unstalled():
            return list(evaluate(candidates))

    __call__ = evaluate

    def charge(self, candidates: list) -> None:
        """Charge ``candidates`` to the budget: one evaluation and its tokens each."""
        self.budget.charge(len(candidates), sum(self.cost(c.tokens, c.metric) for c in candidates))

    @contextmanager
    def unstalled(self):
        """Move the budget's clock on by the seconds the pool stalls inside the block."""
        stalled = getattr(self._pool, "stalled_s", 0.0)
        try:
            yield
        finally:
            self.budget.started += getattr(self._pool, "stalled_s", 0.0) - stalled

    def dispatch(self, per_actor: int | None = None) -> "ChargedDispatch":
        """The pool's streaming :class:`~orchestrator.runtime.pool.Dispatch`, every candidate added charged."""
        return ChargedDispatch(self, self._pool.dispatch(per_actor))

    def __getattr__(self, name: str):
        return getattr(self._pool, name)


class ChargedDispatch:
    """A pool's :class:`~orchestrator.runtime.pool.Dispatch` whose candidates are charged as they are added
    (also those the results table answers) and whose stalled seconds are not."""

    def __init__(self, charged: Charged, dispatch) -> None:
        self.charged, self._dispatch = charged, dispatch

    @property
    def busy(self) -> bool:
        return self._dispatch.busy

    def add(self, candidates: list) -> None:
        self.charged.charge(candidates)
        self._dispatch.add(candidates)

    def step(self, max_wait: float | None = None, wake: list = ()) -> None:
        with self.charged.unstalled():
            self._dispatch.step(max_wait, wake)

    def finish(self) -> None:
        with self.charged.unstalled():
            self._dispatch.finish()

    def cancel(self) -> None:
        self._dispatch.cancel()


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


def driver_budget(settings: "Settings", search_seconds: float | None, share: float, shares_left: float,
                  spent: tuple[int, int, float], already: float) -> Budget:
    """The next driver's budget: its share of the search's evaluations, fitness tokens and seconds, plus
    its part of what earlier drivers left (``spent``: evaluations, tokens, seconds; :func:`check_budgets`
    made sure a share holds at least one evaluation on all fitness tokens); its clock starts at the
    ``already`` seconds it used before a resume."""
    config = settings.config
    spent_evals, spent_tokens, spent_seconds = spent
    evals = driver_allowance(config.budget_evals, spent_evals, share, shares_left)
    tokens = driver_allowance(config.budget_tokens, spent_tokens, share, shares_left)
    seconds = driver_allowance(search_seconds, spent_seconds, share, shares_left)
    return Budget(max_evals=None if evals is None else int(evals + 1e-9),
                  max_seconds=None if seconds is None else max(seconds, 1e-3),
                  max_tokens=None if tokens is None else int(tokens + 1e-9),
                  started=clock.monotonic() - already)


def final_passes_estimate(settings: "Settings", tokens: "Tokens", seconds_per_token: float, actors: int) -> float:
    """Wall-clock estimate of the final stage from the measured cost of one fitness token: each
    finalist prunes on the calibration tokens (at its pruner's pass cost) and scores selection and test
    tokens, plus the dense test perplexity; the passes share the cores the actors used."""
    from pruning.pruners import get_pruner

    config = settings.config
    drivers = len(settings.drivers)
    passes = drivers if config.finalists is None else min(drivers, config.finalists + (config.method == "all"))
    passes += config.uniform_baseline
    cost = get_pruner(config.pruner).pass_cost
    scored = passes * (tokens.calibration.numel() * cost + tokens.selection.numel() + tokens.test.numel())
    scored += tokens.test.numel()
    return 1.25 * (seconds_per_token * scored / max(1, actors) + 10.0 * passes)


def search_seconds(settings: "Settings", setup_seconds: float, final_estimate: float) -> float | None:
    """Seconds the drivers may use in all: ``--budget-minutes``, and under ``--deadline-minutes`` what
    setup (spent) and the final stage (estimated) leave of the deadline."""
    config = settings.config
    limits = [] if config.budget_minutes is None else [config.budget_minutes * 60]
    if config.deadline_minutes is not None:
        left = config.deadline_minutes * 60 - setup_seconds - final_estimate
        if left <= 0:
            raise SparseAllocError(
                f"--deadline-minutes {config.deadline_minutes} leaves no time to search: setup took "
                f"{setup_seconds:.0f} s and the final passes are estimated at {final_estimate:.0f} s; "
                "raise the deadline, or lower --finalists, --calib-samples or --eval-windows")
        limits.append(left)
    return min(limits) if limits else None


def check_budgets(config: "SearchConfig", drivers: dict[str, float]) -> None:
    """Refuse, before any work, a budget below one evaluation on all fitness tokens for some driver of
    ``drivers`` (name -> share), naming the smallest that works (a driver can do nothing with less)."""
    smallest, fitness_tokens = min(drivers.values()), config.fitness_windows * config.fitness_seqlen
    needs = (("--budget-evals", config.budget_evals, math.ceil(1 / smallest - 1e-9), "evaluation"),
             ("--budget-tokens", config.budget_tokens, math.ceil(fitness_tokens / smallest - 1e-9),
              f"evaluation on the {fitness_tokens} fitness tokens"))
    for flag, value, least, what in needs:
        if value is not None and value < least:
            shares = ", ".join(f"{name} {share:.0%}" for name, share in drivers.items())
            raise SparseAllocError(f"{flag} {value} leaves some driver less than one {what} (shares: {shares}); "
                                   f"the smallest that works is {flag} {least}")
