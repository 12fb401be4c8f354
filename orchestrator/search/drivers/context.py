"""What every driver gets: the charged pool, the search's settings, calibration windows, the top
fidelity, where sensitivities are kept, the best profiles of the drivers that ran before it and where
Tune experiments go."""

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
    experiments: Path | None = None  # where Tune keeps its experiments (RUN/tune), one folder per driver

    @property
    def budget(self) -> Budget:
        return self.pool.budget
