"""Per-block sensitivities the drivers and sweep methods start from (Fisher traces, OWL outlier
ratios), computed once by the evaluator actors and kept in a run directory for resume."""

from __future__ import annotations

from pathlib import Path

import torch

from core.identity import fingerprint, package_version
from orchestrator.runtime.sensitivities import load_or_compute
from orchestrator.search.settings import Settings

OWL_M_CHOICES = (3, 4, 5, 6, 7, 8, 9, 10)  # OWL's outlier multipliers tune-owl searches (counted by every actor)


def _identity(settings: Settings, windows: torch.Tensor) -> dict:
    """What a stored Fisher trace or OWL ratio depends on (resume refuses a mismatch)."""
    config = settings.config
    return {"model": config.model, "data": config.data, "dtype": settings.dtype, "device": settings.device,
            "calibration": fingerprint(windows), "version": package_version()}


def fisher_traces(pool, settings: Settings, calibration: torch.Tensor, store: Path) -> list[float]:
    """Fisher traces on half the calibration windows, computed once per ``store`` (kept for resume)."""
    windows = calibration[: max(1, calibration.shape[0] // 2)]
    return load_or_compute(store, "fisher", _identity(settings, windows),
                           lambda: pool.call("fisher_traces", windows))


def outlier_ratios(pool, settings: Settings, calibration: torch.Tensor, store: Path, multiplier: float) -> list[float]:
    """OWL ratios for one M, counted by the actors while building their rank tables; kept in ``store``."""
    return load_or_compute(store, f"owl-M{multiplier}", _identity(settings, calibration),
                           lambda: pool.call("outlier_ratios", float(multiplier)))
