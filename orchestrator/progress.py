"""A live line per driver: evaluations done / budget, best fitness so far, ETA."""

from __future__ import annotations

from tqdm.auto import tqdm

from orchestrator.budget import Budget


class DriverProgress:
    """tqdm line over the budget's used share; ``update`` after each batch of evaluations."""

    def __init__(self, name: str, budget: Budget, enabled: bool = True) -> None:
        total = budget.max_evals if budget.max_evals else None
        self.budget = budget
        self.bar = tqdm(total=total, desc=name, unit="eval", disable=not enabled, dynamic_ncols=True)
        self.best = float("inf")

    def update(self, best: float | None = None) -> None:
        if best is not None:
            self.best = min(self.best, best)
        self.bar.n = self.budget.used_evals
        eta = ""
        fraction = self.budget.fraction_used()
        if 0 < fraction < 1:
            eta = f"{self.budget.elapsed / fraction - self.budget.elapsed:.0f}s"
        self.bar.set_postfix_str(f"best {self.best:.4f}" + (f", budget ETA {eta}" if eta else ""))

    def close(self) -> None:
        self.bar.close()
