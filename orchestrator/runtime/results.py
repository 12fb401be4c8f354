"""Append-only results table: every evaluation is a row, written as soon as it arrives.

The table is a parquet dataset in ``RUN_DIR/results/``: one part file per write (one row from
``append``, a batch from ``append_many``), named ``part-<run_id>-<time_ns>-<uuid4 hex>.parquet`` so
that no write can ever land on an existing part (a missing part never shifts the names of the next
ones). Each part is written under a hidden temporary name (``.tmp-…``) and renamed into place, so an
interrupted run loses nothing already written and a half-written file is never read: readers take
only ``part-*.parquet`` files, and a plain ``pyarrow.dataset.dataset(RUN_DIR / "results")`` skips the
hidden temporaries too. A resumed run reads the table back and answers repeated requests from it
instead of re-evaluating. A key is meant to be evaluated exactly once; a duplicate (a bug) is kept in
the files and reported by ``duplicate_keys`` rather than hidden.

Every part records the run's identity key in its metadata, so a run whose ``config.json`` was lost
can be recognised from its rows. A part that cannot be read (a crash mid-write on a filesystem
without atomic renames, a disk error) is named: readers refuse it, and the writer of a resumed run
sets it aside into ``results/quarantine/`` and evaluates its keys again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import SparseAllocError

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("run_id", pa.string()), ("driver", pa.string()), ("key", pa.string()), ("params", pa.string()),
    ("sparsities", pa.list_(pa.float64())), ("nm", pa.string()), ("fitness", pa.float64()),
    ("tokens", pa.int64()), ("draw", pa.int64()), ("metric", pa.string()), ("seconds", pa.float64()),
    ("node", pa.string()), ("actor", pa.string()), ("timestamp", pa.float64()),
])

PART_GLOB = "part-*.parquet"
TEMP_PREFIX = ".tmp-"  # leading dot: ignored by pyarrow.dataset's default ignore_prefixes
QUARANTINE = "quarantine"
IDENTITY_KEY = b"sparsealloc.identity"  # the run identity's cache key, in every part's metadata


class UnreadablePart(SparseAllocError):
    """A results part that cannot be read."""


def part_files(results_dir: Path) -> list[Path]:
    """The finished parts of a results directory (temporaries and ``.partial`` leftovers excluded)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    return sorted(p for p in results_dir.glob(PART_GLOB) if p.is_file())


def read_part(path: Path) -> pa.Table:
    """One part, or :class:`UnreadablePart` naming it and the cause."""
    try:
        table = pq.read_table(path)
        if table.schema.remove_metadata() != SCHEMA:
            raise ValueError(f"columns {table.schema.names}, expected {SCHEMA.names}")
        return table
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UnreadablePart(f"results part {path} is unreadable ({_first_line(exc)}); `sparsealloc search "
                             f"--resume` sets it aside into {path.parent / QUARANTINE}/ and evaluates its rows "
                             "again") from exc


def read_parts(results_dir: Path, quarantine: bool = False) -> list[pa.Table]:
    """Every part of a results directory; an unreadable one raises (``quarantine``: is moved into
    ``quarantine/`` with a warning instead)."""
    tables = []
    for part in part_files(results_dir):
        try:
            tables.append(read_part(part))
        except UnreadablePart as exc:
            if not quarantine:
                raise
            aside = Path(results_dir) / QUARANTINE / part.name
            aside.parent.mkdir(exist_ok=True)
            os.replace(part, aside)
            log.warning("%s; moved to %s, its rows will be evaluated again", str(exc).split("; ")[0], aside)
    return tables


def read_results_dir(results_dir: Path, columns: list[str] | None = None, quarantine: bool = False) -> pa.Table:
    """Every row of a results directory as one Arrow table, sorted by timestamp (stable). Creates
    nothing; an absent or empty directory gives an empty table. Unreadable parts: see :func:`read_parts`."""
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    tables = [table.replace_schema_metadata(None) for table in read_parts(results_dir, quarantine)]
    if not tables:
        return schema.empty_table()
    wanted = list(schema.names) if "timestamp" in schema.names else [*schema.names, "timestamp"]
    table = pa.concat_tables(tables).select(wanted).sort_by("timestamp")
    return table.select(schema.names)


def identity_keys(results_dir: Path) -> set[str]:
    """The run identity keys the parts record (``""`` for a part from before they did)."""
    return {(pq.read_schema(p).metadata or {}).get(IDENTITY_KEY, b"").decode() for p in part_files(results_dir)}


