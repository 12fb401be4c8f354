"""A live line per driver: evaluations (or tokens) done / budget, best fitness so far, ETA."""

from __future__ import annotations

from tqdm.auto import tqdm

from orchestrator.search.budget import Budget


def _count(n: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.0f}"


class DriverProgress:
    """tqdm line over the budget's used share; ``update`` after each batch of evaluations.

    The bar counts evaluations against an evaluation budget, else tokens against a token budget; the
    tokens scored (and their budget) are shown beside it, and the ETA follows whichever of
    evaluations, tokens and time is furthest spent."""

    def __init__(self, name: str, budget: Budget, enabled: bool = True) -> None:
        self.budget = budget
        self.by_tokens = not budget.max_evals and bool(budget.max_tokens)
        total = budget.max_tokens if self.by_tokens else (budget.max_evals or None)
        self.bar = tqdm(total=total, desc=name, unit="tok" if self.by_tokens else "eval", disable=not enabled,
                        dynamic_ncols=True, unit_scale=self.by_tokens)
        self.best = float("inf")

    def postfix(self) -> str:
        """The text after the bar: best so far, tokens scored (of the token budget), budget ETA."""
        budget = self.budget
        parts = [f"best {self.best:.4f}"]
        if budget.used_tokens or budget.max_tokens:
            tokens = _count(budget.used_tokens)
            if budget.max_tokens and not self.by_tokens:
                tokens += f"/{_count(budget.max_tokens)}"
            parts.append(f"{tokens} tokens" if not self.by_tokens else f"{budget.used_evals} evals")
        fraction = budget.fraction_used()
        if 0 < fraction < 1:
            parts.append(f"budget ETA {budget.elapsed / fraction - budget.elapsed:.0f}s")
        return ", ".join(parts)

    def update(self, best: float | None = None) -> None:
        if best is not None:
            self.best = min(self.best, best)
        self.bar.n = self.budget.used_tokens if self.by_tokens else self.budget.used_evals
        self.bar.set_postfix_str(self.postfix())

    def close(self) -> None:
        self.bar.close()
