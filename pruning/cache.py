"""The local cache every command shares: ``$SPARSEALLOC_CACHE`` (default ``~/.cache/sparsealloc``).

It holds the default assets (wheels, the converted default model), fetched hub models, dense
perplexities and SparseGPT level databases. Each node of a cluster has its own, filled by the run
itself: every fill happens under :func:`cache_lock`, so any number of actors on a node (or nodes on a
shared cache) may ask for the same entry at once and it is made once, the others waiting for it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$SPARSEALLOC_CACHE``, default ``~/.cache/sparsealloc``."""
    root = os.environ.get("SPARSEALLOC_CACHE") or Path.home() / ".cache" / "sparsealloc"
    return Path(root).expanduser()


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold the cache's lock for entry ``name`` (``cache_root()/locks/<name>.lock``, ``fcntl.flock``):
    one process fills an entry while the others wait, then find it filled. The kernel releases the
    lock of a process that dies, so a killed fill never blocks the next one."""
    path = cache_root() / "locks" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process filling %s in %s", name, cache_root())
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
