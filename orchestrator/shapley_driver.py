"""SV-NUP on the pool: Shapley values of blocks from coalition evaluations, mapped to a profile."""

from __future__ import annotations

import logging
import numpy as np

from orchestrator.budget import Budget
from orchestrator.candidates import Candidate, DriverResult
from orchestrator.pool import EvaluatorPool
from orchestrator.progress import DriverProgress
from scoring import shapley
from search_spaces import families

log = logging.getLogger(__name__)


def _coalition_candidate(coalition: frozenset[int], n: int, sparsity: float, tokens: int | None) -> Candidate:
    values = tuple(sparsity if block in coalition else 0.0 for block in range(n))
    return Candidate(values, None, tokens, "kl", "shapley", {"coalition": sorted(coalition)})


def run_shapley(pool: EvaluatorPool, target: float, budget: Budget, estimator: str = "sliding", window: int = 3,
                strengths: tuple[float, ...] = (0.5, 1.0, 2.0), tokens: int | None = None, seed: int = 0,
                chunk: int = 16, progress: bool = True) -> DriverResult:
    """Shapley values (sliding window, or antithetic permutations when the budget is too small for
    the window plan), then the strength of the value → sparsity map picked by fitness."""
    n = pool.num_blocks
    bar = DriverProgress("shapley", budget, progress)
    reserve = len(strengths)
    plan = shapley.sliding_window_plan(n, window) if estimator == "sliding" else None
    remaining = budget.remaining_evals()
    if plan is not None and remaining is not None and len(plan) + reserve > remaining:
        log.warning("sliding-window Shapley needs %d evaluations, budget leaves %d: using permutation sampling",
                    len(plan), remaining)
        plan = None
    values: dict[frozenset[int], float] = {}

    def evaluate(coalitions: list[frozenset[int]]) -> bool:
        """Evaluate in chunks until done (True) or the budget runs out (False)."""
        for start in range(0, len(coalitions), chunk):
            if budget.exhausted():
                return False
            part = [c for c in coalitions[start : start + chunk] if c not in values]
            fitness = pool.evaluate([_coalition_candidate(c, n, target, tokens) for c in part])
            budget.charge(len(part))
            values.update(zip(part, fitness))
            bar.update()
        return True

    def fallback(note: str) -> DriverResult:
        """Best so far when no Shapley estimate could be completed: the uniform profile (scored only if
        the budget still allows)."""
        uniform = families.uniform(n, target)
        fitness = float("inf")
        if not budget.exhausted():
            fitness = pool.evaluate([Candidate.of(uniform, tokens, "shapley")])[0]
            budget.charge()
        bar.close()
        return DriverResult("shapley", uniform, fitness, len(values), {"note": note})

    if plan is not None:
        if not evaluate(plan):
            return fallback("the budget ran out before the sliding-window plan was complete")
        phi, stderr, used = shapley.sliding_window_shapley(n, window, values), None, f"sliding window w={window}"
    else:  # permutation pairs until the budget (keeping room for the strength choice) runs out
        pairs = 0
        while True:
            sampled = shapley.permutation_plan(n, 2 * (pairs + 1), seed)
            needed = [c for c in sampled.coalitions() if c not in values]
            left = budget.remaining_evals()
            if budget.exhausted() or (left is not None and len(needed) + reserve > left) or not evaluate(needed):
                break
            pairs += 1
        if pairs == 0:
            return fallback("the budget was too small for one permutation pair")
        phi, stderr = shapley.permutation_shapley(shapley.permutation_plan(n, 2 * pairs, seed), values)
        used = f"permutation sampling, {2 * pairs} orders"
    profiles = {s: families.sensitivity_map(list(phi), target, s, pool.block_weights) for s in strengths}
    scores = dict(zip(strengths, pool.evaluate([Candidate.of(p, tokens, "shapley", strength=s)
                                                for s, p in profiles.items()])))
    budget.charge(len(scores))
    best = min(scores, key=scores.get)
    bar.update(scores[best])
    bar.close()
    return DriverResult("shapley", profiles[best], scores[best], len(values) + len(scores), {
        "estimator": used, "values": [float(v) for v in np.asarray(phi)],
        "stderr": None if stderr is None else [float(v) for v in stderr], "strength": best,
        "fitness_by_strength": scores})
