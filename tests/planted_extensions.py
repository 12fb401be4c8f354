"""A driver, a pruner and a level source as a user would add them: each in its own code, registered by
one line in its registry (``register``), nothing else of the project edited. Imported by the test in
the driver process and, through Ray's ``worker_process_setup_hook``, in every worker."""

from __future__ import annotations

import torch

from orchestrator.runtime.candidates import Candidate, DriverResult
from orchestrator.search.drivers.context import DriverContext
from pruning.masks import layer_mask
from search_spaces import families

LEVELS_USED = "planted-levels-used"  # a file the level source touches in the calls' directory


def run(context: DriverContext) -> DriverResult:
    """The planted driver: uniform against two ATP slopes, each on all fitness tokens."""
    n, target = context.pool.num_blocks, context.settings.config.sparsity
    top = families.atp_beta_max(n, target)
    profiles = [families.uniform(n, target), families.atp(n, target, top / 2), families.atp(n, target, top)]
    fitness = context.pool.evaluate([Candidate.of(p, context.top_tokens, "planted") for p in profiles])
    best = min(range(len(profiles)), key=fitness.__getitem__)
    return DriverResult("planted", profiles[best], fitness[best], len(profiles))


class MagnitudeLevels:
    """The planted level source: each linear's smallest weights (|W| across the matrix) zeroed."""

    supports_nm = False
    sequential = False

    def __init__(self, artifact: str | None = None) -> None:
        self.artifact = artifact

    def snap(self, sparsity: float) -> float:
        return sparsity

    def weight(self, block: int, name: str, level, dense: torch.Tensor, table, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(dense).masked_fill_(layer_mask(dense.abs().float(), level[0]), 0)


def _prepare(model, calibration, target, levels, dtype, device, batch_size, progress) -> str:
    return f"magnitude levels for {model}"


def _prune(layer: torch.nn.Linear, _stats, sparsity: float, nm) -> None:
    layer.weight.data[layer_mask(layer.weight.data.abs().float(), sparsity)] = 0


def register() -> None:
    """The three registrations (one entry per registry)."""
    from orchestrator.search.registry import DRIVERS, Driver
    from pruning.pruners import PRUNERS, Pruner
    from scoring.level_sources import LEVEL_SOURCES, LevelSourceKind

    DRIVERS["planted"] = Driver(f"{__name__}:run", "a planted driver: uniform against ATP")
    PRUNERS["planted"] = Pruner("planted", None, _prune, pass_cost=0.1, stats_bytes=lambda columns: 0,
                                level_source="planted-levels")
    LEVEL_SOURCES["planted-levels"] = LevelSourceKind("a planted level source: magnitude masks", MagnitudeLevels,
                                                      _prepare)
