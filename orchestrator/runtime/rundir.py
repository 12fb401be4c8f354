"""Run directories: created (or, on resume, checked against the identity they were made with), and
never holding a half result (outputs are written aside, then renamed into place)."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import SparseAllocError
from core.identity import write_json


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


def prepare_run_dir(out: Path, identity: dict, settings: dict, resume: bool, overwrite: bool) -> str:
    """Create the run directory ``out`` with its ``config.json`` (a new run id, ``identity``, ``settings``)
    and return the run id; with ``resume``, check that ``out`` holds a run of the same identity instead
    (naming the fields that differ) and return its run id."""
    stored = out / "config.json"
    if resume:
        if not stored.exists():
            raise SparseAllocError(f"--resume: {out} holds no search (no config.json); run without --resume first")
        previous = json.loads(stored.read_text())
        if previous["identity"] != identity:
            changed = [k for k in identity if previous["identity"].get(k) != identity[k]]
            raise SparseAllocError(f"--resume with different settings ({', '.join(changed)}); rerun the same command")
        return previous["run_id"]
    check_output(out, overwrite)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    write_json(stored, {"run_id": run_id, "identity": identity, "config": settings})
    return run_id


def model_slug(model: str) -> str:
    """A file-name-safe name for ``model`` (a hub id, a path or ``default``)."""
    return slug(model)


def slug(text: str) -> str:
    """A file-name-safe name for ``text``: its last two path components, other characters replaced."""
    tail = str(text).rstrip("/").split("/")[-2:] if "/" in str(text) else [str(text)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(tail)) or "x"
