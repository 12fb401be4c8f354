"""The local cache every command shares: ``$SPARSEALLOC_CACHE`` (default ``~/.cache/sparsealloc``).

It holds the default assets (wheels, the converted default model), fetched hub models, dense
perplexities and SparseGPT level databases; each node of a cluster has its own.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SPARSEALLOC_CACHE``, default ``~/.cache/sparsealloc``."""
    root = os.environ.get("SPARSEALLOC_CACHE") or Path.home() / ".cache" / "sparsealloc"
    return Path(root).expanduser()
