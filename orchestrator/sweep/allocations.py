"""Allocation methods a sweep compares, registered once: the baselines (uniform, OWL, the ATP grid,
the Shapley and Fisher maps), every search driver by its ``search --method`` name, and ``all``.

Each method proposes one or more candidate profiles for a cell (a model at one target); every
candidate then gets the real final pass, and the one with the lowest validation perplexity is the
method's pick (several candidates: the ATP grid's β values, the finalists of ``all``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from core.profile import Profile
from orchestrator.search.drivers import DRIVERS
from search_spaces import families

if TYPE_CHECKING:
    import torch

    from orchestrator.runtime.clock import RunClock
    from orchestrator.runtime.pool import EvaluatorPool
    from orchestrator.search.run import SearchConfig

Proposal = list[tuple[str, Profile]]


@dataclass(frozen=True)
class CellContext:
    """What a method gets for one cell: the model's pool, the cell's search settings (``config.out`` is
    the cell's directory), calibration windows, the top fidelity, the cell's clock, the model-wide
    sensitivity directory, the drivers' seconds allowance and the OWL settings."""

    pool: "EvaluatorPool"
    config: "SearchConfig"
    calibration: "torch.Tensor"
    top_tokens: int
    clock: "RunClock"
    sensitivity_dir: Path
    search_seconds: float | None
    atp_grid: int = 5
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    finalists: int = 2


@dataclass(frozen=True)
class Allocation:
    """A registered method: its proposer and whether it spends a search budget."""

    propose: Callable[[CellContext], Proposal]
    help: str
    searches: bool = False


def _uniform(context: CellContext) -> Proposal:
    return [("uniform", families.uniform(context.pool.num_blocks, context.config.sparsity))]


def _owl(context: CellContext) -> Proposal:
    from orchestrator.search.drivers import DriverContext, outlier_ratios

    driver_context = DriverContext(context.pool, context.config, context.calibration, context.top_tokens,
                                   context.sensitivity_dir)
    ratios = outlier_ratios(driver_context, context.owl_m)
    return [(f"M={context.owl_m:g},lambda={context.owl_lambda:g}",
             families.owl(ratios, context.config.sparsity, context.owl_lambda))]


def _atp_grid(context: CellContext) -> Proposal:
    n, target = context.pool.num_blocks, context.config.sparsity
    top = families.atp_beta_max(n, target)
    steps = max(1, context.atp_grid - 1)
    betas = [top * i / steps for i in range(context.atp_grid)] if context.atp_grid > 1 else [top / 2]
    return [(f"beta={beta:.4g}", families.atp(n, target, beta)) for beta in betas]


def _fisher_map(context: CellContext) -> Proposal:
    from orchestrator.search.drivers import DriverContext, fisher_traces

    traces = fisher_traces(DriverContext(context.pool, context.config, context.calibration, context.top_tokens,
                                         context.sensitivity_dir))
    return [("strength=1", families.sensitivity_map(traces, context.config.sparsity, 1.0,
                                                    context.pool.block_weights))]


def _drivers(context: CellContext, shares: dict[str, float]) -> dict:
    """Run the drivers in the cell's directory; their results also go to its ``summary.json`` (as a
    search run's ``drivers`` entry, read by the report)."""
    from orchestrator.passes.finalists import driver_summary
    from core.identity import write_json
    from orchestrator.search.run import run_drivers

    results = run_drivers(context.pool, context.config, shares, context.calibration, context.top_tokens,
                          context.clock, context.search_seconds, context.sensitivity_dir)
    write_json(Path(context.config.out) / "summary.json", {"drivers": driver_summary(results)})
    return results


def _shapley_map(context: CellContext) -> Proposal:
    result = _drivers(context, {"shapley": 1.0})["shapley"]
    values = result.details.get("values")
    if values is None:  # not one unit completed: the driver's uniform fallback
        return [("uniform (no Shapley estimate)", result.best)]
    return [("strength=1", families.sensitivity_map(values, context.config.sparsity, 1.0,
                                                    context.pool.block_weights))]


def _one_driver(name: str) -> Callable[[CellContext], Proposal]:
    def propose(context: CellContext) -> Proposal:
        return [(name, _drivers(context, {name: 1.0})[name].best)]

    return propose


def _all(context: CellContext) -> Proposal:
    from orchestrator.passes.finalists import finalists

    results = _drivers(context, context.config.drivers())  # the cell's config has method "all"
    return [(name, results[name].best) for name in finalists(results, context.finalists)]


ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation(_uniform, "every block at the target"),
    "owl": Allocation(_owl, "OWL outlier-weighted profile (owl_m, owl_lambda)"),
    "atp": Allocation(_atp_grid, "ATP grid of atp_grid slopes beta, the pick chosen on validation perplexity"),
    "fisher-map": Allocation(_fisher_map, "Fisher traces mapped to a profile (strength 1)"),
    "shapley-map": Allocation(_shapley_map, "Shapley values (search budget) mapped to a profile (strength 1)",
                              searches=True),
    **{name: Allocation(_one_driver(name), f"search driver: {driver.help}", searches=True)
       for name, driver in DRIVERS.items()},
    "all": Allocation(_all, "every driver of search --method all; the finalists get the final pass", searches=True),
}
