"""Run directories: checked before any work (writable, room on the disk), opened by one writer at a
time (:mod:`orchestrator.runtime.lock`), created with the identity of the run (or, on resume, checked
against it), and never holding a half result (outputs are written aside, then renamed into place).
Every file read back names itself when it cannot be read, with what to do."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import SparseAllocError
from core.identity import cache_key, write_json
from orchestrator.runtime.lock import LOCK_NAME, RunLock

log = logging.getLogger(__name__)


def check_output(out: Path, overwrite: bool) -> None:
    """Raise if ``out`` holds something (its lock file aside) and ``overwrite`` was not asked for."""
    if out.exists() and not out.is_dir():
        raise SparseAllocError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise SparseAllocError(f"--out {out} is not empty; pass --overwrite to replace it, --resume to continue the "
                               "run it holds, or choose another path")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Refuse, before any work, an ``out`` this process cannot write: a file is created and removed in
    ``out`` or, when it does not exist yet, in its nearest existing ancestor (nothing is left)."""
    where = existing_ancestor(out)
    probe = where / f".sparsealloc-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SparseAllocError(f"--out {out} cannot be written ({where}: {exc.strerror or exc}); choose a writable "
                               "path") from None


def check_free_space(out: Path, need: int, what: str) -> None:
    """Refuse, before any work, a run whose outputs (``need`` bytes: ``what``) do not fit the disk of ``out``."""
    free = shutil.disk_usage(existing_ancestor(out)).free
    if need > free:
        raise SparseAllocError(f"{what} need {need / 2**30:.2f} GiB on the disk of {out}, which has {free / 2**30:.2f} "
                               "GiB free; free some space or choose another --out")


def read_record(path: Path, fix: str) -> dict:
    """A JSON record of a run directory; an unreadable one is an error naming it and ``fix``."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as exc:
        raise SparseAllocError(f"{path} is unreadable ({exc}); {fix}") from None


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


def lock_run_dir(out: Path, what: str, resume: bool, overwrite: bool) -> RunLock:
    """The lock of run directory ``out`` (``what``: how messages name it), taken now: ``out`` must be
    empty unless the run is resumed or overwritten, and no other process may hold it."""
    check_output(Path(out), overwrite or resume)
    return RunLock(Path(out) / LOCK_NAME, f"{what} {out}").acquire()


def open_run_dir(out: Path, identity: dict, record: dict, resume: bool, overwrite: bool) -> str:
    """The run id of the locked run directory ``out`` (:func:`lock_run_dir`).

    A new run: ``out`` (with ``overwrite``: emptied, its lock kept) gets ``config.json`` with a new run
    id, ``identity`` and ``record``. ``resume``: ``out`` must hold a run of the same identity (the fields
    that differ are named). Its ``config.json`` lost or unreadable is rebuilt from this command when the
    results table's parts record the same identity, and refused otherwise."""
    out = Path(out)
    stored = out / "config.json"
    key = cache_key(identity)
    if resume:
        run_id, rebuilt = _resumed_run_id(out, stored, identity, key)
        if rebuilt:
            write_json(stored, {"run_id": run_id, "identity": identity, "identity_key": key, **record})
        return run_id
    if overwrite:
        clear_run_dir(out)
    run_id = uuid.uuid4().hex[:12]
    write_json(stored, {"run_id": run_id, "identity": identity, "identity_key": key, **record})
    return run_id


def clear_run_dir(out: Path) -> None:
    """Remove everything in the locked run directory ``out`` but its lock file (``--overwrite``)."""
    for path in out.iterdir():
        if path.name != LOCK_NAME:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _resumed_run_id(out: Path, stored: Path, identity: dict, key: str) -> tuple[str, bool]:
    """(run id, rebuilt): the run to continue is ``config.json``'s, after checking its identity; or, with
    it lost or unreadable, the results table's when its parts record ``key`` (``config.json`` is then
    to be rebuilt)."""
    from orchestrator.runtime.results import identity_keys, read_results_dir

    try:
        previous = read_record(stored, "") if stored.exists() else None
    except SparseAllocError as exc:
        log.warning("%s", str(exc).rstrip("; "))
        previous = None
    if previous is not None:
        if previous.get("identity") != identity:
            changed = [k for k in identity if (previous.get("identity") or {}).get(k) != identity[k]]
            raise SparseAllocError(f"--resume with different settings ({', '.join(changed)}); rerun the same command")
        return previous["run_id"], False
    keys = identity_keys(out / "results")
    state = "unreadable" if stored.exists() else "missing"
    if not keys:
        raise SparseAllocError(f"--resume: {out} holds no search (no config.json, no results); run without --resume "
                               "first")
    if keys != {key}:
        why = "records no identity (written by an older version)" if "" in keys else "was made with other settings"
        raise SparseAllocError(f"--resume: {stored} is {state} and the results table {why}, so its rows cannot be "
                               f"trusted for this command; rerun the original command with --resume, or start a new "
                               f"run directory")
    rows = read_results_dir(out / "results", ["run_id"]).column("run_id").to_pylist()
    log.warning("%s was %s; rebuilt from this command, whose settings the results table's %d rows record", stored,
                state, len(rows))
    return rows[-1], True


def model_slug(model: str) -> str:
    """A file-name-safe name for ``model`` (a hub id, a path or ``default``)."""
    return slug(model)


def slug(text: str) -> str:
    """A file-name-safe name for ``text``: its last two path components, other characters replaced."""
    tail = str(text).rstrip("/").split("/")[-2:] if "/" in str(text) else [str(text)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(tail)) or "x"
