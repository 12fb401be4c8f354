"""The search drivers, registered once: the CLI's ``--method`` choices and help, the sweep's methods
and the ``--method all`` plan (which drivers run, in which order, with which share of the budget)
all come from :data:`DRIVERS`.

Each entry names the function that runs the driver (``module:function``, imported when the driver
runs), so reading the registry costs nothing: the CLI's ``--help`` does not load torch or Ray. A
driver's function takes a :class:`~orchestrator.search.drivers.context.DriverContext` and returns a
:class:`~orchestrator.runtime.candidates.DriverResult`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from core.errors import SparseAllocError


@dataclass(frozen=True)
class Driver:
    """A registered driver: where its run function is, what it is, and its share under ``--method all``
    (None: not part of it). Registration order is the order ``--method all`` runs them in."""

    run: str  # "package.module:function"
    help: str
    all_share: float | None = None

    def function(self) -> Callable:
        """The driver's run function (its module imported now)."""
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


_HERE = "orchestrator.search.drivers"

DRIVERS: dict[str, Driver] = {
    "shapley": Driver(f"{_HERE}.shapley:run", "Shapley values of blocks (SV-NUP), mapped to a profile", 0.3),
    "evolution": Driver(f"{_HERE}.evolution:run", "MSP: Fisher-seeded evolutionary search over per-block levels",
                        0.4),
    "tune-free": Driver(f"{_HERE}.tune:run_free", "Optuna (TPE or CMA-ES) over a free per-block vector", 0.15),
    "tune-atp": Driver(f"{_HERE}.tune:run_atp", "Optuna over ATP's common difference beta", 0.15),
    "tune-owl": Driver(f"{_HERE}.tune:run_owl", "Optuna over OWL's lambda and M"),
    "tune-fisher": Driver(f"{_HERE}.tune:run_fisher", "Optuna over the Fisher map's strength"),
}


def all_shares() -> dict[str, float]:
    """``--method all``: the drivers that take part, in order, with their shares of the budget."""
    return {name: driver.all_share for name, driver in DRIVERS.items() if driver.all_share is not None}


def method_names() -> list[str]:
    """``--method`` choices: ``all`` and every driver."""
    return ["all", *DRIVERS]


def driver_plan(method: str, shares: dict[str, float] | None = None) -> dict[str, float]:
    """The drivers ``method`` runs, in order, with their fractions of the budget (summing to 1); under
    ``all`` from ``shares`` (default :func:`all_shares`)."""
    if method == "all":
        shares = all_shares() if shares is None else shares
        unknown = [name for name in shares if name not in DRIVERS]
        if unknown or not shares or min(shares.values()) <= 0:
            raise SparseAllocError(f"shares must give positive parts to drivers among {', '.join(DRIVERS)}, "
                                   f"got {shares}")
        total = sum(shares.values())
        return {name: share / total for name, share in shares.items()}
    if method not in DRIVERS:
        raise SparseAllocError(f"unknown --method {method!r}; choose all or one of {', '.join(DRIVERS)}")
    return {method: 1.0}
