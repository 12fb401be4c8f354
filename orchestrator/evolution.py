"""MSP evolutionary search: a pruning-oriented EA over per-block sparsity levels (in the style of EvoPress).

A profile is a vector of per-block *level indices* on a sorted grid ``levels`` (default: the 1 % grid
0.00 … 0.99; with ``nm_m`` the mixed N:M menu {0, 1/m, …, (m-1)/m}, where 0 means dense and every other
level n/m carries the pattern (n, m)).

Mutation is mean-preserving: a child is its parent after 1..``max_swaps`` moves, each taking one block one
level up and another block one level down. On an evenly spaced grid with equal block weights the sum of
the indices — hence the mean sparsity — never changes. With unequal ``weights`` (parameter counts) or an
uneven custom grid a move can shift the weighted mean, so a move is accepted only if the child's weighted
mean stays within one level (the grid's largest gap) of the target; rejected moves are redrawn a few
times and then skipped.

Each generation uses multi-fidelity selection: ``offspring`` children are scored on ``fidelities[0]``
tokens, the best ``survivors[0]`` are rescored on ``fidelities[1]`` tokens, and so on. At the last stage
the children compete with the current parents' (cached) top-fidelity scores and the best
``survivors[-1]`` become the new parents — elitist, so the best top-fidelity fitness never gets worse.
With ``fresh_tokens`` (the default) the lower stages of generation g are scored on the g-th slice of the
fitness windows (``Candidate.draw``), so each generation's cheap selection sees tokens the previous one
did not (EvoPress samples fresh calibration data per generation); the top stage always uses the same
tokens, so parents and children stay comparable there.
Every stage is one call to ``evaluate`` (one batch, evaluated in parallel by the caller).

Generation 0 is the initial population: the seed profiles snapped onto the grid (``round_to_levels``,
mean kept as close to the target as the grid allows) plus mutants of them, up to ``offspring`` in all; it
goes through the same stages. ``max_generations`` counts generation 0.

Children are distinct from each other, from the parents and (after generation 0) from every profile
already scored, so no evaluation is spent twice on one profile at one fidelity; a non-finite fitness
counts as +inf. This module imports no ray: the caller's ``evaluate`` does the
fan-out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from orchestrator.budget import Budget
from orchestrator.candidates import Candidate, EvaluateBatch
from pruning.errors import SparseAllocError
from search_spaces.algebra import level_grid, nm_levels, round_to_levels
from search_spaces.profile import Profile

DRIVER = "evolution"
_MOVE_TRIES = 20  # redraws of one move whose weighted mean would leave the tolerance band
_CHILD_TRIES = 10  # attempts per child at producing a profile not seen in this generation

OnGeneration = Callable[[int, float, int], None]


@dataclass
class EvolutionConfig:
    """Settings of ``run_evolution``; ``survivors[i]`` profiles survive stage i (scored on ``fidelities[i]``
    tokens), and ``survivors[-1]`` is the number of parents."""

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
        return grid


@dataclass
class EvolutionResult:
    """The best profile by top-fidelity fitness; ``history[g]`` is the best after generation g.

    ``generations`` counts completed generations (generation 0, the initial population, included);
    ``evaluations`` the evaluations this run charged. If the budget ran out before any profile reached
    the top fidelity, ``best`` is the best at the highest stage reached (``fitness`` that stage's score),
    or the first seed with fitness +inf when nothing was scored.
    """

    best: Profile
    fitness: float
    generations: int
    evaluations: int
    history: list[float] = field(default_factory=list)


def mutate(
    levels_idx: np.ndarray,
    num_levels: int,
    rng: np.random.Generator,
    max_swaps: int,
    accept: Callable[[np.ndarray], bool] | None = None,
) -> np.ndarray:
    """A child of ``levels_idx`` after 1..``max_swaps`` (uniform) moves; the input is not changed.

    A move raises a random block (below the top level) one level and lowers another random block (above
    level 0) one level, so the sum of indices is kept. With ``accept``, a move whose result it rejects is
    redrawn (up to a few times) and otherwise skipped. Returns an unchanged copy when no move is possible
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


def run_evolution(
    evaluate: EvaluateBatch,
    seeds: Sequence[Profile],
    config: EvolutionConfig,
    budget: Budget,
    on_generation: OnGeneration | None = None,
) -> EvolutionResult:
    """Evolve per-block sparsity profiles at mean ``config.target``; lower fitness is better.

    Stops after ``config.max_generations`` generations, when the budget is exhausted (checked before every
    stage; a stage larger than the remaining evaluations is trimmed to fit), or when no new child can be
    produced. ``on_generation(generation, best_fitness, evaluations)`` is called after every completed
    generation, ``evaluations`` being those charged by this run so far.
    """
    grid = config.grid()
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
    even = bool(np.allclose(gaps, gaps[0], rtol=0, atol=1e-12))
    tolerance = float(gaps.max()) + 1e-12

    def mean_ok(idx: np.ndarray) -> bool:
        return abs(float((w * grid[idx]).sum() / w.sum()) - config.target) <= tolerance

    accept = None if (even and np.all(w == w[0])) else mean_ok

    def make_profile(idx: tuple[int, ...]) -> Profile:
        sparsities = tuple(float(grid[k]) for k in idx)
        if config.nm_m is None:
            return Profile(sparsities)
        m = config.nm_m
        return Profile(sparsities, tuple(None if k == 0 else (int(k), m) for k in idx))

    # Seeds onto the grid (for N:M, grid index k is the pattern k:m).
    snapped: list[tuple[int, ...]] = []
    for seed in seeds:
        values = round_to_levels(seed.sparsities, grid.tolist(), config.target, weights)
        idx = tuple(int(np.argmin(np.abs(grid - v))) for v in values)
        if idx not in snapped:
            snapped.append(idx)

    scores: list[dict[tuple[int, ...], float]] = [{} for _ in config.fidelities]
    evaluations = 0
    top = len(config.fidelities) - 1

    def score_stage(stage: int, generation: int, pool: list[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
        """Score ``pool`` (in order of preference) at one stage; None when the budget stopped it first."""
        nonlocal evaluations
        if budget.exhausted():
            return None
        cache = scores[stage]
        fresh = [idx for idx in pool if idx not in cache]
        remaining = budget.remaining_evals()
        if remaining is not None and len(fresh) > remaining:
            kept = set(fresh[:remaining])
            fresh = fresh[:remaining]
            pool = [idx for idx in pool if idx in cache or idx in kept]
        if fresh:
            batch = [
                Candidate.of(make_profile(idx), tokens=int(config.fidelities[stage]), driver=DRIVER,
                             draw=generation if config.fresh_tokens and stage < top else 0,
                             generation=generation, stage=stage)
                for idx in fresh
            ]
            budget.charge(len(batch))
            evaluations += len(batch)
            fitness = list(evaluate(batch))
            if len(fitness) != len(batch):
                raise SparseAllocError(
                    f"the evaluator returned {len(fitness)} fitnesses for {len(batch)} candidates"
                )
            for idx, value in zip(fresh, fitness):
                value = float(value)
                cache[idx] = value if math.isfinite(value) else math.inf
        return pool

    def ranked(stage: int, pool: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        order = sorted(range(len(pool)), key=lambda k: (scores[stage][pool[k]], k))  # stable on ties
        return [pool[k] for k in order]

    def children_of(parents: list[tuple[int, ...]], count: int, taken: set) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for _ in range(count * _CHILD_TRIES):
            if len(out) >= count:
                break
            parent = parents[int(rng.integers(len(parents)))]
            child = tuple(int(k) for k in mutate(np.asarray(parent), grid.size, rng, config.max_swaps, accept))
            if child not in taken:
                taken.add(child)
                out.append(child)
        return out

    parents: list[tuple[int, ...]] = []
    history: list[float] = []
    best_partial: tuple[int, tuple[int, ...]] | None = None  # (stage, profile) when no top score exists yet

    for generation in range(config.max_generations):
        if generation == 0:
            pool = list(snapped)
            pool += children_of(snapped, config.offspring - len(pool), set(pool))
        else:
            pool = children_of(parents, config.offspring, set(parents) | scores[0].keys())
            if not pool:
                break  # nothing new can be reached from the parents
        stopped = False
        for stage in range(len(config.fidelities)):
            scored = score_stage(stage, generation, pool)
            if scored is None:
                stopped = True
                break
            pool = ranked(stage, scored)
            if stage < top:
                if pool and not parents and (best_partial is None or stage >= best_partial[0]):
                    best_partial = (stage, pool[0])
                pool = pool[: config.survivors[stage]]
        if stopped or not pool:
            break
        contenders = pool + [p for p in parents if p not in pool]
        parents = ranked(top, contenders)[: config.survivors[-1]]
        history.append(scores[top][parents[0]])
        if on_generation is not None:
            on_generation(generation, history[-1], evaluations)
        if budget.exhausted():
            break

    if parents:
        best, fitness = parents[0], scores[top][parents[0]]
    elif best_partial is not None:
        best, fitness = best_partial[1], scores[best_partial[0]][best_partial[1]]
    else:
        best, fitness = snapped[0], math.inf
    return EvolutionResult(make_profile(best), fitness, len(history), evaluations, history)


__all__ = ["EvolutionConfig", "EvolutionResult", "mutate", "run_evolution"]
