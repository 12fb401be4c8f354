"""Benchmark: fitness evaluations per second of the Ray pool (1 and 2 actors) against the physical
limit, a plain forward pass over the same tokens in one process with all threads.

Each evaluation masks a random profile and runs the forward pass over the fitness tokens; the plain
loop runs just the forward pass (dense weights), so the gap is masking + Ray overhead. Writes
bench/results/pool.{md,json}.

    python -m bench.pool [--evaluations 24 --fitness-windows 8 --fitness-seqlen 128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from orchestrator.candidates import Candidate
from orchestrator.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.results import ResultsTable
from pruning.data import consecutive_windows, prepare_tokens
from pruning.load import load_model, load_tokenizer, pick_device, pick_dtype
from search_spaces import families

RESULTS = Path(__file__).parent / "results"


def _candidates(n_blocks: int, count: int, seed: int) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate.of(families.free_vector(rng.uniform(0.5, 0.9, n_blocks).tolist(), 0.7), driver="bench")
            for _ in range(count)]


def plain_forward_rate(model_spec: str, windows: torch.Tensor, repeats: int, batch_size: int) -> float:
    """Forward passes per second over ``windows`` in this process (all cores), dense model."""
    device = pick_device("auto")
    model, _ = load_model(model_spec, pick_dtype("auto", device))
    model.to(device)
    with torch.no_grad():
        model(input_ids=windows[:batch_size].to(device), use_cache=False)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for i in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats / (time.perf_counter() - start)


def pool_rate(model_spec: str, calibration, fitness, actors: int, threads: int, evaluations: int,
              batch_size: int, run_dir: Path) -> float:
    """Evaluations per second of a pool with ``actors`` actors (after they are built)."""
    ray.init(num_cpus=actors * threads + 1, include_dashboard=False, log_to_driver=False)
    try:
        pool = EvaluatorPool(EvaluatorSpec(model_spec, batch_size=batch_size, threads=threads), calibration, fitness,
                             ResultsTable(run_dir / f"actors-{actors}", "bench"), num_actors=actors)
        pool.evaluate(_candidates(pool.num_blocks, actors, seed=99))  # warm-up, one per actor
        candidates = _candidates(pool.num_blocks, evaluations, seed=actors)
        start = time.perf_counter()
        pool.evaluate(candidates)
        return evaluations / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--fitness-windows", type=int, default=8)
    parser.add_argument("--fitness-seqlen", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    data = prepare_tokens(load_tokenizer(args.model), seqlen=args.fitness_seqlen, calib_samples=args.calib_samples)
    fitness = consecutive_windows(data.validation.flatten(), args.fitness_seqlen, args.fitness_windows)
    plain = plain_forward_rate(args.model, fitness, repeats=max(3, args.evaluations // 4), batch_size=args.batch_size)
    run_dir = Path(tempfile.mkdtemp(prefix="sparsealloc-bench-pool-"))  # fresh: no cached results
    rows = []
    for actors in (1, 2):
        threads = max(1, cores // actors)
        rate = pool_rate(args.model, data.calibration, fitness, actors, threads, args.evaluations, args.batch_size,
                         run_dir)
        rows.append({"actors": actors, "threads_per_actor": threads, "evals_per_s": rate,
                     "vs_plain_forward": rate / plain, "overhead": 1 - rate / plain})
        print(json.dumps(rows[-1]), flush=True)
    report = {"model": args.model, "cores": cores, "cuda": torch.cuda.is_available(),
              "fitness_tokens": int(fitness.numel()), "plain_forward_per_s": plain, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "pool" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Evaluator pool throughput ({args.model}, {cores} cores{', CUDA' if report['cuda'] else ''})", "",
             f"One evaluation = mask a random 70 % profile and score KL on {report['fitness_tokens']} fitness tokens. "
             f"Physical limit: a plain dense forward pass over the same tokens in one process: "
             f"**{plain:.3f} passes/s**.", "",
             "| actors | threads each | evaluations/s | vs plain forward | orchestration + masking overhead |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['actors']} | {r['threads_per_actor']} | {r['evals_per_s']:.3f} | {r['vs_plain_forward']:.2f} | "
              f"{r['overhead']:.1%} |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
