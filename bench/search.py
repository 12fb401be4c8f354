"""Benchmark (issue #10): does ``search --method all`` earn its cost against the cheap heuristics?

For each seed: ``sparsealloc search --method all`` on the default model (its own run directory, every
driver's best profile through the final pass), then the baselines through the same final pass on the
same calibration, selection and test windows: uniform, OWL (M 5, λ 0.08), the ATP grid (β on
``--atp-grid`` even steps from 0 to its maximum; the ATP pick is the lowest validation perplexity among
the grid and Tune's ATP best), the Fisher map (the search's stored traces) and the Shapley map (the
search's Shapley values, strength 1). Writes ``bench/results/search-<tag>-seed<N>.json`` (the search's
summary plus the baselines, ``winner_vs_atp`` against the ATP pick, the command and the load) and
``bench/results/search-<tag>.md`` over every seed file of that tag.

    python -m bench.search --seeds 0 1 2 --budget-minutes 20            # tag 70 (16 x 256 calibration
                                                                        # and test windows by default)
    python -m bench.search --seeds 0 --budget-tokens 1500000 --tag 70-tokens
    python -m bench.search --seeds 0 --pruner sparsegpt --tag 70-sparsegpt
    python -m bench.search --seeds 0 --budget-tokens 800000 --granularity group --tag 70-group
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import ray
import torch

from core.profile import Profile
from dataclasses import replace

from core.identity import write_json
from orchestrator.cli import sigterm_as_interrupt
from orchestrator.passes.tasks import PassTasks, as_completed, pass_inputs, stored_metrics, window_digests
from orchestrator.search.config import SearchConfig
from orchestrator.search.registry import driver_plan
from orchestrator.search.run import pass_template, run_search
from orchestrator.search.settings import Settings, Tokens, resolve, token_sets
from pruning.load import block_param_counts, load_model, load_tokenizer
from scoring.sensitivity import owl_sensitivity
from search_spaces import families

RESULTS = Path(__file__).parent / "results"


def baseline_profiles(config: SearchConfig, summary: dict, calibration: torch.Tensor, atp_grid: int,
                      owl_m: float = 5.0, owl_lambda: float = 0.08) -> dict[str, Profile]:
    """The heuristics every search is compared with, for ``config``'s model and target."""
    model, _ = load_model(config.model, torch.float32)
    weights = block_param_counts(model)
    n, target = len(weights), config.sparsity
    ratios = owl_sensitivity(model, calibration, torch.device("cpu"), owl_m, config.batch_size, False).values
    del model
    fisher = json.loads((Path(config.out) / "sensitivities" / "fisher.json").read_text())["values"]
    top = families.atp_beta_max(n, target)
    profiles = {"uniform": families.uniform(n, target),
                f"owl M={owl_m:g} lambda={owl_lambda:g}": families.owl(ratios, target, owl_lambda),
                "fisher-map": families.sensitivity_map(fisher, target, 1.0, weights)}
    for i in range(1, atp_grid):  # beta = 0 is uniform
        beta = top * i / (atp_grid - 1)
        profiles[f"atp beta={beta:.4g}"] = families.atp(n, target, beta)
    values = summary["drivers"].get("shapley", {}).get("details", {}).get("values")
    if values is not None:
        profiles["shapley-map"] = families.sensitivity_map(values, target, 1.0, weights)
    return profiles


def baseline_passes(settings: Settings, profiles: dict[str, Profile], tokens: Tokens) -> dict:
    """Each baseline's final pass (Ray tasks, one core each; stored metrics with the same inputs reused)."""
    run = Path(settings.config.out).resolve() / "baselines"
    template = pass_template(settings)
    windows = window_digests(tokens.calibration, tokens.selection, tokens.test)
    tasks = PassTasks({"num_cpus": 1}, tokens.calibration, tokens.selection, tokens.test)
    refs, out = {}, {}
    for name, profile in profiles.items():
        inputs = pass_inputs(template.model, template.device, template.dtype, template.pruner, windows, profile)
        folder = run / name.replace(" ", "_").replace("=", "")
        stored = stored_metrics(folder / "metrics.json", inputs)
        if stored is not None:
            out[name] = stored
            continue
        job = replace(template, threads=1, out=str(folder), inputs=inputs, save=False)
        refs[tasks.submit(job, name, profile)] = name
    out.update(as_completed(refs))
    return {name: {"validation_perplexity": m["validation_perplexity"], "test_perplexity": m["test_perplexity"],
                   "profile": m["profile"]["sparsities"]} for name, m in sorted(out.items())}


