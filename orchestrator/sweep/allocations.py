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

from core.identity import write_json
from core.profile import Profile
from orchestrator.passes.finalists import driver_summary, finalists
from orchestrator.search.drivers.sensitivities import fisher_traces, outlier_ratios
from orchestrator.search.registry import DRIVERS
from orchestrator.search.run import run_drivers
from search_spaces import families

if TYPE_CHECKING:
    import torch

    from orchestrator.runtime.clock import RunClock
    from orchestrator.runtime.pool import EvaluatorPool
    from orchestrator.search.settings import Settings

Proposal = list[tuple[str, Profile]]


@dataclass(frozen=True)
class CellContext:
    """What a method gets for one cell: the model's pool, the cell's search settings (``config.out`` is
    the cell's directory), calibration windows, the top fidelity, the cell's clock, the model-wide
    sensitivity directory, the drivers' seconds allowance and the OWL settings."""

    pool: "EvaluatorPool"
    settings: "Settings"
    calibration: "torch.Tensor"
    top_tokens: int
    clock: "RunClock"
    sensitivity_dir: Path
    search_seconds: float | None
    atp_grid: int = 5
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    @property
    def sparsity(self) -> float:
        return self.settings.config.sparsity


@dataclass(frozen=True)
class Allocation:
    """A registered method: its proposer and whether it spends a search budget."""

    propose: Callable[[CellContext], Proposal]
    help: str
    searches: bool = False


def _uniform(context: CellContext) -> Proposal:
    return [("uniform", families.uniform(context.pool.num_blocks, context.sparsity))]


def _owl(context: CellContext) -> Proposal:
    ratios = outlier_ratios(context.pool, context.settings, context.calibration, context.sensitivity_dir,
                            context.owl_m)
    return [(f"M={context.owl_m:g},lambda={context.owl_lambda:g}",
             families.owl(ratios, context.sparsity, context.owl_lambda))]


def _atp_grid(context: CellContext) -> Proposal:
    n, target = context.pool.num_blocks, context.sparsity
    top = families.atp_beta_max(n, target)
    steps = max(1, context.atp_grid - 1)
    betas = [top * i / steps for i in range(context.atp_grid)] if context.atp_grid > 1 else [top / 2]
    return [(f"beta={beta:.4g}", families.atp(n, target, beta)) for beta in betas]


def _fisher_map(context: CellContext) -> Proposal:
    traces = fisher_traces(context.pool, context.settings, context.calibration, context.sensitivity_dir)
    return [("strength=1", families.sensitivity_map(traces, context.sparsity, 1.0,
                                                    context.pool.block_weights))]


def _drivers(context: CellContext, shares: dict[str, float]) -> dict:
    """Run the drivers in the cell's directory; their results also go to its ``summary.json`` (as a
    search run's ``drivers`` entry, read by the report)."""
    run_dir = Path(context.settings.config.out)
    results = run_drivers(context.pool, context.settings, shares, context.calibration, context.top_tokens,
                          context.clock, context.search_seconds, run_dir, context.sensitivity_dir)
    write_json(run_dir / "summary.json", {"drivers": driver_summary(results)})
    return results


def _shapley_map(context: CellContext) -> Proposal:
    result = _drivers(context, {"shapley": 1.0})["shapley"]
    values = result.details.get("values")
    if values is None:  # not one unit completed: the driver's uniform fallback
        return [("uniform (no Shapley estimate)", result.best)]
    return [("strength=1", families.sensitivity_map(values, context.sparsity, 1.0,
                                                    context.pool.block_weights))]


def _one_driver(name: str) -> Callable[[CellContext], Proposal]:
    def propose(context: CellContext) -> Proposal:
        return [(name, _drivers(context, {name: 1.0})[name].best)]

    return propose


def _all(context: CellContext) -> Proposal:
    results = _drivers(context, context.settings.drivers)  # the cell's method is "all"
    return [(name, results[name].best) for name in finalists(results, context.settings.config.finalists)]


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
