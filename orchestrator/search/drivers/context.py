"""What every driver gets: the charged pool, the search's settings, calibration windows, the top
fidelity, where sensitivities are kept, the best profiles of the drivers that ran before it and where
Tune experiments go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.profile import Profile
from core.units import UnitLayout
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

    @property
    def granularity(self) -> str:
        """What one entry of the profiles this driver proposes covers (``--granularity``)."""
        return self.settings.config.granularity

    @property
    def layout(self) -> UnitLayout:
        return self.pool.layout

    def unit_weights(self) -> list[int]:
        """The parameter count of each unit at the search's granularity (the weights of a profile's mean)."""
        return list(self.pool.block_weights) if self.granularity == "block" else self.layout.weights(self.granularity)

    def at_granularity(self, profile: Profile) -> Profile:
        """``profile`` at the search's granularity (a block profile gives each unit its block's level)."""
        return profile if profile.granularity == self.granularity else profile.at(self.layout, self.granularity)