def ratios(summary: dict, baselines: dict) -> dict:
    """The targets' ratios: the winner and the evolution driver against the ATP pick (the grid and Tune's
    ATP best, chosen on validation) and the Shapley map; each driver's own final pass against ATP."""
    passes = summary["final_passes"]
    atp = {name: row for name, row in baselines.items() if name.startswith("atp") or name == "uniform"}
    if "tune-atp" in passes:
        atp["tune-atp"] = passes["tune-atp"]
    pick = min(atp, key=lambda name: atp[name]["validation_perplexity"])
    atp_test = atp[pick]["test_perplexity"]
    out = {"atp_pick": pick, "atp_pick_test_perplexity": atp_test,
           "winner_vs_atp": summary["winner_test_perplexity"] / atp_test,
           "drivers_vs_atp": {name: row["test_perplexity"] / atp_test for name, row in passes.items()}}
    if "evolution" in passes and "shapley-map" in baselines:
        out["evolution_vs_shapley_map"] = passes["evolution"]["test_perplexity"] / \
            baselines["shapley-map"]["test_perplexity"]
    return out


def run_seed(args, seed: int) -> dict:
    out = Path(args.out) / f"{args.tag}-seed{seed}"
    config = SearchConfig(out=out, method="all", sparsity=args.sparsity, pruner=args.pruner, model=args.model,
                          granularity=args.granularity,
                          budget_minutes=args.budget_minutes, budget_tokens=args.budget_tokens, seed=seed,
                          seqlen=args.seqlen, calib_samples=args.calib_samples, eval_windows=args.eval_windows,
                          sequential_windows=args.sequential_windows, progress=False, uniform_baseline=False,
                          resume=(out / "config.json").exists())
    started = time.time()
    load_before = os.getloadavg()
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if config.resume and summary_file.exists() else None
    if summary is None or "winner" not in summary:
        summary = run_search(config)
    search_s = time.time() - started
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = resolve(config, driver_plan(config.method), ray.cluster_resources().get("GPU", 0), None)
        tokens = token_sets(settings, load_tokenizer(config.model))
        profiles = baseline_profiles(config, summary, tokens.calibration, args.atp_grid)
        baselines = baseline_passes(settings, profiles, tokens)
    finally:
        ray.shutdown()
    record = {
        "command": "python -m bench." + Path(__file__).stem + " " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "search_command": f"sparsealloc search --method all --sparsity {args.sparsity} --pruner {args.pruner} "
                          + (f"--budget-minutes {args.budget_minutes:g} " if args.budget_minutes else "")
                          + (f"--budget-tokens {args.budget_tokens} " if args.budget_tokens else "")
                          + f"--seqlen {args.seqlen} --calib-samples {args.calib_samples} "
                          + f"--eval-windows {args.eval_windows} --sequential-windows {args.sequential_windows} "
                          + (f"--model {args.model} " if args.model != "default" else "")
                          + f"--granularity {args.granularity} --seed {seed} --out {out}",
        "seed": seed, "sparsity": args.sparsity, "pruner": args.pruner,
        "budget": {"minutes": args.budget_minutes, "tokens": args.budget_tokens},
        "protocol": {k: summary.get(k) for k in ("device", "dtype")} | {
            "seqlen": config.seqlen, "calib_samples": config.calib_samples, "eval_windows": config.eval_windows,
            "fitness_tokens": config.fitness_windows * config.fitness_seqlen, "fidelities": list(config.fidelities),
            "selection_windows": config.selection_windows, "top_fitness": config.top_fitness,
            "sequential_windows": config.sequential_windows, "data": config.data, "model": config.model,
            "granularity": config.granularity},
        "winner": summary["winner"], "winner_test_perplexity": summary["winner_test_perplexity"],
        "selection_margin": summary["selection"].get("margin"),
        "dense_test_perplexity": summary["dense_test_perplexity"],
        "drivers": {name: {"validation_kl": d["validation_kl"], "evaluations": d["evaluations"],
                           "seconds": d["seconds"], "tokens": d["details"].get("tokens"),
                           **{k: summary["final_passes"].get(name, {}).get(k)
                              for k in ("validation_perplexity", "test_perplexity", "same_profile_as")},
                           "profile": d["profile"]} for name, d in summary["drivers"].items()},
        "finalists": summary["final_passes"],
        "baselines": baselines,
        **ratios(summary, baselines),
        "timings": summary.get("timings"), "wall_s": round(time.time() - started, 1), "search_wall_s": round(search_s, 1),
        "resumed": config.resume,  # then wall_s is the last process's only; timings add up every process's
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    write_json(RESULTS / f"search-{args.tag}-seed{seed}.json", record)
    return record


def _number(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def write_table(tag: str) -> Path:
    """``bench/results/search-<tag>.md`` from every seed file of ``tag``."""
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"search-{tag}-seed*.json"))]
    lines = [f"# `search --method all` against the heuristics ({tag})", ""]
    for r in records:
        lines += [f"## seed {r['seed']}", "", f"Command: `{r['command']}` (search: `{r['search_command']}`); "
                  f"{r['protocol']['device']} {r['protocol']['dtype']}, fitness pool {r['protocol']['fitness_tokens']} "
                  f"tokens, stages {r['protocol']['fidelities']}, {r['protocol']['calib_samples']} x "
                  f"{r['protocol']['seqlen']} calibration tokens, {r['protocol']['eval_windows']} test windows; "
                  f"wall {r['wall_s']:.0f} s{' (its last process: a resumed run)' if r.get('resumed') else ''}, "
                  f"load average before/after {r['load_average']['before'][0]:.1f} / "
                  f"{r['load_average']['after'][0]:.1f}." + (f" {r['note']}" if r.get("note") else ""), "",
                  "| profile | validation KL | evaluations | validation ppl | test ppl | ÷ ATP pick |", "|---|---|---|---|---|---|"]
        atp = r["atp_pick_test_perplexity"]
        for name, d in r["drivers"].items():
            twin = f" (= {d['same_profile_as']})" if d.get("same_profile_as") else ""
            win = " **winner**" if name == r["winner"] else ""
            test = d.get("test_perplexity")
            lines.append(f"| driver {name}{twin}{win} | {d['validation_kl']:.4f} | {d['evaluations']} | "
                         f"{_number(d.get('validation_perplexity'))} | {_number(test)} | "
                         f"{_number(None if test is None else test / atp, '.3f')} |")
        for name, b in r["baselines"].items():
            pick = " (ATP pick)" if name == r["atp_pick"] else ""
            lines.append(f"| {name}{pick} | - | - | {b['validation_perplexity']:.2f} | {b['test_perplexity']:.2f} | "
                         f"{b['test_perplexity'] / atp:.3f} |")
        lines += ["", f"Dense test perplexity {r['dense_test_perplexity']:.2f}. ATP pick: {r['atp_pick']} "
                  f"(test {atp:.2f}). Winner ÷ ATP pick: **{r['winner_vs_atp']:.3f}**"
                  + (f"; evolution ÷ Shapley map: {r['evolution_vs_shapley_map']:.3f}"
                     if "evolution_vs_shapley_map" in r else "") + ".", ""]
    if records:
        lines += ["## Across seeds", "", "| seed | winner | winner ÷ ATP | evolution ÷ ATP | evolution ÷ Shapley map |",
                  "|---|---|---|---|---|"]
        for r in records:
            evo = r["drivers_vs_atp"].get("evolution")
            lines.append(f"| {r['seed']} | {r['winner']} | {r['winner_vs_atp']:.3f} | "
                         f"{'-' if evo is None else f'{evo:.3f}'} | {r.get('evolution_vs_shapley_map', float('nan')):.3f} |")
    path = RESULTS / f"search-{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--budget-minutes", type=float, default=None)
    parser.add_argument("--budget-tokens", type=int, default=None)
    parser.add_argument("--atp-grid", type=int, default=3)
    parser.add_argument("--granularity", default="block", choices=["block", "group", "linear"])
    parser.add_argument("--model", default="default")
    # The final passes' protocol (calibration and test windows): a quarter of search's defaults, so that
    # the search's and the baselines' ~11 passes per seed fit beside a 20-minute search on 2 cores.
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--sequential-windows", type=int, default=4,
                        help="kl-seq's calibration windows (--calib-samples: the final pass's own masks)")
    parser.add_argument("--tag", default=None, help="default: the sparsity in percent")
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--table-only", action="store_true", help="only rewrite search-<tag>.md from the seed files")
    args = parser.parse_args()
    if args.table_only:
        print(write_table(args.tag or f"{round(args.sparsity * 100)}"))
        return
    if args.budget_minutes is None and args.budget_tokens is None:
        args.budget_minutes = 20.0
    args.tag = args.tag or f"{round(args.sparsity * 100)}"
    try:
        with sigterm_as_interrupt():
            for seed in args.seeds:
                record = run_seed(args, seed)
                print(f"seed {seed}: winner {record['winner']} test {record['winner_test_perplexity']:.2f}, "
                      f"winner / ATP pick {record['winner_vs_atp']:.3f}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted; each seed's run is kept under {args.out}: the same command resumes it", file=sys.stderr)
        sys.exit(130)
    print(write_table(args.tag))


if __name__ == "__main__":
    main()
