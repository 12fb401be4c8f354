"""What every driver gets: the charged pool, the search's settings, calibration windows, the top
fidelity, where sensitivities are kept and the best profiles of the drivers that ran before it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.search.budget import Budget, Charged
from orchestrator.search.settings import Settings


@dataclass(frozen=True)
class DriverContext:
    """A driver's view of the run. ``pool`` charges every evaluation to the driver's budget."""

    pool: Charged
    settings: Settings
    calibration: torch.Tensor
    top_tokens: int
    sensitivities: Path  # where Fisher traces and OWL ratios are kept (a run dir, or a sweep's model dir)
    earlier_bests: tuple = ()  # the best profiles of the drivers that ran before this one (--method all)

    @property
    def budget(self) -> Budget:
        return self.pool.budget
