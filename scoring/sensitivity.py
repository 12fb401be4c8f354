"""Per-block sensitivities for the allocation families: Shapley values, Fisher traces, OWL ratios."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from core.errors import SparseAllocError
from scoring import shapley
from scoring.evaluator import CandidateEvaluator
from scoring.levels import build_rank_tables
from scoring.fisher import block_fisher_traces

METHODS = ("shapley", "fisher", "owl")
ESTIMATORS = ("exact", "permutation", "sliding")


@dataclass
class Sensitivity:
    """One value per block (higher = more sensitive), with its cost."""

    method: str
    values: list[float]
    stderr: list[float] | None = None
    evaluations: int = 0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "values": self.values, "stderr": self.stderr,
                "evaluations": self.evaluations, "seconds": self.seconds, **self.details}


def _estimator_kwargs(estimator: str, window: int, permutations: int, seed: int) -> dict:
    if estimator not in ESTIMATORS:
        raise SparseAllocError(f"unknown Shapley estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    return {"exact": {}, "permutation": {"num_permutations": permutations, "seed": seed},
            "sliding": {"window": window}}[estimator]


def shapley_plan(num_blocks: int, estimator: str, window: int = 3, permutations: int = 8,
                 seed: int = 0) -> list[frozenset[int]]:
    """The coalitions an estimator needs (what the orchestrator spreads over actors)."""
    kwargs = _estimator_kwargs(estimator, window, permutations, seed)
    if estimator == "exact":
        return shapley.exact_plan(num_blocks)
    if estimator == "permutation":
        return shapley.permutation_plan(num_blocks, **kwargs).coalitions()
    return shapley.sliding_window_plan(num_blocks, **kwargs)


def shapley_sensitivity(evaluator: CandidateEvaluator, sparsity: float, estimator: str = "sliding", window: int = 3,
                        permutations: int = 8, seed: int = 0, tokens: int | None = None,
                        progress: bool = True) -> Sensitivity:
    """Shapley value of each block in the game v(C) = KL when exactly C is pruned at ``sparsity``."""
    start = time.perf_counter()
    n = evaluator.num_blocks
    total = len(shapley_plan(n, estimator, window, permutations, seed))
    with tqdm(total=total, desc=f"shapley ({estimator})", unit="coalition", disable=not progress) as bar:

        def value(coalition: frozenset[int]) -> float:
            bar.update()
            return evaluator.coalition_fitness(coalition, sparsity, tokens)

        result = shapley.estimate(n, value, estimator, **_estimator_kwargs(estimator, window, permutations, seed))
    details = {"estimator": estimator, "sparsity": sparsity, "tokens": tokens or evaluator.max_tokens,
               "window": window if estimator == "sliding" else None,
               "permutations": permutations if estimator == "permutation" else None, "seed": seed}
    stderr = None if result.stderr is None else [float(x) for x in result.stderr]
    return Sensitivity("shapley", [float(x) for x in result.values], stderr, result.evaluations,
                       time.perf_counter() - start, details)


def fisher_sensitivity(model, windows, device, progress: bool = True) -> Sensitivity:
    """Fisher trace per block over ``windows`` (one backward pass per window)."""
    start = time.perf_counter()
    traces = block_fisher_traces(model, windows, device, progress)
    return Sensitivity("fisher", traces, evaluations=int(windows.shape[0]), seconds=time.perf_counter() - start,
                       details={"samples": int(windows.shape[0]), "tokens": int(windows.numel())})


def owl_sensitivity(model, calibration, device, multiplier: float = 5.0, batch_size: int = 4,
                    progress: bool = True) -> Sensitivity:
    """OWL outlier ratio per block from Wanda scores (counted block by block, no score table kept)."""
    start = time.perf_counter()
    ranks = build_rank_tables(model, calibration, lambda _l: device, lambda _l: torch.device("cpu"), "wanda",
                              batch_size, (multiplier,), progress)
    return Sensitivity("owl", ranks.outlier_ratios[float(multiplier)], seconds=time.perf_counter() - start,
                       details={"M": multiplier})


def plot_sensitivity(sensitivity: Sensitivity, path) -> None:
    """Bar chart of the per-block values (with standard errors when known), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = np.arange(len(sensitivity.values))
    fig, ax = plt.subplots(figsize=(max(6, len(blocks) * 0.3), 3.5))
    ax.bar(blocks, sensitivity.values, yerr=sensitivity.stderr, capsize=2, color="tab:blue")
    ax.set_xlabel("decoder block")
    ax.set_ylabel({"shapley": "Shapley value (KL)", "fisher": "Fisher trace / param",
                   "owl": "outlier ratio"}[sensitivity.method])
    ax.set_title(f"{sensitivity.method} sensitivity per block")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
