"""GPU check: the CUDA paths of sparsealloc in one short run (under 8 minutes on one H100/H200-class GPU).

Steps, each a separate process with its own time limit (a failed or timed-out step is recorded and the
others still run):

1. ``scale``: the evaluator on a random-initialised 7B-shaped LLaMA, resident and streamed
   (evaluation / plain forward, bytes per weight on the device, streamed / resident), via ``bench.scale``;
2. ``level-db``: the SparseGPT level database of the default model built on the GPU (``bench.level_db``);
3. ``prune``: a final SparseGPT pass of the default model with its blocks offloaded to the host;
4. ``search``: ``make demo``'s budgeted search on the default model with one GPU actor, end to end.

Writes ``bench/results/gpu-<device>.md`` (device name in lower case, spaces as dashes) naming the command,
the machine and each step's outcome and seconds. Without CUDA it writes nothing and exits 2.

    bash bench/gpu_check.sh            # or: python -m bench.gpu_check [--steps scale prune]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SPARSEALLOC = [sys.executable, "-m", "orchestrator.cli"]


def demo_flags(makefile: Path = ROOT / "Makefile") -> list[str]:
    """``make demo``'s search flags, read from the Makefile's ``DEMO_FLAGS`` (one place to change them)."""
    lines = makefile.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("DEMO_FLAGS :="))
    text = lines[start].split(":=", 1)[1]
    while text.endswith("\\"):
        start += 1
        text = text[:-1] + " " + lines[start]
    return text.split()


@dataclass
class Step:
    name: str
    what: str
    command: list[str]
    limit_s: int


def steps(work: Path, tag: str) -> list[Step]:
    """The check's steps, in order; ``work`` holds their run directories, ``tag`` names result files."""
    return [
        Step("scale", "evaluator on a 7B-shaped LLaMA (random weights), resident and streamed, bf16",
             [sys.executable, "-m", "bench.scale", "--models", "7b", "--modes", "resident", "streamed",
              "--dtype", "bf16", "--tag", tag], 270),
        Step("level-db", "SparseGPT level database of the default model built on the GPU",
             [sys.executable, "-m", "bench.level_db", "--build", "--device", "cuda", "--tag", tag], 60),
        Step("prune", "final SparseGPT pass of the default model, blocks offloaded to the host",
             [*SPARSEALLOC, "prune", "--sparsity", "0.5", "--pruner", "sparsegpt", "--device", "cuda",
              "--offload", "on", "--no-progress", "--out", str(work / "prune")], 60),
        Step("search", "make demo's search on the default model, one GPU actor",
             [*SPARSEALLOC, "search", *demo_flags(), "--gpu-actors", "--actors", "1", "--no-progress", "--out",
              str(work / "search")], 150),
    ]


def run_step(step: Step) -> dict:
    """Run one step under its limit; its outcome, seconds and last lines of output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True, timeout=step.limit_s)
        outcome = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        outcome = f"timed out after {step.limit_s} s"
        output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
    return {"outcome": outcome, "seconds": time.perf_counter() - start, "tail": output.strip().splitlines()[-15:]}


def findings(step: Step, work: Path, tag: str) -> list[str]:
    """What a successful step measured, read from the files it wrote."""
    if step.name == "scale":
        return _section(RESULTS / f"scale-{tag}.md")
    if step.name == "level-db":
        return [line for line in _section(RESULTS / f"level-db-{tag}.md") if line.startswith("Built")]
    if step.name == "prune":
        metrics = json.loads((work / "prune" / "metrics.json").read_text())
        keys = ("dense_perplexity", "pruned_perplexity", "achieved_sparsity", "offload", "device_name", "dtype",
                "timings")
        return [f"- {key}: {metrics[key]}" for key in keys if key in metrics]
    summary = json.loads((work / "search" / "summary.json").read_text())
    keys = ("winner", "winner_test_perplexity", "atp_test_perplexity", "uniform_test_perplexity",
            "dense_test_perplexity", "device", "dtype", "timings")
    return [f"- {key}: {summary[key]}" for key in keys if key in summary]


def _section(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:] if path.exists() else [f"({path.name} was not written)"]


def device_tag(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``: the device's name as a file-name tag."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", choices=("scale", "level-db", "prune", "search"),
                        default=["scale", "level-db", "prune", "search"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run this on a machine with an "
              "NVIDIA GPU and a CUDA build of torch. Nothing was written.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    tag = device_tag(name)
    command = "python -m bench.gpu_check " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [f"# GPU check on {name}", "", f"Command: `{command.strip()}`", "",
             f"Machine: {name}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; torch "
             f"{torch.__version__}, CUDA {torch.version.cuda}; date {time.strftime('%Y-%m-%d')}.", ""]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for step in (s for s in steps(work, tag) if s.name in args.steps):
            print(f"[gpu check] {step.name}: {step.what} (at most {step.limit_s} s)", flush=True)
            result = run_step(step)
            lines += [f"## {step.name}: {step.what}", "", f"{result['outcome']} in {result['seconds']:.0f} s: "
                      f"`{' '.join(shlex.quote(word) for word in step.command[1:])}`", ""]
            if result["outcome"] == "ok":
                lines += findings(step, work, tag)
            else:
                lines += ["```", *result["tail"], "```"]
            lines.append("")
    path = RESULTS / f"gpu-{tag}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
