"""Run directories that never hold a half result: write aside, then rename into place."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import SparseAllocError


def check_output(out: Path, overwrite: bool) -> None:
    """Raise if ``out`` holds something and ``overwrite`` was not asked for."""
    if out.exists() and not out.is_dir():
        raise SparseAllocError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SparseAllocError(f"--out {out} is not empty; pass --overwrite to replace it or choose another path")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging directory beside ``out``; on success it replaces ``out``, on any error
    (Ctrl-C included) it is removed and ``out`` is left as it was."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
