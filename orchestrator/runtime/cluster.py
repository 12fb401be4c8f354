"""Joining or starting Ray for a run, and what the run needs to know of the cluster's nodes.

On a cluster the search runs as a Ray job (``ray job submit … -- sparsealloc search …``): the job's
``RAY_ADDRESS`` is the cluster it joins. Ray Client (``ray://``) is refused: the search moves files
between nodes and watches them, which a client connection does not support.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Iterator

import psutil
import ray

from core.errors import SparseAllocError

log = logging.getLogger(__name__)


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else the ``RAY_ADDRESS`` of the Ray job this runs in (None:
    start a local Ray)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise SparseAllocError(f"--address {address}: Ray Client (ray://) is not supported; submit the search as a "
                               "job instead (`ray job submit --address http://HEAD:8265 -- sparsealloc search …`, "
                               "which joins the cluster by itself), or run it on the head node with --address auto")
    return address


def init_ray(address: str | None, actors: int | None, threads: int) -> bool:
    """Join ``address`` (see :func:`cluster_address`) or start a local Ray sized for ``actors`` CPU actors
    of ``threads`` cores (None: Ray detects the GPUs and cores, one actor per GPU); returns whether we
    started it. Without an address a new local Ray is started even when a ``ray start`` cluster runs on this
    machine (Ray's own default would join it, and refuse the CPU count): ``--address auto`` joins that one."""
    if ray.is_initialized():
        return False
    address = cluster_address(address)
    # Ray's core worker puts its own SIGTERM handler (a stack dump, then exit) over ours: put ours back, so
    # that `ray job stop` ends a run as Ctrl-C does.
    handler = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=False)
    elif actors is None:
        start_local()
    else:
        # One logical CPU more than the CPU actors use, so the dense-perplexity task runs beside a final pass.
        start_local(num_cpus=actors * threads + 1)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    return True


LOCAL_START_TRIES = 3
REGISTRATION_WAIT_S = 120.0  # how long a local raylet may take to register with the GCS (Ray's own wait: 30 s)


def start_local(**options) -> None:
    """Start a local Ray (``options``: ``ray.init``'s, e.g. ``num_cpus``). Ray gives its raylet a fixed 30 s
    to register, which a busy machine can miss: here it gets :data:`REGISTRATION_WAIT_S`, and a start that
    still times out is made again (:data:`LOCAL_START_TRIES` tries in all). Ray leaves the GCS, raylet and
    agents of a start that timed out running; they are stopped before the next try, so that each try does
    not make the machine busier still. After the last try, a ``SparseAllocError`` says what to do."""
    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = _descendants()
        try:
            with _patient_registration(REGISTRATION_WAIT_S):
                ray.init(address="local", include_dashboard=False, log_to_driver=False, **options)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(error):
                raise
            ray.shutdown()
            _stop(_descendants() - before)
            if attempt == LOCAL_START_TRIES:
                load = os.getloadavg()[0]
                raise SparseAllocError(
                    f"the local Ray did not start: its raylet did not register within {REGISTRATION_WAIT_S:.0f} s "
                    f"on {LOCAL_START_TRIES} tries (load average {load:.1f} on {os.cpu_count()} cores). Run "
                    "again when the machine is less busy, or start Ray yourself (`ray start --head`) and pass "
                    "--address auto") from None
            log.warning("the local Ray did not start in time (try %d of %d; a busy machine?): starting it again",
                        attempt, LOCAL_START_TRIES)


@contextlib.contextmanager
def _patient_registration(seconds: float) -> Iterator[None]:
    """While a local Ray starts, its check that the raylet has registered (``services.get_node``, which
    ``ray.init`` gives up on after a fixed 30 s) keeps asking for up to ``seconds`` before it fails."""
    from ray._private import services

    real = services.get_node

    def get_node(*args, **kwargs):
        deadline = time.monotonic() + seconds
        while True:
            try:
                return real(*args, **kwargs)
            except RuntimeError:  # not registered yet
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = real


def _descendants() -> set[psutil.Process]:
    """This process's children, grandchildren and so on."""
    return set(psutil.Process().children(recursive=True))


def _stop(processes: set[psutil.Process], grace_s: float = 10.0) -> None:
    """SIGTERM ``processes``, then SIGKILL those still alive after ``grace_s`` seconds."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def alive_nodes() -> set[str]:
    """The ids of the cluster's nodes that are alive now."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def check_model_on_nodes(model: str) -> None:
    """Refuse, before any work, a local ``model`` path that some node able to run actors or passes lacks
    (no node shares a disk with another: a local path must exist at the same place on every node)."""
    from pathlib import Path

    from core.errors import SparseAllocError

    if not Path(model).is_absolute():
        return  # 'default' and hub ids are fetched by each node into its own cache
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(Path.exists)
    nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
    refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:12] + ")": probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(Path(model))
        for n in nodes}
    missing = [name for name, ref in refs.items() if not ray.get(ref)]
    if missing:
        raise SparseAllocError(f"--model {model} is a local path, and node(s) {', '.join(missing)} do not have it: no "
                               "node shares a disk with another, so copy it to the same path on every node, put it "
                               "on a filesystem they all mount, or give a Hugging Face id (each node fetches it)")


def _cache_free_bytes() -> int:
    import shutil

    from pruning.cache import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(root).free


def check_node_disks(need: int, what: str) -> None:
    """Refuse, before the work that fills them, node caches with less than ``need`` bytes free (``what``
    names the fill): every node able to run actors keeps its own copy."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from core.errors import SparseAllocError

    probe = ray.remote(num_cpus=0)(_cache_free_bytes)
    nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
    free = {n["NodeManagerAddress"] + " (" + n["NodeID"][:12] + ")": ray.get(probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()) for n in nodes}
    short = {name: bytes_ for name, bytes_ in free.items() if bytes_ < need}
    if short:
        listed = ", ".join(f"{name}: {bytes_ / 2**30:.2f} GiB free" for name, bytes_ in short.items())
        raise SparseAllocError(f"{what} needs {need / 2**30:.2f} GiB in the cache ($SPARSEALLOC_CACHE) of every node "
                               f"that hosts actors, and {listed}; free space there, point SPARSEALLOC_CACHE at a larger "
                               "disk, or use fewer --db-levels")


def local_copy(node: str | None, path: str | None) -> str | None:
    """``path`` (a directory on node ``node``) as this node sees it: itself when built here, else a copy in
    this node's cache (``cache_root()/<parent>/<name>``), made once per node through Ray (no disk is shared)."""
    from pathlib import Path

    from orchestrator.runtime.rundir import staged_output
    from orchestrator.runtime.transfer import fetch_directory
    from pruning.cache import cache_lock, cache_root

    if path is None or node is None or node == ray.get_runtime_context().get_node_id():
        return path
    local = cache_root() / Path(path).parent.name / Path(path).name
    with cache_lock(f"copy-{local.parent.name}-{local.name}"):
        if not local.exists():  # a copy is renamed into place only when complete
            with staged_output(local, False) as staging:
                fetch_directory(node, Path(path), staging)
    return str(local)
