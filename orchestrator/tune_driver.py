"""Ray Tune + Optuna over a family's hyper-parameters (ATP β, OWL λ/M, map strength, free vectors).

Trials build a profile from their config and call the shared evaluator actors (created by the
driver; handles passed in with ``tune.with_parameters``), report with ``ray.tune.report``, and
need only a token CPU share since the work happens in the actors. A run directory's Tune state
resumes with ``Tuner.restore``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from orchestrator.budget import Budget
from orchestrator.candidates import Candidate, DriverResult
from orchestrator.pool import EvaluatorPool
from orchestrator.progress import DriverProgress
from pruning.errors import SparseAllocError
from search_spaces.families import Space
from search_spaces.profile import Profile

log = logging.getLogger(__name__)
TRIAL_CPU = 0.01  # trials only wait on actor calls
DEFAULT_TRIALS = 20  # with neither an evaluation nor a time budget
TIME_BOUNDED_TRIALS = 100_000  # with a time budget only: Tune's time_budget_s ends the search
SAMPLERS = ("tpe", "cmaes")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's TPE, or CMA-ES (for many continuous keys, e.g. free vectors; Optuna samples spaces
    of one dimension or integer keys independently under CMA-ES)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise SparseAllocError(f"unknown Optuna sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def to_tune_space(space: Space) -> dict:
    """Our neutral search-space description → Tune domains (flat keys, one per parameter)."""
    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform, "int": tune.randint}
    out = {}
    for name, (kind, low, high) in space.items():
        if kind not in kinds:
            raise SparseAllocError(f"unknown search-space kind {kind!r} for {name}")
        out[name] = kinds[kind](low, high + 1) if kind == "int" else kinds[kind](low, high)
    return out


class _ProgressCallback(tune.Callback):
    """Feeds the driver's progress line as trials finish."""

    def __init__(self, bar: DriverProgress | None) -> None:
        self.bar = bar

    def __getstate__(self) -> dict:
        return {"bar": None}  # Tune pickles its run config for restore; the terminal line stays here

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.bar is not None:
            self.bar.budget.charge()
            self.bar.update(result.get("fitness"))


def _trial(config: dict, actors: list, build: Callable[[dict], Profile], tokens: int | None, driver: str) -> None:
    candidate = Candidate.of(build(config), tokens, driver, **config)
    outcome = ray.get(random.choice(actors).evaluate.remote([candidate]))[0]
    tune.report({"fitness": outcome["fitness"], "seconds": outcome["seconds"], "actor": outcome["actor"],
                 "node": outcome["node"]})


def run_tune(pool: EvaluatorPool, driver: str, space: Space, build: Callable[[dict], Profile], budget: Budget,
             run_dir: Path, tokens: int | None = None, seed: int = 0, max_concurrent: int | None = None,
             resume: bool = False, progress: bool = True, sampler: str = "tpe") -> DriverResult:
    """Optuna search (``sampler``: TPE or CMA-ES) over ``space``; every finished trial is a row of the
    results table."""
    remaining = budget.remaining_evals()
    if remaining is not None:
        num_samples = remaining
    else:
        num_samples = TIME_BOUNDED_TRIALS if budget.max_seconds is not None else DEFAULT_TRIALS
    if num_samples < 1 or budget.exhausted():
        raise SparseAllocError(f"no budget left for the {driver} Tune search")
    time_left = None if budget.max_seconds is None else max(1.0, budget.max_seconds - budget.elapsed)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, actors=pool.actors, build=build, tokens=tokens, driver=driver),
        {"cpu": TRIAL_CPU})
    bar = DriverProgress(driver, Budget(budget.max_evals, budget.max_seconds), progress)
    storage = (Path(run_dir) / "tune").resolve()
    experiment = storage / driver
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric="fitness", mode="min", sampler=make_sampler(sampler, seed)),
                num_samples=num_samples, time_budget_s=time_left,
                max_concurrent_trials=max_concurrent or len(pool.actors), reuse_actors=True),
            run_config=tune.RunConfig(name=driver, storage_path=str(storage), verbose=0,
                                      callbacks=[_ProgressCallback(bar)]),
        )
    grid = tuner.fit()
    bar.close()
    best_fitness, best_config, evaluations = float("inf"), None, 0
    for result in grid:
        if result.error or "fitness" not in (result.metrics or {}):
            continue
        config = {k: result.config[k] for k in space}
        candidate = Candidate.of(build(config), tokens, driver, **config)
        if pool.results.get(candidate.key) is None:
            pool.results.append({"driver": driver, "key": candidate.key, "params": config,
                                 "sparsities": list(candidate.sparsities), "nm": candidate.nm,
                                 "tokens": tokens or -1, "draw": 0, "metric": "kl",
                                 "fitness": result.metrics["fitness"], "seconds": result.metrics["seconds"],
                                 "node": result.metrics["node"], "actor": result.metrics["actor"]})
        budget.charge()
        evaluations += 1
        if result.metrics["fitness"] < best_fitness:
            best_fitness, best_config = result.metrics["fitness"], config
    if best_config is None:
        raise SparseAllocError(f"the {driver} Tune search finished no trial; see the Ray logs")
    return DriverResult(driver, build(best_config), best_fitness, evaluations, {"best_config": best_config})
