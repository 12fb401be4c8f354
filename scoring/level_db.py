"""A level source of SparseGPT-pruned weights: every linear of every block at every level of a grid,
computed once, stored as safetensors and memory-mapped (EvoPress-style database).

Built the way the final pass builds a uniform profile: for each level, block l's Hessians come from
the outputs of blocks 0..l−1 pruned at that same level (one hidden-state stream per level, all levels
advanced together block by block), so a uniform profile's weights are exactly the final SparseGPT
pass's (tested). A mixed profile takes each block's weights from its level's stream: the blocks are
the real pass's for uniform neighbours, an approximation in between (as EvoPress's database is).

Layout of ``DIR``: ``levels.json`` (the grid, the identity of what built it — model, calibration
digest, dtype, code version — and its bytes) and one ``block-NNNN.safetensors`` per block holding
``<linear>@<level index>`` tensors in the model's dtype. A reader opens the files with
``safetensors.safe_open`` (memory-mapped) and copies one tensor out when a level is asked for.

Size: levels × prunable weights × dtype bytes; :func:`database_bytes` gives it before anything is
built, and :func:`build_level_database` refuses, naming the numbers, when the disk has less free.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.errors import SparseAllocError
from pruning.capture import capture_block_inputs, run_block, run_block_observing
from pruning.load import find_blocks, find_linears
from pruning.offload import onloaded, to_device
from pruning.pruners import Hessian, sparsegpt_prune

log = logging.getLogger(__name__)

INDEX = "levels.json"
FORMAT = 1  # bump when the build changes what is stored: part of every database's identity
GRID_STEP = 0.05  # the default grid's spacing
GRID_SPAN = 0.2  # and its reach on either side of the target


def _block_file(block: int) -> str:
    return f"block-{block:04d}.safetensors"


def database_bytes(model, levels: Sequence[float]) -> int:
    """Bytes a database of ``levels`` takes on disk for ``model`` (its linears' weights, once per level
    above 0; level 0 is the dense weight and is not stored)."""
    stored = sum(1 for level in levels if level > 0)
    return stored * sum(layer.weight.numel() * layer.weight.element_size()
                        for block in find_blocks(model) for layer in find_linears(block).values())


@torch.no_grad()
def build_level_database(model, calibration: torch.Tensor, levels: Sequence[float], out: Path,
                         device: torch.device, identity: dict, batch_size: int = 4,
                         progress: bool = True) -> "LevelDatabase":
    """SparseGPT-prune every linear of ``model`` at every level of ``levels`` (sorted, distinct, in [0, 1))
    on ``calibration`` windows and store the weights under ``out`` (written to ``out.partial`` first and
    renamed when complete); the model's weights are left as they were. ``identity``: what the database
    depends on besides the grid (model, data, dtype …), kept in its index and checked on reuse. The
    non-block parts must be on ``device``; blocks kept elsewhere (the host) are moved there one at a
    time, so the device holds one block, its Hessians and one hidden-state stream per level."""
    grid = sorted({float(level) for level in levels})
    if not grid or grid[0] < 0 or grid[-1] >= 1:
        raise SparseAllocError(f"database levels must lie in [0, 1), got {list(levels)}")
    out = Path(out)
    need = database_bytes(model, grid)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise SparseAllocError(
            f"the SparseGPT level database for {len([g for g in grid if g > 0])} levels needs {need / 2**30:.2f} GiB "
            f"but {out.parent} has {free / 2**30:.2f} GiB free; use fewer levels or point the cache elsewhere")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, calibration, batch_size, device)
    streams = {k: captured.hidden for k, level in enumerate(grid) if level > 0}  # one stream per pruned level
    for index in tqdm(range(len(blocks)), desc="sparsegpt level database", unit="block", disable=not progress):
        calls = to_device(captured.calls[index], device)
        tensors: dict[str, torch.Tensor] = {}
        with onloaded(blocks[index], device) as block:  # a block kept on the host visits the device
            linears = find_linears(block)
            dense = {name: layer.weight.data for name, layer in linears.items()}
            for k, hidden in streams.items():
                stats, _ = run_block_observing(block, linears, lambda l: Hessian(l.in_features, device), hidden,
                                               calls)
                pruned = {name: sparsegpt_prune(dense[name], stats[name].matrix, grid[k]) for name in linears}
                del stats
                try:
                    for name, layer in linears.items():
                        layer.weight.data = pruned[name]
                    streams[k] = run_block(block, hidden, calls)
                finally:
                    for name, layer in linears.items():
                        layer.weight.data = dense[name]
                tensors.update({f"{name}@{k}": w.detach().cpu().contiguous() for name, w in pruned.items()})
        save_file(tensors, str(partial / _block_file(index)))
    record = {"levels": grid, "blocks": len(blocks), "identity": json.loads(json.dumps(identity)), "bytes": need,
              "seconds": time.perf_counter() - started}
    (partial / INDEX).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return LevelDatabase(out)


class LevelDatabase:
    """A built database, memory-mapped: ``weight(block, name, sparsity)`` is that linear at that level."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            record = json.loads((self.path / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SparseAllocError(f"{self.path} holds no complete level database ({INDEX} unreadable: {exc}); "
                                   "build it again") from exc
        self.levels: list[float] = [float(level) for level in record["levels"]]
        self.identity: dict = record["identity"]
        self.bytes: int = int(record["bytes"])
        self.seconds: float = float(record.get("seconds", 0.0))
        self._files = [safe_open(str(self.path / _block_file(b)), framework="pt") for b in range(record["blocks"])]

    @property
    def num_blocks(self) -> int:
        return len(self._files)

    def level_index(self, sparsity: float) -> int:
        """The index of ``sparsity`` on the grid (it must be one of the levels, within 1e-9)."""
        for index, level in enumerate(self.levels):
            if abs(level - sparsity) <= 1e-9:
                return index
        raise SparseAllocError(f"sparsity {sparsity:.6g} is not a level of the database ({self.levels}); "
                               "search on its grid")

    def nearest(self, sparsity: float) -> float:
        """The level closest to ``sparsity`` among the stored ones and 0 (dense): where a block off the grid
        is scored; a tie goes to the sparser level (never flattering)."""
        candidates = [0.0, *(level for level in self.levels if level > 0)]
        return min(candidates, key=lambda level: (abs(level - sparsity), -level))

    def weight(self, block: int, name: str, sparsity: float) -> torch.Tensor:
        """The linear ``name`` of block ``block`` pruned at ``sparsity`` (a grid level above 0), read from
        the memory-mapped file."""
        return self._files[block].get_tensor(f"{name}@{self.level_index(sparsity)}")


