"""What a stored result depends on, and how it is written: the package's version, content
fingerprints of token windows, one cache-key function and one atomic writer.

Every record that a later run may reuse (dense perplexities, level databases, sensitivities,
final passes, run identities) is keyed with these, so two runs agree on what "the same" means.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

PACKAGE = "sparsealloc"
KEY_LENGTH = 20  # hex digits of a cache key or fingerprint (80 bits)


@lru_cache(maxsize=1)
def package_version() -> str:
    """sparsealloc's version from its installed metadata (``0+unknown`` when run from a bare checkout)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def versions() -> dict:
    """The versions that can change a number: Python, torch, transformers and sparsealloc."""
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "sparsealloc": package_version()}


def fingerprint(tensor) -> str:
    """A content hash of a tensor: its dtype, shape and bytes (equal windows, equal fingerprints)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}:".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:KEY_LENGTH]


def plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, paths strings), for comparing records."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_key(identity: dict) -> str:
    """The key of a record computed from ``identity`` (any JSON-able mapping)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error, removed otherwise. A reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_file(path) as temp, open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
