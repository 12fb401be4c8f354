"""Optuna over a family's hyper-parameters (ATP β, OWL λ/M, map strength, free vectors), ask/tell
from the search process, every trial evaluated through the shared evaluator pool.

Each round asks ``concurrency`` trials of one Optuna study (TPE, with ``constant_liar`` so trials
asked before earlier ones are told do not all land on the same point, or CMA-ES), builds their
profiles, sends them to ``EvaluatorPool.evaluate`` as one batch and tells the values back in ask
order. The pool does the rest, as it does for every other driver: least-loaded dispatch over the
actors (a round keeps all of them busy, each scoring its share as one population), known keys
answered from the results table, each new answer written to it as it arrives.

This replaced Ray Tune trials, which bypassed the pool: a trial picked an actor at random (two
trials often queued on one actor while another sat idle), never consulted the results table, and
its row was written only after ``Tuner.fit`` returned, so an interrupted search depended on Tune's
own snapshots. Now there is one pool for every driver, each evaluation happens exactly once, and
resume needs no state of its own: the seeded sampler, told the same values in the same order,
asks the same trials again, and the results table answers those already evaluated, so a resumed
run re-evaluates nothing and stops where the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from orchestrator.search.budget import Charged
from orchestrator.runtime.candidates import Candidate, DriverResult
from orchestrator.search.progress import DriverProgress
from core.errors import SparseAllocError
from search_spaces import families
from search_spaces.families import Space
from core.profile import Profile

if TYPE_CHECKING:
    from orchestrator.search.drivers.context import DriverContext

log = logging.getLogger(__name__)
DEFAULT_TRIALS = 20  # with no evaluation, token or time budget
SAMPLERS = ("tpe", "cmaes")
TRIALS_PER_ACTOR = 2  # trials in flight per actor in one round (the pool keeps two calls per actor)


def make_sampler(name: str, seed: int, in_flight: int = 1) -> optuna.samplers.BaseSampler:
    """Optuna's TPE (multivariate), or CMA-ES (for many continuous keys, e.g. free vectors; Optuna
    samples spaces of one dimension or integer keys independently under CMA-ES). With more than one
    trial ``in_flight`` (asked before the others are told) TPE uses the constant liar, so the trials
    of one round spread out instead of repeating one guess. Both are set explicitly: Optuna 5 makes
    them the default, Optuna 4 does not."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=in_flight > 1)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise SparseAllocError(f"unknown Optuna sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def to_distributions(space: Space) -> dict[str, BaseDistribution]:
    """Our neutral search-space description → Optuna distributions (flat keys, bounds inclusive)."""
    out: dict[str, BaseDistribution] = {}
    for name, (kind, low, high) in space.items():
        if kind == "uniform":
            out[name] = FloatDistribution(low, high)
        elif kind == "loguniform":
            out[name] = FloatDistribution(low, high, log=True)
        elif kind == "int":
            out[name] = IntDistribution(int(low), int(high))
        else:
            raise SparseAllocError(f"unknown search-space kind {kind!r} for {name}")
    return out


