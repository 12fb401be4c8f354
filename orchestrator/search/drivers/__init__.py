"""The search drivers, registered once: the CLI's ``--method`` choices, their help and the
``--method all`` plan (which drivers run, in which order, with which share of the budget) all come
from :data:`DRIVERS`. Each driver proposes profiles through the evaluator pool and returns its best.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from orchestrator.runtime.sensitivities import load_or_compute
from search_spaces import families

if TYPE_CHECKING:  # the registry itself is read by the CLI, which should not pay for Ray and torch
    import torch

    from orchestrator.search.budget import Budget
    from orchestrator.runtime.candidates import DriverResult
    from orchestrator.runtime.pool import EvaluatorPool
    from orchestrator.search.run import SearchConfig

OWL_M_CHOICES = (3, 4, 5, 6, 7, 8, 9, 10)


@dataclass(frozen=True)
class DriverContext:
    """What every driver gets: the pool, the search's settings, calibration windows, top fidelity."""

    pool: "EvaluatorPool"
    config: "SearchConfig"
    calibration: "torch.Tensor"
    top_tokens: int
    sensitivity_dir: Path | None = None  # where Fisher traces and OWL ratios are kept (default: the run dir)
    earlier_bests: tuple = ()  # the best profiles of the drivers that ran before this one (--method all)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def store_dir(self) -> Path:
        return self.sensitivity_dir or self.run_dir


@dataclass(frozen=True)
class Driver:
    """A registered driver: how it runs, what it is, and its share under ``--method all`` (None: not
    part of it). Registration order is the order ``--method all`` runs them in."""

    run: Callable[[DriverContext, "Budget"], "DriverResult"]
    help: str
    all_share: float | None = None


def _inputs_identity(context: DriverContext, windows: "torch.Tensor") -> dict:
    """What a stored Fisher trace or OWL ratio depends on (resume refuses a mismatch)."""
    from core.identity import package_version

    config = context.config
    return {"model": config.model, "data": config.data, "dtype": config.dtype, "device": config.device,
            "calibration": list(windows.shape), "calibration_sum": int(windows.sum()),
            "version": package_version()}


