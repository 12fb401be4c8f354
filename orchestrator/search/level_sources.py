"""Level sources, registered once: what gives the evaluator a block's linears at a level.

- ``wanda``: rank tables from Wanda scores, built by every actor from the calibration windows (masks
  just in time; the kl-seq fitness rebuilds them per profile from its sequential activations);
- ``sparsegpt-db``: the SparseGPT level database (:mod:`scoring.level_db`), built once per model,
  calibration windows, dtype and grid in ``$SPARSEALLOC_CACHE/level-db/<key>/`` and memory-mapped by
  every actor, so that ``--pruner sparsegpt`` is searched with SparseGPT's own weights.

``auto`` is the database for ``--pruner sparsegpt`` and the rank tables otherwise. The database is
built in the driver process on ``--device`` (blocks visiting it one at a time from the host) and must
be on a path every actor can read (one machine, or a shared ``SPARSEALLOC_CACHE``).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import SparseAllocError

if TYPE_CHECKING:
    import torch

    from orchestrator.search.run import SearchConfig

log = logging.getLogger(__name__)

LEVEL_SOURCES = {
    "wanda": "Wanda rank tables (masks just in time; kl-seq refreshes them per profile)",
    "sparsegpt-db": "SparseGPT-pruned weights per level, built once, stored as safetensors, memory-mapped",
}
DB_STEP = 0.05  # the database grid's spacing
DB_SPAN = 0.2  # and its reach on either side of the target


def resolve_level_source(source: str, pruner: str, nm_m: int | None) -> str:
    """``auto`` → the database for SparseGPT (unstructured), else the rank tables; checks the name."""
    if source == "auto":
        return "sparsegpt-db" if pruner == "sparsegpt" and nm_m is None else "wanda"
    if source not in LEVEL_SOURCES:
        raise SparseAllocError(f"unknown --level-source {source!r}; choose auto or one of {', '.join(LEVEL_SOURCES)}")
    if source == "sparsegpt-db" and nm_m is not None:
        raise SparseAllocError("the SparseGPT level database holds unstructured levels; drop --nm-m or use "
                               "--level-source wanda")
    return source


def database_levels(target: float, levels: tuple[float, ...] | None = None) -> list[float]:
    """The database grid: ``levels`` when given, else every ``DB_STEP`` within ``DB_SPAN`` of ``target``
    (inside (0, 0.99]); the target itself is always a level (added to ``levels`` when missing)."""
    if levels:
        grid = sorted({round(float(level), 6) for level in (*levels, target)})
        if len(grid) < 2 or grid[0] <= 0 or grid[-1] >= 1:
            raise SparseAllocError(f"--db-levels needs at least one level besides --sparsity {target}, all in "
                                   f"(0, 1); got {list(levels)}")
        return grid
    steps = round(DB_SPAN / DB_STEP)
    grid = {round(target + i * DB_STEP, 6) for i in range(-steps, steps + 1)}
    return sorted(level for level in grid if 0 < level <= 0.99)


def database_identity(config: "SearchConfig", calibration: "torch.Tensor", levels: list[float],
                      device: str) -> dict:
    """What the database depends on: model weights, calibration windows, dtype, the device type it is
    built on, grid, storage format and code version."""
    from core.identity import fingerprint, package_version
    from scoring.dense_cache import model_identity
    from scoring.level_db import FORMAT

    model = model_identity(config.model) or {"spec": config.model}
    return {"model": model, "calibration": fingerprint(calibration), "dtype": config.dtype,
            "device": device, "levels": levels, "batch_size": config.batch_size, "format": FORMAT,
            "version": package_version()}


def ensure_database(config: "SearchConfig", calibration: "torch.Tensor") -> Path:
    """The SparseGPT level database for ``config``: reused from the cache when one was built with the
    same identity, else built now (logging its size and time)."""
    import torch

    from core.identity import cache_key
    from pruning.cache import cache_root
    from pruning.load import load_model, pick_device, pick_dtype
    from pruning.offload import move_non_blocks
    from scoring.level_db import build_level_database, database_bytes

    levels = database_levels(config.sparsity, config.db_levels)
    device = pick_device("cpu" if config.device == "cpu" else "auto")
    if config.device == "cuda" and device.type != "cuda":
        log.warning("the SparseGPT level database is built in this process, which sees no GPU: building on the "
                    "CPU (slow for large models); run the search from a GPU node to build it there")
    identity = database_identity(config, calibration, levels, device.type)
    key = cache_key(identity)
    path = cache_root() / "level-db" / key
    if (path / "levels.json").exists():
        log.info("SparseGPT level database reused from %s", path)
        return path
    model, _ = load_model(config.model, pick_dtype(config.dtype, device))
    move_non_blocks(model, device)  # the blocks stay on the host and visit the device one at a time
    size = database_bytes(model, levels)
    log.info("building the SparseGPT level database: %d levels, %.2f GiB, in %s", len(levels), size / 2**30, path)
    try:
        with torch.no_grad():
            db = build_level_database(model, calibration, levels, path, device, identity, config.batch_size,
                                      config.progress)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the actors planned this GPU's memory without us
    log.info("SparseGPT level database built in %.0f s", db.seconds)
    return path


__all__ = ["LEVEL_SOURCES", "database_identity", "database_levels", "ensure_database", "resolve_level_source"]
