"""Per-block sensitivities (Fisher traces, Shapley values, OWL ratios …) kept in the run directory.

``RUN/sensitivities/<name>.json`` holds the values, the identity of what produced them (model, data,
dtype, device type, windows … whatever the caller passes) and the seconds they took. A resumed run
reuses them when the identity matches, and refuses, naming the fields, when it does not: values
computed under other settings are never silently mixed into a run nor silently recomputed.
Files are written atomically (:func:`core.identity.write_atomic`), so a crash mid-write leaves either
the old file or none, never a half-written one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from core.errors import SparseAllocError
from core.identity import write_atomic

log = logging.getLogger(__name__)

FOLDER = "sensitivities"


def sensitivity_path(run_dir: Path, name: str) -> Path:
    """Where the values called ``name`` live in ``run_dir``."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise SparseAllocError(f"sensitivity name {name!r} must be a plain file name (no path separators)")
    return Path(run_dir) / FOLDER / f"{name}.json"


def _normalised(identity: dict) -> dict:
    """The identity as JSON gives it back (tuples become lists …), so stored and new compare alike."""
    try:
        return json.loads(json.dumps(identity, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise SparseAllocError(f"sensitivity identity must be JSON-serialisable: {exc}") from exc


_MISSING = object()


def _differing(stored: dict, current: dict) -> list[str]:
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k, _MISSING) != current.get(k, _MISSING))


def _describe(value: Any) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value)


def load_stored(run_dir: Path, name: str) -> dict | None:
    """The stored record (values, identity, seconds …), or None when there is none."""
    path = sensitivity_path(run_dir, name)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record.get("values"), list) or not isinstance(record.get("identity"), dict):
            raise ValueError("no values list or identity object")
    except (OSError, ValueError, AttributeError) as exc:
        raise SparseAllocError(f"{path} is unreadable ({exc}); delete it to compute the {name} values again") from exc
    return record


def load_or_compute(run_dir: Path, name: str, identity: dict, compute: Callable[[], list[float]]) -> list[float]:
    """The ``name`` values of this run: stored ones when their identity equals ``identity``, else
    ``compute()``'s, stored for next time. A stored identity that differs is refused (SparseAllocError
    naming the differing fields)."""
    path = sensitivity_path(run_dir, name)
    current = _normalised(identity)
    record = load_stored(run_dir, name)
    if record is not None:
        stored = record["identity"]
        changed = _differing(stored, current)
        if changed:
            details = ", ".join(f"{k}: stored {_describe(stored.get(k, _MISSING))}, now {_describe(current.get(k, _MISSING))}"
                                for k in changed)
            raise SparseAllocError(f"{path} holds {name} values computed with other settings ({details}); "
                                   "rerun with the original settings, or use a new run directory")
        log.info("reusing %s values from %s (computed in %.1f s)", name, path, record.get("seconds", 0.0))
        return [float(v) for v in record["values"]]
    start = time.perf_counter()
    values = [float(v) for v in compute()]
    seconds = time.perf_counter() - start
    record = {"name": name, "values": values, "identity": current, "seconds": seconds,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("stored %s values in %s (%.1f s)", name, path, seconds)
    return values
