"""Append-only results table: every evaluation is a row, written as soon as it arrives.

The table is a parquet dataset in ``RUN_DIR/results/`` (one small part file per write, renamed
into place, so an interrupted run loses nothing already written). A resumed run reads it back and
answers repeated requests from it instead of re-evaluating.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("driver", pa.string()), ("key", pa.string()), ("params", pa.string()),
    ("sparsities", pa.list_(pa.float64())), ("nm", pa.string()), ("fitness", pa.float64()),
    ("tokens", pa.int64()), ("draw", pa.int64()), ("metric", pa.string()), ("seconds", pa.float64()),
    ("node", pa.string()), ("actor", pa.string()), ("timestamp", pa.float64()),
])


class ResultsTable:
    """Rows of one run directory, keyed by the evaluation key (profile, fidelity, metric)."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        self.dir = Path(run_dir) / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self._rows: dict[str, dict] = {row["key"]: row for row in self.read()}
        self._next_part = len(list(self.dir.glob("part-*.parquet")))

    def read(self) -> list[dict]:
        """Every row written so far (all runs in this directory)."""
        parts = sorted(self.dir.glob("part-*.parquet"))
        return [row for part in parts for row in pq.read_table(part, schema=SCHEMA).to_pylist()]

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def append(self, row: dict) -> dict:
        """Write one evaluation (fields of SCHEMA; run_id and timestamp filled in)."""
        row = {**row, "run_id": self.run_id, "timestamp": time.time()}
        row["params"] = row["params"] if isinstance(row.get("params"), str) else json.dumps(row.get("params") or {})
        row["nm"] = row["nm"] if isinstance(row.get("nm"), str) or row.get("nm") is None else json.dumps(row["nm"])
        table = pa.Table.from_pylist([row], schema=SCHEMA)
        final = self.dir / f"part-{self._next_part:06d}.parquet"
        partial = final.with_suffix(".partial")
        pq.write_table(table, partial)
        os.replace(partial, final)
        self._next_part += 1
        self._rows[row["key"]] = row
        return row