def database_levels(target: float, levels: tuple[float, ...] | None = None) -> list[float]:
    """The database grid: ``levels`` when given, else every ``GRID_STEP`` within ``GRID_SPAN`` of
    ``target`` (inside (0, 0.99]); the target itself is always a level (added to ``levels`` when missing)."""
    if levels:
        grid = sorted({round(float(level), 6) for level in (*levels, target)})
        if len(grid) < 2 or grid[0] <= 0 or grid[-1] >= 1:
            raise SparseAllocError(f"--db-levels needs at least one level besides --sparsity {target}, all in "
                                   f"(0, 1); got {list(levels)}")
        return grid
    steps = round(GRID_SPAN / GRID_STEP)
    grid = {round(target + i * GRID_STEP, 6) for i in range(-steps, steps + 1)}
    return sorted(level for level in grid if 0 < level <= 0.99)


def ensure_database(model_spec: str, calibration: torch.Tensor, levels: list[float], dtype: str,
                    device: torch.device, batch_size: int = 4, progress: bool = True) -> Path:
    """The database of ``model_spec`` at ``levels`` on ``calibration``, in ``dtype``, built on ``device``:
    reused from ``$SPARSEALLOC_CACHE/level-db/<key>`` when one was built with the same identity (model
    weights, calibration windows, dtype, the device type it is built on, grid, format, code version),
    else built now (the blocks visit ``device`` one at a time from the host)."""
    from core.identity import cache_key, fingerprint, package_version
    from pruning.cache import cache_lock, cache_root
    from scoring.dense_cache import model_identity

    identity = {"model": model_identity(model_spec) or {"spec": model_spec}, "calibration": fingerprint(calibration),
                "dtype": dtype, "device": device.type, "levels": levels, "batch_size": batch_size, "format": FORMAT,
                "version": package_version()}
    path = cache_root() / "level-db" / cache_key(identity)
    with cache_lock(f"level-db-{path.name}"):  # one build per node; the others wait for it
        if (path / INDEX).exists():
            log.info("SparseGPT level database reused from %s", path)
            return path
        return _build(model_spec, calibration, levels, dtype, device, batch_size, progress, identity, path)


def _build(model_spec: str, calibration: torch.Tensor, levels: list[float], dtype: str, device: torch.device,
           batch_size: int, progress: bool, identity: dict, path: Path) -> Path:
    """:func:`ensure_database`'s build, under the cache lock."""
    import gc

    from pruning.load import load_model, pick_dtype
    from pruning.offload import move_non_blocks

    model, _ = load_model(model_spec, pick_dtype(dtype, device))
    move_non_blocks(model, device)  # the blocks stay on the host and visit the device one at a time
    log.info("building the SparseGPT level database: %d levels, %.2f GiB, in %s", len(levels),
             database_bytes(model, levels) / 2**30, path)
    try:
        db = build_level_database(model, calibration, levels, path, device, identity, batch_size, progress)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log.info("SparseGPT level database built in %.0f s", db.seconds)
    return path


__all__ = ["LevelDatabase", "build_level_database", "database_bytes", "database_levels", "ensure_database"]