def fisher_traces(context: DriverContext) -> list[float]:
    """Fisher traces on half the calibration windows, computed once per run dir (kept for resume)."""
    windows = context.calibration[: max(1, context.calibration.shape[0] // 2)]
    return load_or_compute(context.store_dir, "fisher", _inputs_identity(context, windows),
                           lambda: context.pool.call("fisher_traces", windows))


def outlier_ratios(context: DriverContext, multiplier: int) -> list[float]:
    """OWL ratios for one M, counted by the actors while building their rank tables; kept in the run dir."""
    return load_or_compute(context.store_dir, f"owl-M{multiplier}", _inputs_identity(context, context.calibration),
                           lambda: context.pool.call("outlier_ratios", float(multiplier)))


def _shapley(context: DriverContext, budget: "Budget") -> "DriverResult":
    from orchestrator.search.drivers.shapley import run_shapley

    config = context.config
    # Coalitions on the top fidelity of the stages (not the whole fitness pool): more permutations, not
    # more tokens per coalition, is what narrows the values' errors.
    tokens = max(config.fidelities) if context.top_tokens is None else min(context.top_tokens, max(config.fidelities))
    return run_shapley(context.pool, config.sparsity, budget, estimator=config.estimator, tokens=tokens,
                       seed=config.seed, progress=config.progress)


def sequential_top_stage(config: "SearchConfig") -> bool:
    """Whether evolution ends with a kl-seq stage (``--top-fitness kl-seq``): sequential Wanda rank tables.
    Not with the SparseGPT level database, whose weights are the sequential pass's already."""
    from orchestrator.search.level_sources import resolve_level_source

    return (config.top_fitness == "kl-seq"
            and resolve_level_source(config.level_source, config.pruner, config.nm_m) == "wanda")


def _evolution(context: DriverContext, budget: "Budget") -> "DriverResult":
    from orchestrator.runtime.candidates import DriverResult
    from orchestrator.search.drivers.evolution import EvolutionConfig, run_evolution
    from orchestrator.search.level_sources import database_levels, resolve_level_source
    from orchestrator.runtime.progress import DriverProgress

    config, pool = context.config, context.pool
    n, target, weights = pool.num_blocks, config.sparsity, pool.block_weights
    fisher = fisher_traces(context)
    # MSP's Fisher-seeded population, plus uniform, ATP and what the drivers before it found (under
    # --method all: the Shapley driver's profile), so the search starts from the best known profiles.
    seeds = [families.sensitivity_map(fisher, target, 1.0, weights), families.uniform(n, target),
             families.atp(n, target, families.atp_beta_max(n, target) / 2), *context.earlier_bests]
    bar = DriverProgress("evolution", budget, config.progress)
    # Two parents, so that crossover takes part (MSP's EA). With --top-fitness kl-seq a last stage on all
    # fitness tokens scores two children per generation with the masks of a low-fidelity sequential pass (it
    # ranked closest to the real pass in bench/results/fidelity-cpu-4k.md); the parents keep their scores
    # there (every draw of all windows is the same) and the answer is the best of them. With kl the parents
    # are rescored on every top-stage minibatch and finally compared on all fitness tokens.
    fidelities = tuple(config.fidelities)
    database = resolve_level_source(config.level_source, config.pruner, config.nm_m) == "sparsegpt-db"
    sequential = sequential_top_stage(config)
    survivors = tuple([4] * (len(fidelities) - 1) + [2])
    if sequential and fidelities[-1] < context.top_tokens:  # two children join the two parents there
        fidelities += (context.top_tokens,)
        survivors = survivors[:-1] + (2, 2)
    result = run_evolution(
        pool.evaluate, seeds,
        EvolutionConfig(target=target, nm_m=config.nm_m, fidelities=fidelities, survivors=survivors,
                        levels=database_levels(target, config.db_levels) if database else None,
                        seed=config.seed, weights=weights, final_tokens=context.top_tokens,
                        all_tokens=context.top_tokens, top_metric="kl-seq" if sequential else "kl",
                        sequential_tokens=2 * config.sequential_windows * config.seqlen if sequential else 0),
        budget, on_generation=lambda _g, best, _e: bar.update(best))
    bar.close()
    return DriverResult("evolution", result.best, result.fitness, result.evaluations,
                        {"generations": result.generations, "history": result.history, "fisher": fisher})


def _tune(name: str, space_of: Callable[[DriverContext], tuple[dict, Callable]], sampler: bool = False):
    """A Tune/Optuna driver over the space and profile builder ``space_of(context)`` returns."""

    def run(context: DriverContext, budget: "Budget") -> "DriverResult":
        from orchestrator.search.drivers.tune import run_tune

        config = context.config
        space, build = space_of(context)
        extra = {"sampler": config.free_sampler} if sampler else {}
        return run_tune(context.pool, name, space, build, budget, context.run_dir, context.top_tokens, config.seed,
                        resume=config.resume, progress=config.progress, **extra)

    return run


def _atp_space(context: DriverContext):
    n, target = context.pool.num_blocks, context.config.sparsity
    return families.atp_space(n, target), lambda c: families.atp(n, target, c["beta"])


def _owl_space(context: DriverContext):
    ratios = {m: outlier_ratios(context, m) for m in OWL_M_CHOICES}
    target = context.config.sparsity
    space = {"lam": ("uniform", 0.0, 0.2), "M": ("int", OWL_M_CHOICES[0], OWL_M_CHOICES[-1])}
    return space, lambda c: families.owl(ratios[int(c["M"])], target, c["lam"])


def _fisher_space(context: DriverContext):
    fisher, target, weights = fisher_traces(context), context.config.sparsity, context.pool.block_weights
    return families.sensitivity_space(), lambda c: families.sensitivity_map(fisher, target, c["strength"], weights)


def _free_space(context: DriverContext):
    n, target, weights = context.pool.num_blocks, context.config.sparsity, context.pool.block_weights
    keys = families.free_keys(n)
    lo, hi = max(0.0, target - 0.25), min(0.99, target + 0.25)
    return families.free_space(n, lo, hi), lambda c: families.free_vector([c[k] for k in keys], target, weights,
                                                                            lo, hi)


DRIVERS: dict[str, Driver] = {
    "shapley": Driver(_shapley, "Shapley values of blocks (SV-NUP), mapped to a profile", 0.3),
    "evolution": Driver(_evolution, "MSP: Fisher-seeded evolutionary search over per-block levels", 0.4),
    "tune-free": Driver(_tune("tune-free", _free_space, sampler=True),
                        "Optuna (TPE or CMA-ES) over a free per-block vector", 0.15),
    "tune-atp": Driver(_tune("tune-atp", _atp_space), "Optuna over ATP's common difference beta", 0.15),
    "tune-owl": Driver(_tune("tune-owl", _owl_space), "Optuna over OWL's lambda and M"),
    "tune-fisher": Driver(_tune("tune-fisher", _fisher_space), "Optuna over the Fisher map's strength"),
}


def all_shares() -> dict[str, float]:
    """``--method all``: the drivers that take part, in order, with their shares of the budget."""
    return {name: driver.all_share for name, driver in DRIVERS.items() if driver.all_share is not None}
