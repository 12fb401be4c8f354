"""Copying a node's files to the driver's run directory: hard links when the task ran on the driver's
node, else reads through Ray tasks pinned to that node, in chunks (no node shares a disk)."""

from __future__ import annotations

import os
import shutil
from collections import deque
from pathlib import Path

import ray

from core.errors import SparseAllocError

CHUNK_BYTES = 64 << 20  # bytes per read when a winner's files come from another node


def _list_files(root: str) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every file under ``root``."""
    base = Path(root)
    if not base.is_dir():
        raise SparseAllocError(f"{root} is not on node {ray.get_runtime_context().get_node_id()}")
    return [(str(p.relative_to(base)), p.stat().st_size) for p in sorted(base.rglob("*")) if p.is_file()]


def _read_chunk(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def fetch_directory(node_id: str, src: Path, dst: Path, chunk_bytes: int = CHUNK_BYTES, skip: tuple = (),
                    in_flight: int = 4) -> None:
    """Copy the files under ``src`` on node ``node_id`` to ``dst`` here, read through Ray tasks pinned to
    that node, ``chunk_bytes`` at a time (a few reads in flight)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pinned = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    lister = ray.remote(num_cpus=0)(_list_files).options(scheduling_strategy=pinned)
    reader = ray.remote(num_cpus=0)(_read_chunk).options(scheduling_strategy=pinned)
    for relative, size in ray.get(lister.remote(str(src))):
        if relative in skip:
            continue
        target = Path(dst) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            pending: deque = deque()
            for offset in range(0, size, chunk_bytes):
                pending.append(reader.remote(str(Path(src) / relative), offset, chunk_bytes))
                if len(pending) >= in_flight:
                    handle.write(ray.get(pending.popleft()))
            while pending:
                handle.write(ray.get(pending.popleft()))


def copy_local(src: Path, dst: Path, skip: tuple = ()) -> None:
    """Hard-link (else copy) every file under ``src`` into ``dst``: the finalist's directory stays for
    ``--resume`` without a second copy of the weights on disk."""
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if not path.is_file() or str(relative) in skip:
            continue
        target = dst / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


