"""Benchmark: ablation of the evolutionary search's parts on the planted windowed problem of
``tests/test_evolution.py`` (a KL-like fitness over 64 windows whose true score is known), at equal
evaluation budgets (issue #10 item 4).

Configurations: the default (two parents, crossover at rate 0.5 then repair, fresh minibatches with
the parents rescored), without crossover, with one parent (so no crossover), and on fixed tokens
(parents keep cached scores). Regret = true score of the answer minus the optimum, mean over seeds.
Writes bench/results/evolution-ablation.md.

    python -m bench.evolution_ablation [--budgets 1000 3000 8000 --seeds 6]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from tests.test_evolution import ablation  # the planted problem and its regret, shared with the test

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "default: 2 parents, crossover 0.5, fresh minibatches": dict(survivors=(4, 2), crossover_rate=0.5, fresh_tokens=True),
    "no crossover (2 parents, fresh)": dict(survivors=(4, 2), crossover_rate=0.0, fresh_tokens=True),
    "1 parent, mutation only (fresh)": dict(survivors=(4, 1), crossover_rate=0.0, fresh_tokens=True),
    "fixed tokens (2 parents, crossover 0.5)": dict(survivors=(4, 2), crossover_rate=0.5, fresh_tokens=False),
    "1 parent, mutation only, fixed tokens": dict(survivors=(4, 1), crossover_rate=0.0, fresh_tokens=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 3000, 8000])
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    command = ("python -m bench.evolution_ablation " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    lines = ["# Evolution ablation (planted windowed problem)", "", f"Command: `{command}`", "",
             f"Mean regret over {args.seeds} seeds (lower is better) at equal evaluation budgets.", "",
             "| configuration | " + " | ".join(f"{b} evaluations" for b in args.budgets) + " |",
             "|---|" + "---|" * len(args.budgets)]
    for name, overrides in CONFIGS.items():
        cells = [f"{np.mean(ablation(budget, range(args.seeds), **overrides)):.4f}" for budget in args.budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "evolution-ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