class ResultsTable:
    """Rows of one run directory, keyed by the evaluation key (profile, fidelity, metric)."""

    def __init__(self, run_dir: Path, run_id: str, identity_key: str = "") -> None:
        """The table of ``run_dir``; rows it writes record ``run_id`` and, in their part's metadata,
        ``identity_key``. Parts that cannot be read are set aside (see :func:`read_parts`)."""
        self.dir = Path(run_dir) / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.identity_key = identity_key
        self._tag = re.sub(r"[^A-Za-z0-9_-]", "_", run_id) or "run"
        self._rows: dict[str, dict] = {}
        for row in read_results_dir(self.dir, quarantine=True).to_pylist():
            self._rows.setdefault(row["key"], row)  # a duplicate (a bug) keeps the first answer

    def read_table(self) -> pa.Table:
        """Every row written so far (all runs in this directory), duplicates included, by timestamp."""
        return read_results_dir(self.dir)

    def read(self) -> list[dict]:
        """Every row written so far (all runs in this directory), duplicates included, by timestamp."""
        return self.read_table().to_pylist()

    def duplicate_keys(self) -> list[str]:
        """Keys written more than once (read from the files; always empty unless something re-evaluated)."""
        keys = read_results_dir(self.dir, ["key"]).column("key").to_pylist()
        return sorted(key for key, count in Counter(keys).items() if count > 1)

    def rows(self):
        """The rows read back and written so far, one per key."""
        return self._rows.values()

    def __len__(self) -> int:
        """Distinct keys (``len(read())`` counts rows, duplicates included)."""
        return len(self._rows)

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def append(self, row: dict) -> dict:
        """Write one evaluation as one part (fields of SCHEMA; run_id and timestamp filled in)."""
        return self.append_many([row])[0]

    def append_many(self, rows: list[dict]) -> list[dict]:
        """Write a batch of evaluations as one part; nothing is written for an empty batch."""
        if not rows:
            return []
        now = time.time()
        rows = [self._normalize(row, now) for row in rows]
        table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({IDENTITY_KEY: self.identity_key.encode()}))
        name = f"part-{self._tag}-{time.time_ns()}-{uuid.uuid4().hex}.parquet"
        final = self.dir / name
        temp = self.dir / f"{TEMP_PREFIX}{name}"  # not core.identity's writer: a part must never replace another
        pq.write_table(table, temp)
        if final.exists():  # never replace a written part (unique names make this unreachable)
            temp.unlink()
            raise FileExistsError(f"results part {final} already exists; refusing to overwrite it")
        os.replace(temp, final)
        for row in rows:
            if row["key"] in self._rows:
                log.warning("results key written twice (a re-evaluation): %s", row["key"])
            self._rows.setdefault(row["key"], row)
        return rows

    def _normalize(self, row: dict, now: float) -> dict:
        row = {**row, "run_id": self.run_id, "timestamp": now}
        row["params"] = row["params"] if isinstance(row.get("params"), str) else json.dumps(row.get("params") or {})
        row["nm"] = row["nm"] if isinstance(row.get("nm"), str) or row.get("nm") is None else json.dumps(row["nm"])
        return row


# --- the `sparsealloc results` view -------------------------------------------------------------

COLUMNS = ("driver", "key", "tokens", "draw", "trial", "metric", "fitness", "seconds", "actor", "node")


def load_run_results(run: Path) -> pa.Table:
    """The rows of a run directory (or of its ``results/`` folder itself), by timestamp; creates nothing.
    Raises SparseAllocError when there are none."""
    run = Path(run)
    results_dir = run if run.name == "results" and part_files(run) else run / "results"
    table = read_results_dir(results_dir)
    if table.num_rows == 0:
        if not run.exists():
            raise SparseAllocError(f"{run} does not exist; run `sparsealloc search --out {run}` first, then point "
                                   "`sparsealloc results` at that directory")
        raise SparseAllocError(f"{run} holds no results yet ({results_dir}/{PART_GLOB}): the search stopped before "
                               f"its first evaluation; continue it with {resume_hint(run)}")
    return table


def resume_hint(run: Path) -> str:
    """How to continue the search in ``run``: its command with ``--resume``, as ``config.json`` records
    it, else a generic one."""
    try:
        command = json.loads((Path(run) / "config.json").read_text())["resume_command"]
    except (OSError, ValueError, KeyError, TypeError):
        command = f"sparsealloc search --out {run} --resume (with the flags it was started with)"
    return f"`{command}`"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def key_summary(row: dict) -> str:
    """A short stand-in for a row's key: an 8-hex digest (equal keys, equal digests) and the profile's
    mean, min and max sparsity (``n:m`` when it has N:M patterns)."""
    import hashlib

    digest = hashlib.sha1(row["key"].encode()).hexdigest()[:8]
    sparsities = row.get("sparsities") or []
    if not sparsities:
        return digest
    mean = sum(sparsities) / len(sparsities)
    nm = " n:m" if row.get("nm") not in (None, "null") else ""
    return f"{digest} {mean:.3f} [{min(sparsities):.2f}-{max(sparsities):.2f}]{nm}"


def trial_rung(row: dict) -> str:
    """``TRIAL@RUNG`` for a row a Tune trial asked for (its id and fidelity rung), else ``-``."""
    try:
        params = json.loads(row.get("params") or "{}") if isinstance(row.get("params"), str) else row["params"]
    except (ValueError, KeyError):
        return "-"
    if not isinstance(params, dict) or "trial" not in params:
        return "-"
    return f"{params['trial']}@{params.get('rung', '?')}"


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of rows (the `sparsealloc results` view)."""
    def cells(row: dict) -> list[str]:
        tokens = "all" if row["tokens"] is None or row["tokens"] < 0 else str(row["tokens"])
        fitness = "-" if row["fitness"] is None else f"{row['fitness']:.6g}"
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.3f}"
        node = (row["node"] or "-")[:12]
        return [row["driver"] or "-", key_summary(row), tokens, str(row["draw"]), trial_rung(row),
                row["metric"] or "-", fitness, seconds, row["actor"] or "-", node]

    body = [cells(row) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(COLUMNS)]
    right = {"tokens", "draw", "fitness", "seconds"}
    lines = ["  ".join(h.rjust(w) if h in right else h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip()]
    for r in body:
        lines.append("  ".join(c.rjust(w) if h in right else c.ljust(w)
                               for h, c, w in zip(COLUMNS, r, widths)).rstrip())
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """Every column of SCHEMA, one line per row; ``sparsities`` as a JSON list."""
    import csv

    try:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SCHEMA.names)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "sparsities": json.dumps(row["sparsities"])})
    except OSError as exc:
        raise SparseAllocError(f"cannot write --csv {path}: {exc}") from exc
