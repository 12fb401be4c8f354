"""``sparsealloc`` command line: fetch assets, run the final pruning pass."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pruning.errors import SparseAllocError


def _add_prune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory (model, profile.json, metrics.json)")
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a Hugging Face id, a local HF directory or a .gguf file")
    parser.add_argument("--data", default="default",
                        help="'default' (Wikipedia summaries), a datasets name[:config] (e.g. wikitext:wikitext-2-raw-v1) "
                             "or a local .txt/.jsonl/.parquet file")
    parser.add_argument("--text-field", default=None, help="text column of --data (default: text/extract/content)")
    parser.add_argument("--pruner", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=None, help="target mean sparsity in [0, 1)")
    parser.add_argument("--nm", default=None, help="uniform N:M pattern, N zeros in every M weights (e.g. 2:4)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile.json with one sparsity (and optionally one N:M pattern) per decoder block")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (calibration and evaluation)")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows (Wanda/SparseGPT: 128)")
    parser.add_argument("--eval-windows", type=int, default=None, help="cap on test windows (default: the whole test split)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsealloc", description="Per-layer sparsity allocation for LLM pruning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download, verify and cache the default model and corpus")
    prune = sub.add_parser("prune", help="final pruning pass with a uniform or per-block profile")
    _add_prune_args(prune)
    return parser


def _cmd_fetch(_args) -> None:
    from pruning.assets import fetch_all

    for name, path in fetch_all().items():
        print(f"{name}: {path}")


def _cmd_prune(args) -> None:
    from orchestrator.final_pass import PruneConfig, run_prune

    config = PruneConfig(
        out=args.out, model=args.model, data=args.data, text_field=args.text_field, pruner=args.pruner,
        sparsity=args.sparsity, nm=args.nm, profile=args.profile, seqlen=args.seqlen,
        calib_samples=args.calib_samples, eval_windows=args.eval_windows, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    metrics = run_prune(config)
    achieved = metrics["achieved_sparsity"]
    print(f"\n{'model':<22}{metrics['model']}")
    print(f"{'pruner':<22}{metrics['pruner']}")
    print(f"{'target sparsity':<22}{metrics['target_sparsity']:.4f}")
    print(f"{'achieved sparsity':<22}{achieved['overall']:.4f}")
    print(f"{'dense perplexity':<22}{metrics['dense_perplexity']:.3f}")
    print(f"{'pruned perplexity':<22}{metrics['pruned_perplexity']:.3f}")
    print(f"{'test windows':<22}{metrics['protocol']['test']['windows']} x {metrics['protocol']['seqlen']} tokens")
    print(f"{'saved to':<22}{args.out}")


COMMANDS = {"fetch": _cmd_fetch, "prune": _cmd_prune}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except SparseAllocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
