"""Shapley values of transformer blocks (SV-NUP): exact, permutation sampling, sliding window.

Players are blocks ``0..n-1``; a coalition is the ``frozenset`` of blocks that are pruned (all
others stay dense) and its value is a damage (lower is better), ``v(∅)`` being the dense model.
Each estimator is split into a *plan* (the distinct coalitions it needs, in a deterministic
order, so that the expensive evaluations can be spread over workers) and a *combine* step that
turns a ``{coalition: value}`` mapping into the estimates. :func:`estimate` does both at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from core.errors import SparseAllocError

Coalition = frozenset[int]
Values = Mapping[Coalition, float]

MAX_EXACT_PLAYERS = 12


def _check_players(n: int) -> None:
    if n < 1:
        raise SparseAllocError(f"need at least one block, got n={n}")


def _value(values: Values, coalition: Coalition) -> float:
    try:
        return float(values[coalition])
    except KeyError:
        raise SparseAllocError(
            f"no value for coalition {sorted(coalition)}: evaluate every coalition of the plan"
        ) from None


def _subsets(players: Sequence[int]) -> list[Coalition]:
    """All subsets of ``players``, by size then lexicographically."""
    return [frozenset(c) for size in range(len(players) + 1) for c in combinations(players, size)]


def _dedup(coalitions: Iterable[Coalition]) -> list[Coalition]:
    return list(dict.fromkeys(coalitions))


def _exact_over(players: Sequence[int], values: Values) -> np.ndarray:
    """Exact Shapley values of ``players`` in the game restricted to subsets of ``players``."""
    k = len(players)
    weights = [math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)]
    phi = np.zeros(k)
    for index, player in enumerate(players):
        others = [p for p in players if p != player]
        for subset in _subsets(others):
            phi[index] += weights[len(subset)] * (_value(values, subset | {player}) - _value(values, subset))
    return phi


def exact_plan(n: int) -> list[Coalition]:
    """All ``2**n`` coalitions of ``n`` blocks (``n`` at most 12)."""
    _check_players(n)
    if n > MAX_EXACT_PLAYERS:
        raise SparseAllocError(
            f"exact Shapley needs 2**{n} = {2**n} evaluations; for n > {MAX_EXACT_PLAYERS} "
            "use permutation sampling or the sliding window"
        )
    return _subsets(range(n))


def exact_shapley(n: int, values: Values) -> np.ndarray:
    """Exact Shapley values: ``φ_i = Σ_{S ∌ i} |S|!(n-|S|-1)!/n! · (v(S∪{i}) − v(S))``."""
    _check_players(n)
    return _exact_over(range(n), values)


@dataclass(frozen=True)
class PermutationPlan:
    """Sampled block orders; with ``antithetic`` each order is followed by its reverse."""

    n: int
    permutations: tuple[tuple[int, ...], ...]
    antithetic: bool

    def coalitions(self) -> list[Coalition]:
        """Every prefix of every permutation (empty and full set included), deduplicated."""
        return _dedup(c for p in self.permutations for c in prefix_coalitions(p))

    @property
    def units(self) -> int:
        """Independent sampling units: antithetic pairs, or single orders."""
        return len(self.permutations) // 2 if self.antithetic else len(self.permutations)

    def head(self, units: int) -> "PermutationPlan":
        """The first ``units`` units (pairs or orders): the plan a run stopped after them would have used.

        Orders are drawn one stream per seed, so ``permutation_plan(n, m, seed)`` is the head of
        ``permutation_plan(n, M, seed)`` for every ``m <= M``: an anytime run that stops early, and a
        resumed run, see the same orders.
        """
        if not 0 <= units <= self.units:
            raise SparseAllocError(f"the plan has {self.units} units, asked for the first {units}")
        per_unit = 2 if self.antithetic else 1
        return PermutationPlan(self.n, self.permutations[: per_unit * units], self.antithetic)

    def unit_coalitions(self, unit: int) -> list[Coalition]:
        """The coalitions one unit (an order and its reverse, or one order) needs: the prefixes of its orders."""
        per_unit = 2 if self.antithetic else 1
        orders = self.permutations[per_unit * unit : per_unit * (unit + 1)]
        return _dedup(c for order in orders for c in prefix_coalitions(order))


def prefix_coalitions(order: Sequence[int]) -> list[Coalition]:
    """The ``n + 1`` prefixes of a block order, from the empty set to the full set."""
    return [frozenset(order[:k]) for k in range(len(order) + 1)]


def permutation_plan(n: int, num_permutations: int, seed: int, antithetic: bool = True) -> PermutationPlan:
    """Sample ``num_permutations`` orders (counting both members of each antithetic pair)."""
    _check_players(n)
    if num_permutations < 1 or (antithetic and num_permutations % 2):
        pairs = " and even (antithetic pairs)" if antithetic else ""
        raise SparseAllocError(f"num_permutations={num_permutations} must be positive{pairs}")
    rng = np.random.default_rng(seed)
    permutations: list[tuple[int, ...]] = []
    while len(permutations) < num_permutations:
        order = tuple(int(i) for i in rng.permutation(n))
        permutations.extend([order, order[::-1]] if antithetic else [order])
    return PermutationPlan(n, tuple(permutations), antithetic)


def permutation_shapley(plan: PermutationPlan, values: Values) -> tuple[np.ndarray, np.ndarray]:
    """Mean marginal damage per block over the plan's orders, and its standard error.

    The standard error is taken over the independent units: antithetic pair averages, or single
    orders otherwise (NaN with a single unit). Each order's marginals sum to ``v(all) − v(∅)``, so
    the estimate is efficient exactly.
    """
    marginals = np.zeros((len(plan.permutations), plan.n))
    for row, order in enumerate(plan.permutations):
        previous = _value(values, frozenset())
        for k, block in enumerate(order):
            current = _value(values, frozenset(order[: k + 1]))
            marginals[row, block] = current - previous
            previous = current
    units = marginals.reshape(-1, 2, plan.n).mean(axis=1) if plan.antithetic else marginals
    if len(units) < 2:
        return units.mean(axis=0), np.full(plan.n, np.nan)
    return units.mean(axis=0), units.std(axis=0, ddof=1) / math.sqrt(len(units))


def _window_starts(n: int, window: int, stride: int) -> list[int]:
    largest = min(n, MAX_EXACT_PLAYERS)
    if not 1 <= window <= largest:
        raise SparseAllocError(f"window={window} must be between 1 and min(n, {MAX_EXACT_PLAYERS}) = {largest}")
    if not 1 <= stride <= window:
        raise SparseAllocError(f"stride={stride} must be between 1 and window={window} (a larger stride skips blocks)")
    return sorted(set(range(0, n - window + 1, stride)) | {n - window})


def sliding_window_plan(n: int, window: int, stride: int = 1) -> list[Coalition]:
    """All subsets of every window of ``window`` adjacent blocks, deduplicated across windows."""
    _check_players(n)
    starts = _window_starts(n, window, stride)
    return _dedup(c for s in starts for c in _subsets(range(s, s + window)))


def sliding_window_cost(n: int, window: int, stride: int = 1) -> int:
    """Distinct coalition evaluations of the sliding window.

    With stride 1 this is ``(n − w + 2) · 2**(w − 1)`` (the empty set plus every non-empty set of
    span at most ``w``); for any stride it is at most ``(⌈(n − w)/stride⌉ + 1) · 2**w``. Linear in
    ``n``, against ``2**n`` for the exact value (n=12, w=4: 80 against 4096).
    """
    return len(sliding_window_plan(n, window, stride))


def sliding_window_units(n: int, window: int, stride: int = 1) -> list[tuple[int, list[Coalition]]]:
    """The windows of the sliding-window plan, in plan order: ``(start, its 2**window subsets)``.

    Evaluating them in this order completes one window after another (the plan is their
    deduplicated concatenation), which is what an anytime run needs.
    """
    _check_players(n)
    return [(s, _subsets(range(s, s + window))) for s in _window_starts(n, window, stride)]


def sliding_window_shapley(n: int, window: int, values: Values, stride: int = 1) -> np.ndarray:
    """Per block, the exact Shapley value of the window games in which the block is most central.

    Centrality is the distance to the nearest window edge, where an edge at block 0 or ``n-1`` (the
    model boundary) does not count; ties are averaged. If interactions only couple blocks at most
    ``r`` apart and ``window >= 2r + 1``, the result equals the exact Shapley value.
    """
    _check_players(n)
    return _sliding_over(n, window, values, _window_starts(n, window, stride))


def sliding_window_partial(n: int, window: int, values: Values, stride: int = 1) -> tuple[np.ndarray, list[int]]:
    """The sliding-window estimate from the windows whose coalitions all have values (a plan cut short).

    Each block gets the value of the most central *completed* window holding it (so, once every
    window is complete, :func:`sliding_window_shapley`); blocks in no completed window get NaN. Also
    returns the starts of the completed windows.
    """
    _check_players(n)
    done = [s for s in _window_starts(n, window, stride)
            if all(c in values for c in _subsets(range(s, s + window)))]
    return _sliding_over(n, window, values, done), done


def _sliding_over(n: int, window: int, values: Values, starts: Sequence[int]) -> np.ndarray:
    best = np.full(n, -1.0)
    total = np.zeros(n)
    count = np.zeros(n)
    for s in starts:
        blocks = range(s, s + window)
        phi = _exact_over(blocks, values)
        for index, block in enumerate(blocks):
            left = block - s if s > 0 else math.inf
            right = s + window - 1 - block if s + window < n else math.inf
            centrality = min(left, right)
            if centrality > best[block]:
                best[block], total[block], count[block] = centrality, 0.0, 0
            if centrality == best[block]:
                total[block] += phi[index]
                count[block] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley estimates, their standard errors (sampling only) and the distinct evaluations used."""

    values: np.ndarray
    stderr: np.ndarray | None
    evaluations: int


def estimate(n: int, value_fn: Callable[[Coalition], float], method: str = "exact", **kwargs) -> ShapleyResult:
    """Plan, evaluate each distinct coalition once with ``value_fn``, and combine.

    ``method`` is ``"exact"``, ``"permutation"`` (kwargs of :func:`permutation_plan`) or
    ``"sliding"`` (``window`` and optional ``stride``).
    """
    if method == "exact":
        plan = exact_plan(n)
        values = {c: value_fn(c) for c in plan}
        return ShapleyResult(exact_shapley(n, values), None, len(values))
    if method == "permutation":
        sampled = permutation_plan(n, **kwargs)
        values = {c: value_fn(c) for c in sampled.coalitions()}
        phi, stderr = permutation_shapley(sampled, values)
        return ShapleyResult(phi, stderr, len(values))
    if method == "sliding":
        values = {c: value_fn(c) for c in sliding_window_plan(n, **kwargs)}
        return ShapleyResult(sliding_window_shapley(n, values=values, **kwargs), None, len(values))
    raise SparseAllocError(f"unknown Shapley method {method!r}: use 'exact', 'permutation' or 'sliding'")
