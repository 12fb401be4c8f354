"""Benchmark: fitness evaluations per second of the Ray pool (1 and 2 actors) against the physical
limit, a plain forward pass over the same tokens in one process with all threads.

Each evaluation masks a random profile (every block at a new level: the worst case for the
evaluator's mask cache) and runs the forward pass over the fitness tokens; the plain loop runs just
the forward pass (dense weights), so the gap is masking + KL + Ray overhead. Two references: the
issue's physical limit, one process with all cores, and the same work laid out like the pool
(N processes with T threads each, plain forward passes only), which isolates the overhead from
the gain of running processes instead of threads. Shared machines drift, so the references and
the pool alternate in rounds and each rate sums over its rounds. Writes bench/results/pool.{md,json}.

    python -m bench.pool [--evaluations 12 --rounds 3 --fitness-windows 8 --fitness-seqlen 128]
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

from orchestrator.runtime.candidates import Candidate
from orchestrator.runtime.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.runtime.results import ResultsTable
from pruning.data import consecutive_windows, prepare_tokens
from pruning.load import load_model, load_tokenizer, pick_device, pick_dtype
from search_spaces import families

RESULTS = Path(__file__).parent / "results"


def _candidates(n_blocks: int, count: int, seed: int) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate.of(families.free_vector(rng.uniform(0.5, 0.9, n_blocks).tolist(), 0.7), driver="bench")
            for _ in range(count)]


class PlainForward:
    """The physical limit: dense forward passes over the fitness windows in this process (all cores)."""

    def __init__(self, model_spec: str, windows: torch.Tensor, batch_size: int) -> None:
        self.device = pick_device("auto")
        self.model, _ = load_model(model_spec, pick_dtype("auto", self.device))
        self.model.to(self.device)
        self.batches = [windows[i : i + batch_size].to(self.device) for i in range(0, windows.shape[0], batch_size)]
        self.run(1)  # warm-up

    @torch.no_grad()
    def run(self, passes: int) -> float:
        """Seconds for ``passes`` passes over all the windows."""
        start = time.perf_counter()
        for _ in range(passes):
            for batch in self.batches:
                self.model(input_ids=batch, use_cache=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


class PlainForwardActor:
    """A plain forward loop in its own process, with the pool actors' thread count."""

    def __init__(self, model_spec: str, windows: torch.Tensor, batch_size: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.plain = PlainForward(model_spec, windows, batch_size)

    def run(self, passes: int) -> float:
        return self.plain.run(passes)


def compare(plain: PlainForward, model_spec: str, calibration, fitness, actors: int, threads: int,
            evaluations: int, rounds: int, batch_size: int, run_dir: Path) -> dict:
    """Rates of the pool (``actors`` actors, after they are built) and of the plain loop, alternated."""
    # Logical CPUs for the pool actors, the same-layout plain actors (never busy at once) and the driver.
    ray.init(address="local", num_cpus=2 * actors * threads + 1, include_dashboard=False, log_to_driver=False)
    try:
        pool = EvaluatorPool(EvaluatorSpec(model_spec, batch_size=batch_size, threads=threads), calibration, fitness,
                             ResultsTable(run_dir / f"actors-{actors}", "bench"), num_actors=actors)
        pool.evaluate(_candidates(pool.num_blocks, actors, seed=99))  # warm-up, one per actor
        same_layout = [ray.remote(PlainForwardActor).options(num_cpus=threads).remote(model_spec, fitness, batch_size,
                                                                                       threads)
                       for _ in range(actors)]
        candidates = _candidates(pool.num_blocks, evaluations * rounds, seed=actors)
        seconds = {"plain": 0.0, "same_layout": 0.0, "pool": 0.0}
        passes, passes_each = max(1, evaluations // 2), max(1, evaluations // actors)
        for r in range(rounds):
            seconds["plain"] += plain.run(passes)
            start = time.perf_counter()
            ray.get([actor.run.remote(passes_each) for actor in same_layout])
            seconds["same_layout"] += time.perf_counter() - start
            start = time.perf_counter()
            pool.evaluate(candidates[r * evaluations : (r + 1) * evaluations])
            seconds["pool"] += time.perf_counter() - start
        pool.close()
        plain_rate = rounds * passes / seconds["plain"]
        layout_rate = rounds * passes_each * actors / seconds["same_layout"]
        pool_rate = rounds * evaluations / seconds["pool"]
        return {"actors": actors, "threads_per_actor": threads, "evals_per_s": pool_rate,
                "plain_forward_per_s": plain_rate, "same_layout_forward_per_s": layout_rate,
                "vs_plain_forward": pool_rate / plain_rate, "overhead": 1 - pool_rate / plain_rate,
                "vs_same_layout": pool_rate / layout_rate, "overhead_vs_same_layout": 1 - pool_rate / layout_rate}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--evaluations", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fitness-windows", type=int, default=8)
    parser.add_argument("--fitness-seqlen", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    data = prepare_tokens(load_tokenizer(args.model), seqlen=args.fitness_seqlen, calib_samples=args.calib_samples)
    fitness = consecutive_windows(data.validation.flatten(), args.fitness_seqlen, args.fitness_windows)
    plain = PlainForward(args.model, fitness, args.batch_size)
    run_dir = Path(tempfile.mkdtemp(prefix="sparsealloc-bench-pool-"))  # fresh: no cached results
    rows = []
    for actors in (1, 2):
        rows.append(compare(plain, args.model, data.calibration, fitness, actors, max(1, cores // actors),
                            args.evaluations, args.rounds, args.batch_size, run_dir))
        print(json.dumps(rows[-1]), flush=True)
    report = {"model": args.model, "cores": cores, "cuda": torch.cuda.is_available(),
              "fitness_tokens": int(fitness.numel()), "evaluations_per_round": args.evaluations,
              "rounds": args.rounds, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "pool" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Evaluator pool throughput ({args.model}, {cores} cores{', CUDA' if report['cuda'] else ''})", "",
             f"One evaluation = mask a random 70 % profile (every block at a new level) and score KL on "
             f"{report['fitness_tokens']} fitness tokens. References, alternated with the pool in {args.rounds} rounds "
             f"of {args.evaluations} evaluations: the physical limit, a plain dense forward pass over the same tokens "
             f"in one process with all cores; and plain forward passes laid out like the pool (one process per actor, "
             f"same threads).", "",
             "| actors | threads each | evaluations/s | plain forward /s (1 process) | overhead vs 1 process | "
             "plain forward /s (same layout) | overhead vs same layout |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['actors']} | {r['threads_per_actor']} | {r['evals_per_s']:.3f} | {r['plain_forward_per_s']:.3f} | "
              f"{r['overhead']:.1%} | {r['same_layout_forward_per_s']:.3f} | {r['overhead_vs_same_layout']:.1%} |"
              for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
