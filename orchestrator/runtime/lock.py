"""One writer per run directory: an OS-level lock (``fcntl.flock``) on a lock file that names its
holder (host, PID, start time, command).

A second ``search``, ``sweep`` or ``prune`` on the same directory is refused at once, naming the
holder. The kernel releases a lock when its process dies (even by SIGKILL), so a lock file that still
names a holder but is not locked was left by a process that is gone: it is taken over, and said so.
On a shared filesystem the lock holds across nodes where the filesystem passes ``flock`` on (NFSv4,
Lustre, most FSx); where it does not, two nodes can both take it, so give each node its own run
directory there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from core.errors import SparseAllocError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLock:
    """The lock on ``path`` (the lock file), held from :meth:`acquire` until :meth:`release` (or the
    process ends)."""

    def __init__(self, path: Path, what: str, remove: bool = False) -> None:
        """``remove``: delete the lock file on release (a lock beside the directory it guards, which should
        leave nothing behind; removed before it is unlocked, so a process that opens it later makes a new one)."""
        self.path = Path(path)
        self.what = what  # the directory it guards, as messages name it
        self.remove = remove
        self._handle = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise SparseAllocError(f"cannot lock {self.what} ({self.path}: {exc.strerror})") from exc
            raise SparseAllocError(f"{self.what} is in use by {describe(holder_of(self.path))}; wait for it to "
                                   "end or stop it, then rerun (one process writes a run directory at a time)") from None
        previous = holder_of(self.path)
        if previous:
            log.warning("%s was locked by %s, which is gone; taking the lock over", self.what, describe(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def release(self) -> None:
        """Empty the lock file (no holder) and unlock it."""
        if self._handle is None:
            return
        if self.remove:
            self.path.unlink(missing_ok=True)
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(path: Path) -> dict:
    """What the lock file at ``path`` says of its holder ({} when none or unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    """``process 1234 on host-a (since …: sparsealloc search …)``."""
    if not holder:
        return "another process"
    since = f" since {holder['started']}" if holder.get("started") else ""
    command = f": {holder['command']}" if holder.get("command") else ""
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}{since}{command}"
