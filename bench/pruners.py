"""Benchmark: dense vs magnitude / Wanda / SparseGPT at uniform 50/60/70 % on the default model.

Writes bench/results/pruners.{md,json}. Every pass starts from the same dense weights and uses
the same calibration and test windows; wall time and peak memory are per pass.

    python -m bench.pruners [--calib-samples 32 --seqlen 512 --eval-windows 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.memory import peak_memory
from pruning.data import prepare_tokens
from pruning.load import load_model, pick_device, pick_dtype
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.perplexity import perplexity
from scoring.sparsity import achieved_sparsity
from core.profile import Profile

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="default")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--pruners", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tag", default="", help="suffix for the result files (e.g. the device)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, pick_dtype("auto", device))
    model.to(device)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = prepare_tokens(tokenizer, args.data, seqlen=args.seqlen, calib_samples=args.calib_samples,
                          eval_windows=args.eval_windows)
    blocks = model.config.num_hidden_layers

    start = time.perf_counter()
    dense_ppl = perplexity(model, data.test, device, args.batch_size, desc="dense perplexity")
    eval_s = time.perf_counter() - start
    rows = []
    for pruner_name in args.pruners:
        for sparsity in args.sparsities:
            model.load_state_dict(dense_state)
            with peak_memory(device) as memory:
                start = time.perf_counter()
                prune_sequentially(model, data.calibration, Profile.uniform(blocks, sparsity),
                                   get_pruner(pruner_name), device, args.batch_size)
                prune_s = time.perf_counter() - start
            ppl = perplexity(model, data.test, device, args.batch_size, desc=f"{pruner_name} {sparsity:.0%}")
            rows.append({"pruner": pruner_name, "sparsity": sparsity, "perplexity": ppl,
                         "ppl_vs_dense": ppl / dense_ppl, "achieved_sparsity": achieved_sparsity(model)["overall"],
                         "prune_s": prune_s, "prune_vs_dense_eval": prune_s / eval_s,
                         "peak_mib": memory["peak_mib"], "memory_kind": memory["kind"]})
            print(json.dumps(rows[-1]))

    report = {"dense_perplexity": dense_ppl, "dense_eval_s": eval_s, "device": str(device),
              "cuda_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "protocol": data.protocol, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "pruners" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Pruners on {args.model} ({device}{', ' + report['cuda_name'] if report['cuda_name'] else ''})",
        "",
        f"Protocol: {args.calib_samples} calibration windows x {args.seqlen} tokens (random, calibration split), "
        f"test perplexity on {data.test.shape[0]} x {args.seqlen} consecutive windows of the test split, seed 0.",
        f"Dense perplexity **{dense_ppl:.3f}**; one dense evaluation pass takes {eval_s:.1f} s.",
        "",
        "| pruner | sparsity | perplexity | x dense | achieved | pass s | pass / dense eval | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['pruner']} | {r['sparsity']:.0%} | {r['perplexity']:.2f} | {r['ppl_vs_dense']:.2f} | "
                     f"{r['achieved_sparsity']:.4f} | {r['prune_s']:.1f} | {r['prune_vs_dense_eval']:.2f} | "
                     f"{r['peak_mib']:.0f} ({r['memory_kind']}) |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
