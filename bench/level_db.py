"""Benchmark: the SparseGPT level database's size (from model configs) and, with ``--build``, its
measured build on the default model (issue #10 item 2).

Size = levels × prunable linear weights × dtype bytes, for the default grid at ``--sparsity`` (every
0.05 within 0.2 of it). ``--build`` builds it for the default model on ``--calib-samples`` ×
``--seqlen`` calibration tokens on ``--device`` (the CPU by default) and records seconds and bytes on disk.
Writes bench/results/level-db.md (level-db-TAG.md with ``--tag``).

    python -m bench.level_db [--build --calib-samples 16 --seqlen 256 --device cuda --tag h200]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from scoring.level_db import database_levels
from orchestrator.runtime.plan import shape_of
from pruning.load import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"
LLAMA2 = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),
}


def size_rows(levels: list[float]) -> list[str]:
    from transformers import LlamaConfig

    shapes = [("default (SmolLM2-135M)", shape_of(DEFAULT_MODEL), 4, "fp32")]
    for name, config in LLAMA2.items():
        folder = Path(tempfile.mkdtemp())
        LlamaConfig(vocab_size=32000, **config).save_pretrained(folder)
        shapes.append((name, shape_of(str(folder)), 2, "bf16"))
    rows = ["| model | dtype | prunable weights | one level | database |", "|---|---|---|---|---|"]
    for name, shape, width, dtype in shapes:
        one = shape.linear_weights * width
        rows.append(f"| {name} | {dtype} | {shape.linear_weights / 1e9:.3f} B | {one / 2**30:.2f} GiB | "
                    f"{len(levels) * one / 2**30:.1f} GiB |")
    return rows


def build_row(levels: list[float], calib_samples: int, seqlen: int, device: torch.device) -> list[str]:
    from pruning.data import prepare_tokens
    from pruning.load import load_model
    from scoring.level_db import build_level_database

    model, tokenizer = load_model(DEFAULT_MODEL, torch.float32)
    model.to(device)  # 135M: the whole model fits any GPU
    data = prepare_tokens(tokenizer, "default", seqlen=seqlen, calib_samples=calib_samples, eval_windows=1, seed=0)
    out = Path(tempfile.mkdtemp()) / "db"
    start = time.perf_counter()
    db = build_level_database(model, data.calibration, levels, out, device, {"bench": True}, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    on_disk = sum(p.stat().st_size for p in out.iterdir())
    where = (f"CUDA, {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    return [f"Built for the default model (fp32, {where}) on {calib_samples} x "
            f"{seqlen} calibration tokens: **{seconds:.0f} s**, {on_disk / 2**30:.2f} GiB on disk "
            f"(computed {db.bytes / 2**30:.2f} GiB)."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="where --build runs: cpu, cuda, cuda:1 ...")
    parser.add_argument("--tag", help="write bench/results/level-db-TAG.md instead of level-db.md")
    args = parser.parse_args()
    levels = database_levels(args.sparsity)
    command = ("python -m bench.level_db " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    lines = ["# SparseGPT level database: size and build time", "", f"Command: `{command}`", "",
             f"Levels (default grid at {args.sparsity:g}): {levels}; the size is levels x prunable linear "
             "weights x dtype bytes (embeddings, norms and the head are not stored).", "", *size_rows(levels), ""]
    if args.build:
        lines += build_row(levels, args.calib_samples, args.seqlen, torch.device(args.device)) + [""]
    (RESULTS / (f"level-db-{args.tag}.md" if args.tag else "level-db.md")).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
