"""SV-NUP on the pool: Shapley values of blocks from coalition evaluations, mapped to a profile.

Anytime: the coalitions are evaluated in *units* that each complete a piece of the estimate (an
antithetic pair of block orders, or one window of the sliding-window plan), a few units per
``pool.evaluate`` call, for as long as the budget lasts (evaluations, tokens — every coalition costs
``tokens`` fitness tokens, all of them for None — and time). After every batch an estimate exists; when
the budget ends the completed units make the estimate (flagged ``partial``). Sampling stops early
enough to leave room for the few evaluations that pick the strength of the value → sparsity map.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from orchestrator.search.budget import Charged
from orchestrator.runtime.candidates import Candidate, DriverResult
from orchestrator.search.progress import DriverProgress
from core.errors import SparseAllocError
from scoring import shapley
from scoring.shapley import Coalition
from search_spaces import families

if TYPE_CHECKING:
    from orchestrator.search.drivers.context import DriverContext

log = logging.getLogger(__name__)

ESTIMATORS = ("permutation", "sliding")
MAX_PAIRS = 64  # antithetic pairs at most: beyond this the estimate barely moves, the budget goes to other drivers
WINDOW = 3  # adjacent blocks per window of the sliding estimator
STRENGTHS = (0.5, 1.0, 2.0)  # strengths of the value -> sparsity map tried at the end

# Called after every batch with the current values, their standard errors (None: sliding window) and
# the units (pairs or windows) completed so far.
OnEstimate = Callable[[np.ndarray, "np.ndarray | None", int], None]


def _coalition_candidate(coalition: Coalition, n: int, sparsity: float, tokens: int | None) -> Candidate:
    values = tuple(sparsity if block in coalition else 0.0 for block in range(n))
    return Candidate(values, None, tokens, "kl", "shapley", {"coalition": sorted(coalition)})


def _floats(array: np.ndarray | None) -> list[float | None] | None:
    """JSON-safe floats (NaN, e.g. the standard error of a single pair, as None)."""
    return None if array is None else [float(v) if math.isfinite(v) else None for v in np.asarray(array, float)]


class _Sampler:
    """Evaluates units (lists of coalitions) in batches, each coalition once, while the budget leaves
    room for them plus ``reserve`` evaluations; each evaluation is charged ``cost`` tokens."""

    def __init__(self, pool: Charged, target: float, tokens: int | None, reserve: int,
                 bar: DriverProgress, cost: int = 0) -> None:
        self.pool, self.budget, self.target, self.tokens, self.reserve, self.bar, self.cost = (
            pool, pool.budget, target, tokens, reserve, bar, cost)
        self.n = pool.num_blocks
        self.values: dict[Coalition, float] = {}  # every coalition requested, in request order
        self.seconds = 0.0  # wall clock of the batches, and the evaluations they requested (for the time check)
        self.timed = 0

    def new(self, units: Sequence[Sequence[Coalition]]) -> list[Coalition]:
        """The coalitions of ``units`` not requested yet, deduplicated, in order."""
        return [c for c in dict.fromkeys(c for unit in units for c in unit) if c not in self.values]

    def fits(self, count: int) -> bool:
        """Whether ``count`` more evaluations, then the reserve, fit in what is left of the budget:
        evaluations, tokens (``cost`` each) and seconds (projected from the batches so far)."""
        budget = self.budget
        if budget.exhausted():
            return False
        if not budget.fits(count + self.reserve, (count + self.reserve) * self.cost):
            return False
        if budget.max_seconds is not None and self.timed:
            projected = (count + self.reserve) * self.seconds / self.timed
            if budget.elapsed + projected > budget.max_seconds:
                return False
        return True

    def evaluate(self, coalitions: list[Coalition]) -> None:
        if not coalitions:
            return
        start = self.budget.elapsed
        fitness = self.pool.evaluate([_coalition_candidate(c, self.n, self.target, self.tokens)
                                      for c in coalitions])
        self.values.update(zip(coalitions, fitness))
        self.seconds += self.budget.elapsed - start
        self.timed += len(coalitions)
        self.bar.update()

    def run(self, units: list[list[Coalition]], per_batch: int, after_batch: Callable[[int], None]) -> int:
        """Evaluate the units in order, ``per_batch`` at a time (one at first: an estimate and a timing
        soonest), fewer at the end if only fewer fit; the number of units completed."""
        done = 0
        while done < len(units):
            take, needed = 0, []
            for k in range(1, min(1 if done == 0 else per_batch, len(units) - done) + 1):
                more = self.new(units[done : done + k])
                if not self.fits(len(more)):
                    break
                take, needed = k, more
            if take == 0:
                break
            self.evaluate(needed)
            done += take
            after_batch(done)
        return done


def run_shapley(pool: Charged, target: float, estimator: str = "permutation",
                window: int = WINDOW, strengths: tuple[float, ...] = STRENGTHS, tokens: int | None = None,
                seed: int = 0, chunk: int = 16, max_pairs: int = MAX_PAIRS, progress: bool = True,
                on_estimate: OnEstimate | None = None) -> DriverResult:
    """Shapley values of the blocks, anytime, then the strength of the value → sparsity map picked by
    fitness (``len(strengths)`` evaluations kept in reserve for it).

    ``estimator="permutation"`` (default): antithetic pairs (an order and its reverse, one stream
    per ``seed``) until the budget ends or ``max_pairs`` pairs are done; values are the mean
    marginal damages over the completed pairs, with standard errors. ``"sliding"``: the paper's
    windows of ``window`` adjacent blocks, one after another; with the plan cut short, blocks in no
    completed window get the mean of the others and are listed in ``details["incomplete"]``. About
    ``chunk`` coalitions go to the pool per call. Every evaluation is charged ``tokens`` tokens (None:
    all fitness tokens) to the pool's budget, and a batch is only sent when it and the reserve fit, so
    a token budget is never overshot. A resumed run (same seed, same results table)
    requests the same coalitions and the pool answers them from the table. Uniform only when not one
    unit could be completed (``details["note"]`` says so).
    """
    if estimator not in ESTIMATORS:
        raise SparseAllocError(f"unknown Shapley estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if max_pairs < 1:
        raise SparseAllocError(f"max_pairs={max_pairs} must be at least 1")
    n = pool.num_blocks
    budget = pool.budget
    cost = pool.cost(tokens)  # tokens per evaluation
    bar = DriverProgress("shapley", budget, progress)
    sampler = _Sampler(pool, target, tokens, len(strengths), bar, cost)
    history: list[dict] = []

    def record(phi: np.ndarray, stderr: np.ndarray | None, done: int) -> None:
        finite = None if stderr is None else stderr[np.isfinite(stderr)]
        widest = None if finite is None or not finite.size else float(finite.max())
        history.append({"evaluations": len(sampler.values), "units": done, "max_stderr": widest})
        log.info("shapley (%s): %d units, %d evaluations, largest standard error %s", estimator, done,
                 len(sampler.values), "n/a" if widest is None else f"{widest:.4g}")
        if on_estimate is not None:
            on_estimate(phi, stderr, done)

    if estimator == "permutation":
        plan = shapley.permutation_plan(n, 2 * max_pairs, seed)
        units = [plan.unit_coalitions(u) for u in range(plan.units)]
        per_batch = max(1, math.ceil(chunk / max(1, 2 * (n - 1))))  # a pair adds at most 2(n-1) coalitions

        def estimate(done: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
            phi, stderr = shapley.permutation_shapley(plan.head(done), sampler.values)
            return phi, stderr, {"permutations": 2 * done, "pairs": done, "max_pairs": max_pairs}
    else:
        window = min(window, n, shapley.MAX_EXACT_PLAYERS)
        units = [subsets for _, subsets in shapley.sliding_window_units(n, window)]
        per_batch = max(1, math.ceil(chunk / 2 ** (window - 1)))  # a later window adds 2**(w-1) coalitions

        def estimate(done: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
            raw, _ = shapley.sliding_window_partial(n, window, sampler.values)
            missing = np.isnan(raw)
            phi = np.where(missing, raw[~missing].mean(), raw)
            return phi, None, {"window": window, "windows": done, "windows_total": len(units),
                               "incomplete": [int(b) for b in np.flatnonzero(missing)]}

    done = sampler.run(units, per_batch, lambda d: record(*estimate(d)[:2], d))
    if done == 0:
        what = "one permutation pair" if estimator == "permutation" else "one window"
        return _uniform(pool, target, tokens, cost, bar, sampler, estimator,
                        f"the budget ran out before {what} was complete: uniform profile, no Shapley estimate")
    phi, stderr, counts = estimate(done)
    partial = done < len(units)
    if partial:
        log.info("shapley (%s): the budget ended after %d of %d units; the estimate uses the completed ones",
                 estimator, done, len(units))

    profiles = {s: families.sensitivity_map(list(phi), target, s, pool.block_weights) for s in strengths}
    scores = dict(zip(strengths, pool.evaluate([Candidate.of(p, tokens, "shapley", strength=s)
                                                for s, p in profiles.items()])))
    best = min(scores, key=scores.get)
    bar.update(scores[best])
    bar.close()
    return DriverResult("shapley", profiles[best], scores[best], len(sampler.values) + len(scores), {
        "estimator": estimator, "values": _floats(phi), "stderr": _floats(stderr), **counts,
        "evaluations": len(sampler.values), "partial": partial, "strength": best, "fitness_by_strength": scores,
        "history": history})


def _uniform(pool: Charged, target: float, tokens: int | None, cost: int, bar: DriverProgress,
             sampler: _Sampler, estimator: str, note: str) -> DriverResult:
    """Best so far when no unit was completed: the uniform profile (scored only if the budget still allows)."""
    log.warning("shapley: %s", note)
    uniform = families.uniform(pool.num_blocks, target)
    fitness, scored = float("inf"), 0
    if not pool.budget.exhausted() and pool.budget.fits(1, cost):
        fitness, scored = pool.evaluate([Candidate.of(uniform, tokens, "shapley")])[0], 1
    bar.close()
    return DriverResult("shapley", uniform, fitness, len(sampler.values) + scored, {
        "note": note, "estimator": estimator, "values": None, "stderr": None, "evaluations": len(sampler.values),
        "partial": True})


def coalition_tokens(pool: Charged, fidelities: Sequence[int], estimator: str, window: int = WINDOW,
                     reserve: int = len(STRENGTHS)) -> int:
    """Tokens per coalition: the top of ``fidelities``, unless the token budget cannot pay there for the
    coalitions that give every block a value (permutation: the first antithetic pair; sliding: the
    whole window plan) plus the ``reserve`` evaluations of the strengths. Then the largest fidelity
    at which they fit, or the smallest one: a complete estimate on fewer tokens per coalition beats a
    uniform profile or a few windows at the top fidelity."""
    ordered = sorted(int(f) for f in fidelities)
    left = pool.budget.remaining_tokens()
    if left is None:
        return ordered[-1]
    n = pool.num_blocks
    if estimator == "permutation":
        needed = len(shapley.permutation_plan(n, 2, 0).unit_coalitions(0))
    else:
        needed = shapley.sliding_window_cost(n, min(window, n, shapley.MAX_EXACT_PLAYERS))
    fitting = [f for f in ordered if (needed + reserve) * pool.cost(f) <= left]
    return fitting[-1] if fitting else ordered[0]


def run(context: "DriverContext") -> DriverResult:
    """The ``shapley`` driver: coalitions on the top fidelity of the stages (not the whole fitness pool):
    more permutations, not more tokens per coalition, is what narrows the values' errors. A token budget
    too small for a complete estimate there moves it to a lower fidelity (:func:`coalition_tokens`)."""
    config = context.settings.config
    fidelities = [min(context.top_tokens, int(f)) for f in config.fidelities]
    tokens = coalition_tokens(context.pool, fidelities, config.estimator)
    if tokens < max(fidelities):
        log.info("shapley: %d tokens per coalition, not %d: the budget's tokens pay for a complete %s estimate "
                 "only there", tokens, max(fidelities), config.estimator)
    return run_shapley(context.pool, config.sparsity, estimator=config.estimator, tokens=tokens, seed=config.seed,
                       progress=config.progress)
