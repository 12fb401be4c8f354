"""Benchmark (issue #24, "a pick you can trust"): is the finalists' pick on ``--selection-windows`` windows
decided by more than noise?

For each seed file of ``bench.search``: the two finalists with the lowest validation perplexity get the
Wanda pass again with the file's protocol, then their mean NLL on each of the first N selection windows
(the validation windows after the fitness tokens, as the search picks) and on the test windows. For each
N: the paired gap (runner-up minus winner, nats per token) and its standard error, and whether the gap's
sign agrees with the test split's. Writes ``bench/results/pick-noise.md`` and one JSON per seed file.

    python -m bench.pick_noise bench/results/search-70-tokens-seed0.json bench/results/search-70-tokens-seed1.json \\
        bench/results/search-70-tokens-seed2.json --windows 8 16 32 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from core.identity import write_json
from core.profile import Profile
from orchestrator.search.config import SearchConfig
from orchestrator.search.registry import driver_plan
from orchestrator.search.settings import resolve, token_sets
from pruning.load import load_model, load_tokenizer
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.perplexity import paired_gap, window_nlls

RESULTS = Path(__file__).parent / "results"
CPU = torch.device("cpu")


def _finalists(record: dict) -> list[tuple[str, Profile]]:
    """The two lowest validation perplexities among the record's drivers with a final pass."""
    rows = [(d["validation_perplexity"], name, d["profile"]) for name, d in record["drivers"].items()
            if d.get("validation_perplexity") is not None and not d.get("same_profile_as")]
    rows.sort()
    return [(name, Profile(tuple(profile))) for _, name, profile in rows[:2]]


def measure(path: Path, windows: list[int]) -> dict:
    record = json.loads(path.read_text())
    protocol = record["protocol"]
    config = SearchConfig(out=Path("/tmp/pick-noise-unused"), sparsity=record["sparsity"], pruner=record["pruner"],
                          seed=record["seed"], seqlen=protocol["seqlen"], calib_samples=protocol["calib_samples"],
                          eval_windows=protocol["eval_windows"], selection_windows=max(windows), progress=False)
    settings = resolve(config, driver_plan(config.method), 0, 1)
    tokens = token_sets(settings, load_tokenizer(config.model))
    nlls, tests = {}, {}
    for name, profile in _finalists(record):
        model, _ = load_model(config.model, torch.float32)
        prune_sequentially(model, tokens.calibration, profile, get_pruner(config.pruner), CPU, config.batch_size,
                           progress=False)
        nlls[name] = window_nlls(model, tokens.selection, CPU, config.batch_size, progress=False)
        test = window_nlls(model, tokens.test, CPU, config.batch_size, progress=False)
        tests[name] = math.exp(sum(test) / len(test))
    first, second = list(nlls)
    rows = []
    for count in windows:
        a, b = nlls[first][:count], nlls[second][:count]
        winner, runner = (first, second) if sum(a) <= sum(b) else (second, first)
        gap, se = paired_gap(nlls[winner][:count], nlls[runner][:count])
        rows.append({"windows": count, "winner": winner, "runner_up": runner, "nll_gap": gap, "nll_gap_se": se,
                     "clear": gap > 2 * se, "test_agrees": tests[winner] <= tests[runner]})
    return {"seed_file": path.name, "seed": record["seed"], "finalists": list(nlls), "test_perplexity": tests,
            "selection_seqlen": config.seqlen, "rows": rows}


def write_table() -> Path:
    """``pick-noise.md`` from every ``pick-noise-*.json`` in the results (seeds measured in earlier runs kept)."""
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("pick-noise-*.json"))]
    commands = sorted({r["command"] for r in results})
    lines = ["# Is the finalists' pick more than noise?", "",
             "Made by " + "; ".join(f"`{c}`" for c in commands) + " (each seed's command is in its "
             "`pick-noise-<seed file>.json`). The two finalists with the lowest validation perplexity in each seed "
             "file, pruned again with its protocol (Wanda); gap = runner-up's mean NLL minus the winner's on the "
             "first N selection windows (paired, nats per token), ± its standard error; clear = gap above two "
             "standard errors; test agrees = the pick also has the lower test perplexity.", "",
             "| seed | finalists (test ppl) | N windows | winner | gap ± se | clear | test agrees |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["seed"]):
        finalists = ", ".join(f"{name} ({ppl:.2f})" for name, ppl in r["test_perplexity"].items())
        for row in r["rows"]:
            lines.append(f"| {r['seed']} | {finalists} | {row['windows']} | {row['winner']} | "
                         f"{row['nll_gap']:.4f} ± {row['nll_gap_se']:.4f} | {'yes' if row['clear'] else 'no'} | "
                         f"{'yes' if row['test_agrees'] else 'no'} |")
    path = RESULTS / "pick-noise.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_files", nargs="+", type=Path)
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    command = "python -m bench.pick_noise " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for path in args.seed_files:
        started, load = time.time(), os.getloadavg()
        result = measure(path, sorted(args.windows))
        result.update(command=command, wall_s=round(time.time() - started, 1), load_average=load)
        write_json(RESULTS / f"pick-noise-{path.stem}.json", result)
        print(json.dumps(result["rows"]), flush=True)
    print(write_table())


if __name__ == "__main__":
    main()
