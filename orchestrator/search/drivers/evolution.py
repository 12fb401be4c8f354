"""MSP evolutionary search: a pruning-oriented EA over per-block sparsity levels (in the style of EvoPress).

A profile is a vector of per-block *level indices* on a sorted grid ``levels`` (default: the 1 % grid
0.00 … 0.99; with ``nm_m`` the mixed N:M menu {0, 1/m, …, (m-1)/m}, where 0 means dense and every other
level n/m carries the pattern (n, m)).

Variation is budget-preserving (the parameter-weighted mean sparsity stays at the target):

* **Mutation**: a child is its parent after 1..``max_swaps`` moves, each taking one block one level up and
  another block one level down. On an evenly spaced grid with equal block weights the sum of the indices —
  hence the mean sparsity — never changes. With unequal ``weights`` (parameter counts) or an uneven custom
  grid a move can shift the weighted mean, so a move is accepted only if the child's weighted mean stays
  within one level (the grid's largest gap) of the target; rejected moves are redrawn a few times and then
  skipped.
* **Crossover** (with probability ``crossover_rate`` when there are at least two parents, else mutation
  alone): the child takes contiguous segments alternately from two parents (1..``crossover_points`` cut
  points), then :func:`repair` moves single blocks one level at a time, all in the direction of the goal
  mean and never past it (plus at most one last move across it when that lands closer), preferring blocks
  that stay between the two parents' levels. The result keeps every level on the grid, has exactly the
  parents' index sum with equal weights on an even grid, and is otherwise within one level of the target
  (usually much closer). The repaired child is then mutated like any other.

Each generation uses multi-fidelity selection: ``offspring`` children are scored on ``fidelities[0]``
tokens, the best ``survivors[0]`` are rescored on ``fidelities[1]`` tokens, and so on; at the last stage
the best ``survivors[-1]`` of children and parents become the new parents. Every stage is one call to
``evaluate`` (one batch, evaluated in parallel by the caller).

With ``fresh_tokens`` (the default; EvoPress-style selection) every stage of every generation is scored on
a fresh random minibatch of the fitness windows: ``Candidate.draw`` is a new positive number per
(generation, stage), derived from ``seed`` and never reused in a run, and the current parents are scored
again at the last stage on the same minibatch as the children, so selection compares like with like and a
long search cannot fit one fixed set of tokens. ``history`` then holds minibatch scores (not monotone). At
the end the final parents are scored once on draw 0 with ``final_tokens`` tokens (None: all fitness
windows) and the best of them is the answer — elitist in that unbiased score; evaluations for this are
reserved in an evaluation or token budget (and spent even when the clock has run out: one batch of at most
``survivors[-1]`` profiles). A stage on all fitness windows (``all_tokens``) is the exception: every draw
would be the same windows, so it uses draw 0 and the parents keep their scores there; when it is the
last stage at the final choice's fidelity, the best parent by those scores is the answer, with no
rescoring and no reserve. With ``fresh_tokens=False`` every stage uses the same first tokens (draw 0)
and parents keep their cached top-fidelity score: the best top-fidelity fitness never gets worse, and
no final rescoring is done (the ablation baseline).

The last stage and the final choice use ``top_metric`` (``kl-seq``: each profile's masks from a
low-fidelity sequential pass for it); the other stages use ``kl``.

Generation 0 is the initial population: the seed profiles snapped onto the grid (``round_to_levels``,
mean kept as close to the target as the grid allows) plus children of them (crossover between seeds when
there are several), up to ``offspring`` in all; it goes through the same stages. ``max_generations``
counts generation 0.

Budgets count evaluations and tokens: ``evaluate`` (a :class:`Charged` pool) charges each evaluation its
cost (its fidelity in tokens, all fitness tokens for None, plus the calibration forwards of a ``kl-seq``
evaluation), and a stage is trimmed before it is sent so that it fits in both, after the final choice's
reserve: a token budget is never overshot.

Children are distinct from each other, from the parents and (after generation 0) from every profile
already scored, so no evaluation is spent twice on one profile at one fidelity and draw; a non-finite
fitness counts as +inf. This module imports no ray: the caller's ``evaluate`` does the fan-out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from orchestrator.search.budget import Charged
from orchestrator.runtime.candidates import Candidate, DriverResult
from core.errors import SparseAllocError
from search_spaces.algebra import MAX_SPARSITY, level_grid, nm_levels, round_to_levels
from core.profile import Profile

if TYPE_CHECKING:
    from orchestrator.search.drivers.context import DriverContext

DRIVER = "evolution"
_MOVE_TRIES = 20  # redraws of one move whose weighted mean would leave the tolerance band
_CHILD_TRIES = 10  # attempts per child at producing a profile not seen in this generation
_EPS = 1e-12

OnGeneration = Callable[[int, float, int], None]


@dataclass
class EvolutionConfig:
    """Settings of ``run_evolution``; ``survivors[i]`` profiles survive stage i (scored on ``fidelities[i]``
    tokens), and ``survivors[-1]`` is the number of parents. ``crossover_rate``: the probability that a
    child comes from crossover of two parents (then mutation) rather than mutation alone; it only applies
    with at least two parents. ``crossover_points``: at most this many cut points per crossover.
    ``final_tokens``: the fidelity of the final choice among the parents under ``fresh_tokens`` (None =
    all fitness windows). ``top_metric``: the fitness of the last stage and of the final choice
    (``kl-seq``: masks of a low-fidelity sequential pass per profile). A stage whose fidelity covers all
    fitness tokens (the evaluator's ``full_tokens``) uses draw 0 even with ``fresh_tokens`` (every draw
    would hold the same windows), so parents keep its scores; when it is also the final choice's fidelity,
    the final choice is the best parent by those scores (no rescoring)."""

    target: float
    levels: list[float] | None = None
    nm_m: int | None = None
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    fidelities: tuple[int, ...] = (2048, 16384)
    max_swaps: int = 3
    max_generations: int = 1000
    seed: int = 0
    weights: list[float] | None = None
    fresh_tokens: bool = True
    crossover_rate: float = 0.5
    crossover_points: int = 2
    final_tokens: int | None = None
    top_metric: str = "kl"
    granularity: str = "block"

    def grid(self) -> np.ndarray:
        """The sorted level grid, after validating the config."""
        if self.levels is not None and self.nm_m is not None:
            raise SparseAllocError("give either explicit levels or an N:M group size nm_m, not both")
        if self.nm_m is not None:
            grid = np.asarray([0.0, *nm_levels(self.nm_m)])
        elif self.levels is not None:
            grid = np.unique(np.asarray(self.levels, dtype=float))
        else:
            grid = np.asarray(level_grid(0.01))
        if grid.size < 2 or not np.all(np.isfinite(grid)) or grid[0] < 0 or grid[-1] >= 1:
            raise SparseAllocError("the level grid needs at least two distinct finite levels in [0, 1)")
        if not (math.isfinite(self.target) and grid[0] <= self.target <= grid[-1]):
            raise SparseAllocError(
                f"target sparsity {self.target} is outside the level range [{grid[0]}, {grid[-1]}]"
            )
        if self.offspring < 1:
            raise SparseAllocError(f"offspring={self.offspring} must be at least 1")
        if self.top_metric not in ("kl", "kl-seq", "ppl"):
            raise SparseAllocError(f"top_metric {self.top_metric!r} must be kl, kl-seq or ppl")
        if len(self.survivors) != len(self.fidelities) or not self.fidelities:
            raise SparseAllocError(
                f"survivors {tuple(self.survivors)} and fidelities {tuple(self.fidelities)} need one entry per "
                "selection stage (the same non-zero length)"
            )
        if any(int(n) < 1 for n in self.survivors):
            raise SparseAllocError(f"every survivor count must be at least 1, got {tuple(self.survivors)}")
        if self.survivors[0] > self.offspring or any(
            b > a for a, b in zip(self.survivors, self.survivors[1:])
        ):
            raise SparseAllocError(
                f"survivors {tuple(self.survivors)} must be non-increasing and at most offspring={self.offspring}"
            )
        if any(int(f) < 1 for f in self.fidelities) or any(
            b <= a for a, b in zip(self.fidelities, self.fidelities[1:])
        ):
            raise SparseAllocError(
                f"fidelities {tuple(self.fidelities)} must be positive token counts, strictly increasing"
            )
        if self.max_swaps < 1:
            raise SparseAllocError(f"max_swaps={self.max_swaps} must be at least 1")
        if self.max_generations < 1:
            raise SparseAllocError(f"max_generations={self.max_generations} must be at least 1")
        if not (math.isfinite(self.crossover_rate) and 0.0 <= self.crossover_rate <= 1.0):
            raise SparseAllocError(f"crossover_rate={self.crossover_rate} must be a probability in [0, 1]")
        if self.crossover_points < 1:
            raise SparseAllocError(f"crossover_points={self.crossover_points} must be at least 1")
        if self.final_tokens is not None and self.final_tokens < 1:
            raise SparseAllocError(f"final_tokens={self.final_tokens} must be a positive token count or None")
        return grid


@dataclass
class EvolutionResult:
    """The best profile and its fitness; ``history[g]`` is the best parent's score after generation g.

    With ``fresh_tokens`` the fitness is the final parents' best score on draw 0 at ``final_tokens`` and
    ``history`` holds each generation's minibatch scores; without, both are top-fidelity scores.
    ``generations`` counts completed generations (generation 0, the initial population, included);
    ``evaluations`` the evaluations this run charged, ``tokens`` their fitness tokens. If the budget ran
    out before any profile reached the top fidelity, ``best`` is the best at the highest stage reached
    (``fitness`` that stage's score), or the first seed with fitness +inf when nothing was scored.
    """

    best: Profile
    fitness: float
    generations: int
    evaluations: int
    history: list[float] = field(default_factory=list)
    tokens: int = 0


def unit_lattice(target: float, weights: Sequence[float], step: float = 0.01, hi: float = MAX_SPARSITY) -> np.ndarray:
    """Per-unit level grids for units of unequal size: unit u's levels are ``target + j * step_u`` within
    [0, ``hi``], with ``step_u = step * mean(weights) / weights[u]``, so one level of any unit moves the
    weighted mean by the same amount (``step / units``) and moves that keep the index sum keep the mean
    exactly. Row u holds unit u's levels in ascending order, padded with NaN."""
    w = np.asarray(weights, dtype=float)
    steps = step * w.mean() / w
    below = np.floor(target / steps + 1e-9).astype(np.int64)
    above = np.floor((hi - target) / steps + 1e-9).astype(np.int64)
    table = np.full((w.size, int((below + above).max()) + 1), np.nan)
    for unit in range(w.size):
        table[unit, : below[unit] + above[unit] + 1] = target + np.arange(-below[unit], above[unit] + 1) * steps[unit]
    return table


def _as_table(grid: np.ndarray, units: int) -> np.ndarray:
    """A level table of ``units`` rows: ``grid`` itself when it is per unit (2-D), else one row per unit."""
    grid = np.asarray(grid, dtype=float)
    return grid if grid.ndim == 2 else np.broadcast_to(grid, (units, grid.size))


def _values(table: np.ndarray, levels_idx: np.ndarray) -> np.ndarray:
    return table[np.arange(table.shape[0]), levels_idx]


def weighted_mean(levels_idx: np.ndarray, grid: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The (parameter-)weighted mean sparsity of a level-index vector on ``grid`` (one grid for all units,
    or a per-unit table as :func:`unit_lattice` makes)."""
    levels_idx = np.asarray(levels_idx, dtype=np.int64)
    values = _values(_as_table(grid, levels_idx.size), levels_idx)
    if weights is None:
        return float(values.mean())
    w = np.asarray(weights, dtype=float)
    return float((w * values).sum() / w.sum())


def mutate(
    levels_idx: np.ndarray,
    num_levels: int | np.ndarray,
    rng: np.random.Generator,
    max_swaps: int,
    accept: Callable[[np.ndarray], bool] | None = None,
) -> np.ndarray:
    """A child of ``levels_idx`` after 1..``max_swaps`` (uniform) moves; the input is not changed.

    A move raises a random block (below the top level) one level and lowers another random block (above
    level 0) one level, so the sum of indices is kept. ``num_levels``: the grid's size, or each unit's. With
    ``accept``, a move whose result it rejects is redrawn (up to a few times) and otherwise skipped. Returns an unchanged copy when no move is possible
    (one block, or every block at the same grid end).
    """
    child = np.array(levels_idx, dtype=np.int64, copy=True)
    if child.ndim != 1:
        raise SparseAllocError("level indices must be a flat vector, one per block")
    moves = int(rng.integers(1, max_swaps + 1))
    for _ in range(moves):
        for _ in range(_MOVE_TRIES if accept is not None else 1):
            up = np.flatnonzero(child < num_levels - 1)
            down = np.flatnonzero(child > 0)
            if down.size == 1:
                up = up[up != down[0]]  # a block cannot go up and down in the same move
            if up.size == 0 or down.size == 0:
                return child
            i = int(up[rng.integers(up.size)])
            others = down[down != i]
            j = int(others[rng.integers(others.size)])
            child[i] += 1
            child[j] -= 1
            if accept is None or accept(child):
                break
            child[i] -= 1
            child[j] += 1
    return child


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, max_points: int = 2) -> np.ndarray:
    """A child of parents ``a`` and ``b`` made of contiguous segments taken alternately from each.

    1..``max_points`` cut points (uniform, distinct, between blocks) and a random first parent; with one
    block the child is a copy of a random parent. Not repaired: its mean can be off (see :func:`repair`).
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.ndim != 1 or a.shape != b.shape:
        raise SparseAllocError("crossover needs two flat level-index vectors of the same length")
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    n = a.size
    if n < 2:
        return first.copy()
    count = int(rng.integers(1, min(max_points, n - 1) + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), size=count, replace=False))
    segment = np.searchsorted(cuts, np.arange(n), side="right")  # 0 before the first cut, 1 after, ...
    return np.where(segment % 2 == 0, first, second)


def repair(
    levels_idx: np.ndarray,
    grid: np.ndarray,
    goal: float,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
    between: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Move blocks one level at a time until the weighted mean is as close to ``goal`` as single moves
    towards it get; the input is not changed.

    Every move goes in the goal's direction and never past it (a random block among those whose move
    fits, preferring, with ``between = (a, b)``, blocks that stay within [min(a, b), max(a, b)]); when no
    move fits, at most one last move crosses the goal if that lands closer. So all moves go one way, every
    level stays on the grid, and the result's mean is within one grid step × the largest block share of
    ``goal`` (``goal`` must lie in [grid[0], grid[-1]]); with equal weights on an even grid and a goal
    reachable on it (e.g. the parents' mean), the result has exactly the goal's index sum. ``grid`` may be a
    per-unit table (:func:`unit_lattice`), where every move changes the mean by the same amount.
    """
    child = np.array(levels_idx, dtype=np.int64, copy=True)
    if child.ndim != 1 or child.size == 0:
        raise SparseAllocError("repair needs a flat vector of level indices on the grid")
    table = _as_table(grid, child.size)
    sizes = (~np.isnan(table)).sum(axis=1)
    if child.min() < 0 or np.any(child >= sizes):
        raise SparseAllocError("repair needs a flat vector of level indices on the grid")
    low, high = float(np.nanmin(table)), float(np.nanmax(table))
    if not low - _EPS <= goal <= high + _EPS:
        raise SparseAllocError(f"goal mean {goal} is outside the level range [{low}, {high}]")
    rows = np.arange(child.size)
    w = np.ones(child.size) if weights is None else np.asarray(weights, dtype=float)
    share = w / w.sum()
    lo = hi = None
    if between is not None:
        lo = np.minimum(between[0], between[1])
        hi = np.maximum(between[0], between[1])
    gap = float(share @ _values(table, child)) - goal
    while abs(gap) > _EPS:
        step = -1 if gap > 0 else 1
        moved = child + step
        movable = (moved >= 0) & (moved < sizes)
        delta = np.zeros(child.size)
        delta[movable] = share[movable] * (table[rows[movable], moved[movable]] - table[rows[movable], child[movable]])
        fits = movable & (np.abs(delta) <= abs(gap) + _EPS)
        if not fits.any():
            closer = movable & (np.abs(gap + delta) < abs(gap) - _EPS)
            if closer.any():
                i = int(np.argmin(np.where(closer, np.abs(gap + delta), np.inf)))
                child[i] = moved[i]
            break
        choice = fits
        if lo is not None:
            inside = fits & (moved >= lo) & (moved <= hi)
            if inside.any():
                choice = inside
        options = np.flatnonzero(choice)
        i = int(options[rng.integers(options.size)])
        child[i] = moved[i]
        gap = float(share @ _values(table, child)) - goal
    return child


def run_evolution(
    evaluate: Charged,
    seeds: Sequence[Profile],
    config: EvolutionConfig,
    on_generation: OnGeneration | None = None,
) -> EvolutionResult:
    """Evolve per-block sparsity profiles at mean ``config.target``; lower fitness is better.

    Stops after ``config.max_generations`` generations, when the budget is exhausted (checked before every
    stage; a stage larger than the remaining evaluations or tokens is trimmed to fit, keeping back with
    ``fresh_tokens`` the evaluations and tokens the final choice needs), or when no new child can be
    produced.
    ``on_generation(generation, best_fitness, evaluations)`` is called after every completed generation,
    ``evaluations`` being those charged by this run so far. ``evaluate`` charges every evaluation to its
    budget, which the stages are planned against.
    """
    grid = config.grid()
    budget = evaluate.budget
    all_tokens = evaluate.full_tokens
    rng = np.random.default_rng(config.seed)
    if not seeds:
        raise SparseAllocError("the evolutionary search needs at least one seed profile (e.g. uniform)")
    num_blocks = len(seeds[0])
    for seed in seeds:
        if len(seed) != num_blocks:
            raise SparseAllocError(
                f"seed profiles have different block counts ({len(seed)} vs {num_blocks}); give one per block"
            )
    weights = None if config.weights is None else [float(w) for w in config.weights]
    if weights is not None and (
        len(weights) != num_blocks or not all(math.isfinite(w) and w > 0 for w in weights)
    ):
        raise SparseAllocError(
            f"weights need one finite positive entry per block ({num_blocks} blocks, got {len(weights)})"
        )
    w = np.ones(num_blocks) if weights is None else np.asarray(weights)
    gaps = np.diff(grid)
    # Units of unequal size at a finer granularity than blocks, on the default grid: per-unit levels whose
    # steps all move the mean alike, so level switches keep it exactly.
    lattice = (config.granularity != "block" and config.levels is None and config.nm_m is None
               and not bool(np.all(w == w[0])))
    table = unit_lattice(config.target, w) if lattice else _as_table(grid, num_blocks)
    sizes = (~np.isnan(table)).sum(axis=1)
    exact = lattice or (bool(np.allclose(gaps, gaps[0], rtol=0, atol=1e-12)) and bool(np.all(w == w[0])))
    tolerance = float(gaps.max()) + 1e-12

    def mean_ok(idx: np.ndarray) -> bool:
        return abs(weighted_mean(idx, table, w) - config.target) <= tolerance

    accept = None if exact else mean_ok

    def make_profile(idx: tuple[int, ...]) -> Profile:
        sparsities = tuple(float(v) for v in _values(table, np.asarray(idx)))
        if config.nm_m is None:
            return Profile(sparsities, granularity=config.granularity)
        m = config.nm_m
        return Profile(sparsities, tuple(None if k == 0 else (int(k), m) for k in idx), config.granularity)

    # Seeds onto the grid (for N:M, grid index k is the pattern k:m); on a lattice, each unit to its nearest
    # level, then single moves to the target mean (reached exactly: every move shifts the mean alike).
    snapped: list[tuple[int, ...]] = []
    for seed in seeds:
        if lattice:
            nearest = np.nanargmin(np.abs(table - np.asarray(seed.sparsities)[:, None]), axis=1)
            idx = tuple(int(k) for k in repair(nearest, table, config.target, rng, w))
        else:
            values = round_to_levels(seed.sparsities, grid.tolist(), config.target, weights)
            idx = tuple(int(np.argmin(np.abs(grid - v))) for v in values)
        if idx not in snapped:
            snapped.append(idx)
    # Crossover repairs towards the seeds' grid mean when it is exact (index sums kept), else the target.
    goal = config.target if lattice else weighted_mean(np.asarray(snapped[0]), grid) if exact else config.target

    stages = len(config.fidelities)
    top = stages - 1
    fresh_mode = config.fresh_tokens
    # A last stage on all fitness windows at the final choice's fidelity already ranks the parents on the
    # final choice's tokens: no final rescoring then.
    final_from_top = (fresh_mode and all_tokens is not None and config.final_tokens is not None
                      and int(config.fidelities[top]) == config.final_tokens >= all_tokens)
    final_choice = fresh_mode and not final_from_top
    reserve = config.survivors[-1] if final_choice else 0  # evaluations kept back for the final choice
    # Tokens of one final-choice evaluation (only fresh mode asks for None tokens, i.e. all windows).
    final_cost = evaluate.cost(config.final_tokens, config.top_metric) if final_choice else 0
    draw_base = 1 + int(np.random.default_rng([config.seed, 0x5EED]).integers(0, 2**31)) * 2**20

    def covers_all(stage: int) -> bool:
        return all_tokens is not None and int(config.fidelities[stage]) >= all_tokens

    def draw_of(generation: int, stage: int) -> int:
        """A positive minibatch number per (generation, stage), never the same twice in one run (0 for a
        stage on all fitness windows, where every draw is the same)."""
        return draw_base + generation * stages + stage if fresh_mode and not covers_all(stage) else 0

    def metric_of(stage) -> str:
        return config.top_metric if stage in (top, "final") else "kl"

    scores: dict[tuple[int, int], dict[tuple[int, ...], float]] = {}  # (stage, draw) -> profile -> fitness
    evaluations = tokens_used = 0

    def score(pool: list[tuple[int, ...]], tokens: int | None, draw: int, params: dict) -> dict:
        """Score the profiles of ``pool`` not yet known at (``params['stage']``, ``draw``) in one batch."""
        nonlocal evaluations, tokens_used
        cache = scores.setdefault((params["stage"], draw), {})
        fresh = [idx for idx in pool if idx not in cache]
        if fresh:
            batch = [Candidate.of(make_profile(idx), tokens=tokens, driver=DRIVER, draw=draw,
                                  metric=metric_of(params["stage"]), **params) for idx in fresh]
            before = budget.used_tokens
            fitness = evaluate(batch)
            evaluations += len(batch)
            tokens_used += budget.used_tokens - before
            if len(fitness) != len(batch):
                raise SparseAllocError(
                    f"the evaluator returned {len(fitness)} fitnesses for {len(batch)} candidates"
                )
            for idx, value in zip(fresh, fitness):
                value = float(value)
                cache[idx] = value if math.isfinite(value) else math.inf
        return cache

    def score_stage(stage: int, generation: int, pool: list[tuple[int, ...]],
                    parents: list[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
        """Score ``pool`` (in order of preference) at one stage; None when the budget stopped it first.

        With fresh tokens the top stage also scores the ``parents`` (listed first) on the same draw; it
        is skipped unless all of them and at least one child fit next to the final choice's reserve."""
        if budget.exhausted():
            return None
        draw = draw_of(generation, stage)
        cache = scores.get((stage, draw), {})
        if fresh_mode and stage == top:
            pool = list(parents) + [idx for idx in pool if idx not in parents]
        keep = fresh_mode and bool(parents or stage == top)  # the final choice's reserve
        each = evaluate.cost(int(config.fidelities[stage]), metric_of(stage))
        remaining = budget.room(each, reserve if keep else 0, reserve * final_cost if keep else 0)
        if remaining is not None:
            fresh = [idx for idx in pool if idx not in cache]
            if fresh_mode and stage == top and remaining < sum(p not in cache for p in parents) + 1:
                return None
            if len(fresh) > remaining:
                if remaining <= 0:
                    return None
                kept = set(fresh[:remaining])
                pool = [idx for idx in pool if idx in cache or idx in kept]
        score(pool, int(config.fidelities[stage]), draw, {"generation": generation, "stage": stage})
        return pool

    def ranked(cache: dict, pool: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        order = sorted(range(len(pool)), key=lambda k: (cache[pool[k]], k))  # stable on ties
        return [pool[k] for k in order]

    def child_of(parents: list[tuple[int, ...]]) -> tuple[int, ...]:
        if len(parents) >= 2 and rng.random() < config.crossover_rate:
            i, j = rng.choice(len(parents), size=2, replace=False)
            a, b = np.asarray(parents[int(i)]), np.asarray(parents[int(j)])
            base = repair(crossover(a, b, rng, config.crossover_points), table, goal, rng, w, (a, b))
        else:
            base = np.asarray(parents[int(rng.integers(len(parents)))])
        return tuple(int(k) for k in mutate(base, sizes, rng, config.max_swaps, accept))

    def children_of(parents: list[tuple[int, ...]], count: int, taken: set) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for _ in range(count * _CHILD_TRIES):
            if len(out) >= count:
                break
            child = child_of(parents)
            if child not in taken:
                taken.add(child)
                out.append(child)
        return out

    parents: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()  # every profile scored at stage 0
    history: list[float] = []
    best_partial: tuple[float, int, tuple[int, ...]] | None = None  # (score, stage, profile) before any parents
    generation = 0

    for generation in range(config.max_generations):
        if generation == 0:
            pool = list(snapped)
            pool += children_of(snapped, config.offspring - len(pool), set(pool))
        else:
            pool = children_of(parents, config.offspring, set(parents) | seen)
            if not pool:
                break  # nothing new can be reached from the parents
        stopped = False
        for stage in range(stages):
            scored = score_stage(stage, generation, pool, parents)
            if scored is None:
                stopped = True
                break
            cache = scores[(stage, draw_of(generation, stage))]
            if stage == 0:
                seen.update(scored)
            pool = ranked(cache, scored)
            if stage < top:
                if pool and not parents and (best_partial is None or stage >= best_partial[1]):
                    best_partial = (cache[pool[0]], stage, pool[0])
                pool = pool[: config.survivors[stage]]
        if stopped or not pool:
            break
        if not fresh_mode:  # parents compete with their cached top-fidelity scores
            pool = ranked(cache, pool + [p for p in parents if p not in pool])
        parents = pool[: config.survivors[-1]]
        history.append(cache[parents[0]])
        if on_generation is not None:
            on_generation(generation, history[-1], evaluations)
        if budget.exhausted():
            break

    if parents and final_choice:
        # The answer: the best final parent on draw 0 (unbiased, ``final_tokens``), evaluations permitting.
        remaining = budget.room(final_cost)
        final = parents if remaining is None else parents[:remaining]
        if final:
            cache = score(final, config.final_tokens, 0, {"generation": generation, "stage": "final"})
            best = ranked(cache, final)[0]
            return EvolutionResult(make_profile(best), cache[best], len(history), evaluations, history,
                                   tokens_used)
    if parents:
        best, fitness = parents[0], history[-1]
    elif best_partial is not None:
        fitness, _, best = best_partial
    else:
        best, fitness = snapped[0], math.inf
    return EvolutionResult(make_profile(best), fitness, len(history), evaluations, history, tokens_used)


def run(context: "DriverContext") -> DriverResult:
    """The ``evolution`` driver (MSP's EA): the population starts from the Fisher map, uniform, ATP and what
    the drivers before it found (under ``--method all``: the Shapley driver's profile), so the search
    starts from the best known profiles; at ``--granularity group`` or ``linear`` it evolves one level per
    unit, from those block profiles lifted to the units (on per-unit grids that keep the mean exactly). Two parents, so that crossover takes part. With a kl-seq top
    stage (``--top-fitness kl-seq`` on rank tables) a last stage on all fitness tokens scores two
    children per generation with the masks of a low-fidelity sequential pass (it ranked closest to the
    real pass in bench/results/fidelity-cpu-4k.md); the parents keep their scores there (every draw of
    all windows is the same) and the answer is the best of them. With kl the parents are rescored on
    every top-stage minibatch and finally compared on all fitness tokens."""
    from orchestrator.search.progress import DriverProgress
    from orchestrator.search.drivers.sensitivities import fisher_traces
    from scoring.level_sources import LEVEL_SOURCES
    from search_spaces import families

    settings, pool = context.settings, context.pool
    config = settings.config
    n, target, weights = pool.num_blocks, config.sparsity, pool.block_weights
    fisher = fisher_traces(pool, settings, context.calibration, context.sensitivities)
    seeds = [families.sensitivity_map(fisher, target, 1.0, weights), families.uniform(n, target),
             families.atp(n, target, families.atp_beta_max(n, target) / 2), *context.earlier_bests]
    seeds = [context.at_granularity(seed) for seed in seeds]  # block seeds give each unit their block's level
    bar = DriverProgress("evolution", context.budget, config.progress)
    fidelities = tuple(config.fidelities)
    sequential = settings.sequential_top
    survivors = tuple([4] * (len(fidelities) - 1) + [2])
    if sequential and fidelities[-1] < context.top_tokens:  # two children join the two parents there
        fidelities += (context.top_tokens,)
        survivors = survivors[:-1] + (2, 2)
    result = run_evolution(
        pool, seeds,
        EvolutionConfig(target=target, nm_m=config.nm_m, fidelities=fidelities, survivors=survivors,
                        levels=LEVEL_SOURCES[settings.level_source].grid(target, config.db_levels),
                        seed=config.seed, weights=context.unit_weights(), final_tokens=context.top_tokens,
                        top_metric="kl-seq" if sequential else "kl", granularity=context.granularity),
        on_generation=lambda _g, best, _e: bar.update(best))
    bar.close()
    return DriverResult("evolution", result.best, result.fitness, result.evaluations,
                        {"generations": result.generations, "history": result.history, "fisher": fisher})


__all__ = ["EvolutionConfig", "EvolutionResult", "crossover", "mutate", "repair", "run", "run_evolution",
           "weighted_mean"]
