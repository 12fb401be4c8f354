"""A real multi-node Ray cluster on this machine, bound to 127.0.0.1, as our users run one: a head with no
CPUs for work (the driver's node), and worker raylets that share no disk with the driver (each in its own
mount namespace, where the driver's directories are hidden behind an empty tmpfs), each with its own
``HOME``, ``SPARSEALLOC_CACHE`` and Ray temp dir. Every process is started here and stopped here, by its
process group; nothing else is touched."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# Throwaway test clusters: no token auth, and a dead node noticed within seconds.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "RAY_JOB_STOP_WAIT_TIME_S": "30"}  # `ray job stop`: SIGTERM, then this long before SIGKILL


NODE_START_TRIES = 3  # a `ray start` that timed out waiting for its raylet is run again this many times in all


def _own_ports() -> list[str]:
    """A node's agent HTTP port, free now: Ray's fixed default (52365) is taken by the first Ray on the machine,
    and a head without it accepts no job ("No available agent to submit job") while other tests run Ray."""
    return ["--dashboard-agent-listen-port", str(free_port())]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    cache: Path
    home: Path
    command: list[str] = field(default_factory=list)  # what started it, to start it again
    env: dict = field(default_factory=dict)
    starts: int = 1

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalCluster:
    """Start with :meth:`start`, add workers with :meth:`add_worker`, end with :meth:`stop`."""

    root: Path
    hidden: list[Path]  # the driver's directories, invisible on the workers
    dashboard: bool = False
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    dashboard_port: int = 0
    ray_dirs: Path = Path()  # Ray's temp dirs: short paths (its sockets' names are limited to 107 bytes)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def job_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra) -> dict:
        """The environment of the head and of drivers (a worker adds its own ``HOME`` and cache)."""
        return {**os.environ, **RAY_ENV, **extra}

    def start(self) -> "LocalCluster":
        self.port, self.dashboard_port = free_port(), free_port()
        self.ray_dirs = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        head = ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--num-cpus", "0",
                "--num-gpus", "0", "--object-store-memory", str(200 << 20), "--temp-dir", str(self.ray_dirs / "head"),
                "--include-dashboard", "true" if self.dashboard else "false", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), *_own_ports(), "--ray-client-server-port",
                str(free_port()), "--disable-usage-stats", "--block"]
        self._launch("head", [RAY, *head], self.env())
        self.wait_for_nodes(1)
        return self

    def add_worker(self, name: str, num_cpus: int = 2) -> Node:
        """A worker raylet in its own mount namespace: the hidden directories are empty there."""
        home, cache = self.root / f"{name}-home", self.root / f"{name}-cache"
        home.mkdir(parents=True, exist_ok=True)
        worker = [RAY, "start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus",
                  str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(200 << 20), "--temp-dir",
                  str(self.ray_dirs / name), *_own_ports(), "--disable-usage-stats", "--block"]
        mounts = "; ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(path))}" for path in self.hidden)
        script = f"{mounts}; exec {' '.join(shlex.quote(word) for word in worker)}"
        node = self._launch(name, ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            self.env(HOME=str(home), SPARSEALLOC_CACHE=str(cache)), cache=cache, home=home)
        self.wait_for_nodes(len([n for n in self.nodes if n.alive]))
        return node

    def _launch(self, name: str, command: list[str], env: dict, cache: Path | None = None,
                home: Path | None = None) -> Node:
        log = open(self.root / f"{name}.log", "w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, cache or self.root / "driver-cache", home or Path.home(), command, env)
        self.nodes.append(node)
        return node

    def _start_again(self, node: Node) -> bool:
        """Start a node again whose ``ray start`` gave up because its raylet missed Ray's fixed 30 s registration
        wait (a busy machine: seen with a benchmark beside the suite), at most :data:`NODE_START_TRIES` times;
        what the failed start left of its group (a GCS, a raylet) is killed first. False for any other failure."""
        log = self.root / f"{node.name}.log"
        if node.starts >= NODE_START_TRIES or "timed out during startup" not in log.read_text():
            return False
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with open(log, "a") as out:
            out.write(f"\n--- started again (try {node.starts + 1} of {NODE_START_TRIES}) ---\n")
            node.process = subprocess.Popen(node.command, env=node.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        node.starts += 1
        return True

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as Ray's state API reports them (from a separate process)."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                "print('NODES', json.dumps([n for n in ray.nodes() if n['Alive']], default=str))" % self.address)
        done = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True,
                              timeout=60)
        # Ray may print warnings of its own on stdout (a lagging heartbeat): read only our line.
        lines = [line for line in done.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(lines[-1][len("NODES "):]) if done.returncode == 0 and lines else []

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [node for node in self.nodes if not node.alive and node.process.returncode not in (None, -9)]
            again = [node for node in dead if self._start_again(node)]
            if again:
                deadline = time.monotonic() + timeout  # the new start gets the whole wait
            dead = [node.name for node in dead if node not in again]
            if dead:
                raise RuntimeError(f"{dead} failed to start: {(self.root / (dead[0] + '.log')).read_text()[-2000:]}")
            nodes = self.alive_nodes()
            if len(nodes) == count:
                return nodes
            time.sleep(1.0)
        raise TimeoutError(f"the cluster did not reach {count} live node(s); logs in {self.root}")

    def kill(self, node: Node) -> None:
        """SIGKILL a node's whole process group (its raylet, object store and workers), as a lost machine."""
        if node.alive:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=60)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.process.wait(timeout=60)
        shutil.rmtree(self.ray_dirs, ignore_errors=True)

    def run(self, *args: str, cwd: Path = ROOT, timeout: float = 900, **env) -> subprocess.CompletedProcess:
        """``sparsealloc ARGS`` as the driver on the head node (its own cache), joining this cluster."""
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=self.driver_env(**env))

    def spawn(self, *args: str, **env) -> subprocess.Popen:
        """``sparsealloc ARGS`` in the background (its own process group), joining this cluster."""
        log = open(self.root / f"driver-{len(self.nodes)}-{time.monotonic_ns()}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=self.driver_env(**env))

    def driver_env(self, **extra) -> dict:
        """A driver's environment: its own cache, and this cluster's address as a Ray job has it."""
        return self.env(SPARSEALLOC_CACHE=str(self.root / "driver" / "cache"), RAY_ADDRESS=self.address, **extra)