def run_tune(pool: Charged, driver: str, space: Space, build: Callable[[dict], Profile], tokens: int | None = None,
             seed: int = 0, max_concurrent: int | None = None, progress: bool = True,
             sampler: str = "tpe") -> DriverResult:
    """Optuna search (``sampler``: TPE or CMA-ES) over ``space``, ``max_concurrent`` trials per round
    (default: two per actor), each round one ``pool.evaluate`` batch; stops when the pool's budget is
    exhausted (every trial is charged, also those the results table answers) and returns the best.
    Every trial scores ``tokens`` fitness tokens (None: all of them); a round is cut to the trials that
    fit in the evaluation and token budgets, so neither is ever overshot. The driver keeps no state of
    its own: rerunning with the same seed against the same results table resumes.
    """
    budget = pool.budget
    cost = pool.cost(tokens)  # tokens per trial
    if budget.exhausted() or budget.room(cost) == 0:
        raise SparseAllocError(f"no budget left for the {driver} search")
    concurrency = max_concurrent if max_concurrent is not None else TRIALS_PER_ACTOR * len(pool.actors)
    if concurrency < 1:
        raise SparseAllocError(f"the {driver} search needs at least one trial per round, got {concurrency}")
    unlimited = budget.max_evals is None and budget.max_tokens is None and budget.max_seconds is None
    limit = DEFAULT_TRIALS if unlimited else None
    distributions = to_distributions(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line reports the trials
    study = optuna.create_study(direction="minimize", sampler=make_sampler(sampler, seed, concurrency))
    bar = DriverProgress(driver, budget, progress)
    best_fitness, best_config, trials, rounds = math.inf, None, 0, 0
    try:
        while not budget.exhausted() and (limit is None or trials < limit):
            size = concurrency
            for left in (budget.room(cost), None if limit is None else limit - trials):
                if left is not None:
                    size = min(size, left)
            if size < 1:
                break  # tokens are left, but fewer than one trial scores
            asked = [study.ask(distributions) for _ in range(size)]
            configs = [dict(trial.params) for trial in asked]
            batch = []
            for config in configs:
                profile = build(config)
                batch.append(Candidate(profile.sparsities, profile.nm, tokens, "kl", driver, config))
            fitness = pool.evaluate(batch)
            if len(fitness) != len(batch):
                raise SparseAllocError(f"the pool returned {len(fitness)} fitnesses for {len(batch)} candidates")
            trials += len(batch)
            rounds += 1
            for trial, config, value in zip(asked, configs, fitness):  # in ask order: same seed, same asks
                value = float(value) if math.isfinite(value) else math.inf
                study.tell(trial, value)
                if best_config is None or value < best_fitness:
                    best_fitness, best_config = value, config
            bar.update(best_fitness)
    finally:
        bar.close()
    if best_config is None:
        raise SparseAllocError(f"the {driver} search evaluated no trial")
    return DriverResult(driver, build(best_config), best_fitness, trials,
                        {"trials": trials, "rounds": rounds, "concurrency": concurrency, "sampler": sampler,
                         "best_config": best_config})


def _tune(context: "DriverContext", driver: str, space: Space, build: Callable[[dict], Profile],
          sampler: str = "tpe") -> DriverResult:
    config = context.settings.config
    return run_tune(context.pool, driver, space, build, context.top_tokens, config.seed, progress=config.progress,
                    sampler=sampler)


def run_atp(context: "DriverContext") -> DriverResult:
    """``tune-atp``: ATP's common difference β."""
    n, target = context.pool.num_blocks, context.settings.config.sparsity
    return _tune(context, "tune-atp", families.atp_space(n, target), lambda c: families.atp(n, target, c["beta"]))


def run_owl(context: "DriverContext") -> DriverResult:
    """``tune-owl``: OWL's λ and outlier multiplier M (the ratios of every M counted by the actors)."""
    from orchestrator.search.drivers.sensitivities import OWL_M_CHOICES, outlier_ratios

    settings, target = context.settings, context.settings.config.sparsity
    ratios = {m: outlier_ratios(context.pool, settings, context.calibration, context.sensitivities, m)
              for m in OWL_M_CHOICES}
    space = families.owl_space(OWL_M_CHOICES)
    return _tune(context, "tune-owl", space, lambda c: families.owl(ratios[int(c["M"])], target, c["lam"]))


def run_fisher(context: "DriverContext") -> DriverResult:
    """``tune-fisher``: the strength of the Fisher map."""
    from orchestrator.search.drivers.sensitivities import fisher_traces

    settings, pool = context.settings, context.pool
    fisher = fisher_traces(pool, settings, context.calibration, context.sensitivities)
    target, weights = settings.config.sparsity, pool.block_weights
    return _tune(context, "tune-fisher", families.sensitivity_space(),
                 lambda c: families.sensitivity_map(fisher, target, c["strength"], weights))


def run_free(context: "DriverContext") -> DriverResult:
    """``tune-free``: one key per block, projected onto the target mean and the bounds (TPE or CMA-ES)."""
    pool, config = context.pool, context.settings.config
    n, target, weights = pool.num_blocks, config.sparsity, pool.block_weights
    keys = families.free_keys(n)
    lo, hi = max(0.0, target - 0.25), min(0.99, target + 0.25)
    return _tune(context, "tune-free", families.free_space(n, lo, hi),
                 lambda c: families.free_vector([c[k] for k in keys], target, weights, lo, hi), config.free_sampler)
