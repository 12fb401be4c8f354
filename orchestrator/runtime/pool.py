"""Evaluator actors on Ray and the pool that spreads candidates over them.

One actor per ``gpus_per_actor`` GPUs (``num_gpus=k``; its resident blocks split over them) when the
cluster has GPUs, else CPU actors with a configurable thread count. Each actor loads the model on
the host and builds the evaluator once (rank tables, dense reference, cached block inputs) in the
mode its spec says (resident or streamed); token windows come once through the object store.
Candidates go to the least-loaded actor in small batches, which the actor scores as one population
(shared prefixes and shared levels computed once).

Faults, and what the pool does about them:

- an actor that crashes is restarted by Ray (``max_restarts``) and its in-flight calls retried
  (``max_task_retries``); an actor that is gone for good (restarts used up, killed, node lost) is
  replaced by a new one (at most ``max_replacements`` in the pool's life) and its in-flight
  candidates are re-submitted, so a search never loses a result;
- an actor that is only unavailable for a moment (``ActorUnavailableError``: a network blip, a
  restart under way) keeps its place: the batch is re-submitted after a short backoff; an actor
  unavailable more than ``unavailable_retries`` times in a row, with no answer between (a frozen
  process, a stalled host), is taken for gone: killed, replaced as above, its batch re-submitted;
- an exception raised by the evaluator itself (CUDA out of memory, a bad candidate) ends the call
  with one ``SparseAllocError`` naming the actor, its node and the cause, once the other in-flight
  batches are drained (their rows written) or cancelled;
- actors that cannot be placed (no GPU in the cluster, too few CPUs) end the start with a
  ``SparseAllocError`` naming the missing resources after ``placement_timeout_s``; the time an
  actor spends loading the model once placed does not count; an actor that fails while starting is
  replaced (while replacements are left) rather than ending the run;
- a node that dies is said at once (its id, the actors lost, the candidates they had in flight, which
  are kept and evaluated again); its actors are replaced, and the pool waits up to ``node_wait_s``
  for a node to place them, with a progress line, evaluating meanwhile on the actors left. With none
  left it then ends with a ``SparseAllocError`` saying the results are kept and how to resume. The
  time it spends with no actor to evaluate on is ``stalled_s``: not the drivers' to pay for.

Rows are written to the results table as they arrive, so whatever ends a search, what was
evaluated is kept (``--resume`` reads it back).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass

import ray
import torch

from orchestrator.runtime.candidates import Candidate
from orchestrator.runtime.cluster import local_copy
from orchestrator.runtime.results import ResultsTable
from core.errors import SparseAllocError
from core.units import UnitLayout

log = logging.getLogger(__name__)
NODE_CHECK_S = 2.0  # how often the pool reads the node table while it waits
WAIT_LINE_S = 30.0  # a progress line this often while it waits for nodes


@dataclass(frozen=True)
class EvaluatorSpec:
    """How every actor builds its evaluator: model, dtype, device, mode (resident / streamed), device
    memory budget per device (bytes; None = no limit), GPUs per actor, population size, and its level
    source (a name of ``scoring.level_sources.LEVEL_SOURCES``, opened from ``level_artifact``, what
    the source's ``prepare`` made, e.g. a database's path)."""

    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 4
    threads: int = 1
    mode: str = "resident"
    memory_budget: int | None = None
    gpus_per_actor: int = 1
    population: int = 8
    owl_multipliers: tuple[float, ...] = ()
    sequential_windows: int = 4  # calibration windows of the kl-seq metric's low-fidelity pass
    level_source: str = "wanda"
    level_artifact: str | None = None
    level_node: str | None = None  # the node that built the artifact (others copy it into their cache)
    sequential_fitness: bool = False  # kl-seq will be asked for: room for a second set of rank tables


def actor_devices(spec: EvaluatorSpec) -> list[torch.device]:
    """The devices an actor uses: the GPUs Ray gave it (all visible ones), else ``spec.device``."""
    from pruning.load import pick_device

    device = pick_device(spec.device)
    if device.type == "cuda" and spec.device == "auto":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _auto_mode(model, spec: EvaluatorSpec, devices: list[torch.device], fitness_windows: torch.Tensor) -> str:
    """``--evaluator auto`` decided on the actor, from the memory plan for its own devices."""
    from orchestrator.runtime.plan import check_plan, detect_device_memory, make_plan, ModelShape
    from pruning.load import dtype_name

    budget = spec.memory_budget if spec.memory_budget is not None else detect_device_memory()[0]
    dtype = dtype_name(next(model.parameters()).dtype)
    plan = make_plan(ModelShape.from_model(model), dtype=dtype, device_memory_bytes=budget,
                     gpus_per_actor=len(devices), fitness_tokens=int(fitness_windows.numel()),
                     fitness_seqlen=int(fitness_windows.shape[1]), batch_size=spec.batch_size,
                     population=spec.population, sequential_fitness=spec.sequential_fitness)
    check_plan(plan)
    return plan.evaluator


class EvaluatorActor:
    """Holds one model copy plus its CandidateEvaluator; answers small fitness requests."""

    def __init__(self, spec: EvaluatorSpec, calibration: torch.Tensor, fitness_windows: torch.Tensor) -> None:
        from pruning.load import load_model, pick_dtype
        from scoring.evaluator import CandidateEvaluator
        from scoring.level_sources import LEVEL_SOURCES

        torch.set_num_threads(spec.threads)
        devices = actor_devices(spec)
        model, _ = load_model(spec.model, pick_dtype(spec.dtype, devices[0]))  # on the host; placed below
        mode = spec.mode if spec.mode != "auto" else _auto_mode(model, spec, devices, fitness_windows)
        levels = LEVEL_SOURCES[spec.level_source].open(local_copy(spec.level_node, spec.level_artifact))
        self.evaluator = CandidateEvaluator(model, calibration, fitness_windows, devices,
                                            batch_size=spec.batch_size, progress=False, mode=mode,
                                            memory_budget=spec.memory_budget, owl_multipliers=spec.owl_multipliers,
                                            sequential_windows=spec.sequential_windows, levels=levels)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict:
        evaluator = self.evaluator
        dtype = next(evaluator.model.parameters()).dtype
        return {"actor": self.name, "node": ray.get_runtime_context().get_node_id(),
                "blocks": evaluator.num_blocks, "weights": evaluator.block_weights,
                "layout": evaluator.layout.to_json(),
                "max_tokens": evaluator.max_tokens, "mode": evaluator.mode, "reference": evaluator.reference,
                "devices": [str(d) for d in evaluator.devices], "dtype": str(dtype).removeprefix("torch.")}

    def fisher_traces(self, windows: torch.Tensor) -> list[float]:
        from scoring.fisher import block_fisher_traces

        evaluator = self.evaluator
        offload = evaluator.mode == "streamed" or len(evaluator.devices) > 1
        return block_fisher_traces(evaluator.model, windows, evaluator.device, progress=False, offload=offload)

    def outlier_ratios(self, multiplier: float) -> list[float]:
        return self.evaluator.outlier_ratios(multiplier)

    def evaluate(self, candidates: list[Candidate]) -> list[dict]:
        """Score a batch of candidates: those sharing fidelity, draw, skip and metric as one population."""
        groups: dict[tuple, list[int]] = {}
        for index, candidate in enumerate(candidates):
            groups.setdefault((candidate.tokens, candidate.metric, candidate.draw, candidate.skip), []).append(index)
        outcomes: list[dict] = [{} for _ in candidates]
        node = ray.get_runtime_context().get_node_id()
        for (tokens, metric, draw, skip), members in groups.items():
            start = time.perf_counter()
            values = self.evaluator.fitness_many([candidates[i].profile for i in members], tokens, metric, draw,
                                                 skip)
            seconds = (time.perf_counter() - start) / len(members)
            for i, value in zip(members, values):
                outcomes[i] = {"fitness": value, "seconds": seconds, "actor": self.name, "node": node}
        return outcomes


class EvaluatorPool:
    """Spreads candidates over the actors; every result is written to the results table at once."""

    def __init__(self, spec: EvaluatorSpec, calibration: torch.Tensor, fitness_windows: torch.Tensor,
                 results: ResultsTable, num_actors: int | None = None, gpu: bool | None = None,
                 max_restarts: int = 3, max_replacements: int | None = None, placement_timeout_s: float = 120.0,
                 unavailable_retries: int = 5, retry_backoff_s: float = 0.5, drain_timeout_s: float = 300.0,
                 node_wait_s: float = 600.0) -> None:
        """``gpu``: None = GPU actors when the cluster has GPUs now; True = GPU actors even when it has
        none yet (an autoscaling cluster then adds GPU workers for them); False = CPU actors.

        ``max_replacements``: actors gone for good that are replaced by new ones over the pool's life
        (default: the number of actors). ``placement_timeout_s``: how long an actor may wait for a
        node with its resources (at the start and for a replacement) before the pool gives up.
        ``unavailable_retries``: how many ``ActorUnavailableError``s in a row an actor may give (each batch
        re-submitted, the n-th time after ``retry_backoff_s * 2**(n-1)`` seconds) before it is replaced.
        ``drain_timeout_s``: after an evaluator error, how long the other in-flight batches may finish
        (their rows are written) before the rest is cancelled. ``node_wait_s``: how long the actors of a
        dead node may wait for a node to replace them (``--node-wait-minutes``)."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 if gpu is None else gpu
        num_actors = num_actors or max(1, gpus // spec.gpus_per_actor)
        self.resources = {"GPU": spec.gpus_per_actor, "CPU": 1} if use_gpu else {"CPU": spec.threads}
        options = {"num_gpus": spec.gpus_per_actor, "num_cpus": 1} if use_gpu else {"num_cpus": spec.threads}
        self._remote = ray.remote(EvaluatorActor).options(max_restarts=max_restarts, max_task_retries=max_restarts,
                                                          **options)
        self.spec = spec
        self.results = results
        self.population = spec.population
        self.max_per_actor = 2
        self.max_replacements = num_actors if max_replacements is None else max_replacements
        self.replacements = 0
        self.resubmitted = 0  # candidates sent again because their actor was lost
        self.sent = 0  # candidates handed to an actor for the first time (each new key once)
        self.placement_timeout_s = placement_timeout_s
        self.unavailable_retries = unavailable_retries
        self.retry_backoff_s = retry_backoff_s
        self.drain_timeout_s = drain_timeout_s
        self.node_wait_s = node_wait_s
        self.stalled_s = 0.0  # seconds evaluate waited with no actor to evaluate on (after a node was lost)
        self.dead: set[int] = set()
        self.unavailable = [0] * num_actors  # per slot: its actor's ActorUnavailableErrors since its last answer
        self._starting: dict[int, _Starting] = {}  # slot -> its replacement being started
        self._lost_nodes: set[str] = set()
        self._nodes_checked = 0.0
        self._wait_said = 0.0
        self._last_death = ""
        # Held for the pool's lifetime: a restarted or replacement actor is built from these same objects.
        self._token_refs = (ray.put(calibration), ray.put(fitness_windows))
        self.actors = [self._remote.remote(spec, *self._token_refs) for _ in range(num_actors)]
        self.infos = self._start_all()

    def close(self) -> None:
        """Stop the actors and drop every handle and object ref (before ``ray.shutdown``)."""
        for actor in self.actors:
            _kill(actor)
        self.actors = []
        self._starting = {}
        self._token_refs = ()

    @property
    def num_blocks(self) -> int:
        return self.infos[0]["blocks"]

    @property
    def block_weights(self) -> list[int]:
        return self.infos[0]["weights"]

    @property
    def layout(self) -> UnitLayout:
        """The model's prunable linears per block: what a profile's units cover at each granularity."""
        return UnitLayout.of(self.infos[0]["layout"])

    @property
    def max_tokens(self) -> int:
        return self.infos[0]["max_tokens"]

    # ---- starting actors ------------------------------------------------------------------------

    def _poll_s(self) -> float:
        return max(0.05, min(1.0, self.placement_timeout_s / 4))

    def _start_all(self) -> list[dict]:
        """Every actor's ``info`` once it has started; a clear error (and no actor left behind) when
        some cannot be placed within ``placement_timeout_s`` or fail while starting."""
        calls = {actor.info.remote(): index for index, actor in enumerate(self.actors)}
        infos: list[dict | None] = [None] * len(self.actors)
        unplaced_since = {index: time.monotonic() for index in range(len(self.actors))}
        try:
            while calls:
                done, _ = ray.wait(list(calls), num_returns=1, timeout=self._poll_s())
                for ref in done:
                    index = calls.pop(ref)
                    unplaced_since.pop(index)
                    try:
                        infos[index] = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        if self.replacements >= self.max_replacements:
                            raise SparseAllocError(f"evaluator actor {index} failed while starting: "
                                                   f"{_death_cause(exc)}") from None
                        self.replacements += 1
                        log.warning("evaluator actor %d failed while starting (%s); starting replacement %d of %d",
                                    index, _death_cause(exc), self.replacements, self.max_replacements)
                        _kill(self.actors[index])
                        self.actors[index] = self._remote.remote(self.spec, *self._token_refs)
                        calls[self.actors[index].info.remote()] = index
                        unplaced_since[index] = time.monotonic()
                now = time.monotonic()
                placed = [index for index in unplaced_since if _placed(self.actors[index])]
                for index in placed:
                    unplaced_since[index] = now  # placed: loading the model does not count
                if any(now - since > self.placement_timeout_s for since in unplaced_since.values()):
                    raise SparseAllocError(self._placement_message(len(unplaced_since) - len(placed),
                                                                   len(self.actors)))
        except BaseException:
            for actor in self.actors:
                _kill(actor)
            self.actors = []
            raise
        return infos  # type: ignore[return-value]

    def _placement_message(self, pending: int, total: int) -> str:
        """Which resources the unplaced actors lack, and what to do about it."""
        need = self.resources
        cluster, free = ray.cluster_resources(), ray.available_resources()
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        fitting = [node for node in nodes if all(node.get(r, 0) >= amount for r, amount in need.items())]
        missing = [r for r, amount in need.items() if not any(node.get(r, 0) >= amount for node in nodes)]
        what = (f"{pending} of {total} evaluator actors could not be placed within {self.placement_timeout_s:g} s: "
                f"each needs {_resources(need)}; the cluster has {_resources(cluster, need)} "
                f"(free: {_resources(free, need)})")
        if missing:
            what += f"; no node has {' or '.join(f'{r}: {_number(need[r])}' for r in missing)}"
        elif fitting:
            what += "; the nodes that have them are busy"
        else:
            what += "; no single node has all of them"
        if "GPU" in need:
            fix = "start GPU workers, lower --actors or --gpus-per-actor, or drop --gpu-actors"
        else:
            fix = "add CPU workers, or lower --actors or --threads"
        return f"{what}; {fix}"

    def _replace(self, index: int, cause: str, node_lost: bool = False) -> None:
        """Slot ``index`` lost its actor for good: start a new one there while replacements are left (a
        node's loss is not the actor's fault: its replacement is not counted, and may wait ``node_wait_s``
        for a node instead of ``placement_timeout_s``)."""
        self._last_death = cause
        self.dead.add(index)
        self.unavailable[index] = 0
        self._starting.pop(index, None)
        _kill(self.actors[index])
        if not node_lost and self.replacements >= self.max_replacements:
            log.warning("evaluator actor %d is gone (%s); no replacement left (%d used)", index, cause,
                        self.replacements)
            return
        self.replacements += not node_lost
        log.warning("evaluator actor %d is gone (%s); starting a replacement", index, cause)
        self.actors[index] = self._remote.remote(self.spec, *self._token_refs)
        limit = self.node_wait_s if node_lost else self.placement_timeout_s
        self._starting[index] = _Starting(self.actors[index].info.remote(), time.monotonic(), limit, node_lost)
        self.dead.discard(index)

    def _watch_nodes(self, in_flight: dict) -> None:
        """Say at once when a node that holds actors is gone, and replace its actors (their in-flight
        candidates are re-submitted when their calls fail). Reads the node table at most every 2 s."""
        now = time.monotonic()
        if now - self._nodes_checked < NODE_CHECK_S:
            return
        self._nodes_checked = now
        alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
        holding: dict[str, list[int]] = {}
        for index, info in enumerate(self.infos):
            if info and index not in self.dead and index not in self._starting:
                holding.setdefault(info["node"], []).append(index)
        for node, slots in holding.items():
            if node in alive:
                continue
            self._lost_nodes.add(node)
            kept = sum(len(call.batch) for call in in_flight.values() if call.index in slots)
            log.warning("node %s is gone with evaluator actor(s) %s and %d candidate(s) in flight: those are kept and "
                        "evaluated again; waiting up to %.0f min (--node-wait-minutes) for a node to replace the "
                        "actors, evaluating meanwhile on the %d left", node[:12], slots, kept, self.node_wait_s / 60,
                        len(self.actors) - len(self.dead) - len(self._starting) - len(slots))
            for index in slots:
                self._replace(index, f"its node {node[:12]} is gone", node_lost=True)

    def _say_waiting(self) -> None:
        """A progress line, every 30 s, while no actor can evaluate and replacements wait for a node."""
        now = time.monotonic()
        if now - self._wait_said < WAIT_LINE_S:
            return
        self._wait_said = now
        waited = max(now - start.since for start in self._starting.values())
        limit = max(start.limit for start in self._starting.values())
        log.warning("waiting for a node with %s for %d replacement evaluator actor(s): %.0f s of %.0f s; the %d "
                    "results written so far are kept", _resources(self.resources), len(self._starting), waited,
                    limit, len(self.results))

    def _check_starting(self, done: ray.ObjectRef | None) -> bool:
        """Advance the replacements being started; True when ``done`` was one's info call."""
        now = time.monotonic()
        for index, start in list(self._starting.items()):
            if start.ref == done:
                del self._starting[index]
                try:
                    self.infos[index] = ray.get(start.ref)
                    log.info("replacement evaluator actor %s is serving in slot %d", self.infos[index]["actor"],
                             index)
                except ray.exceptions.RayActorError as exc:
                    self._replace(index, f"its replacement failed while starting: {_death_cause(exc)}")
                return True
            if _placed(self.actors[index]):
                start.since = now
            elif now - start.since > start.limit and start.node_lost:
                self._give_up(index)
            elif now - start.since > start.limit:
                self._replace(index, "its replacement could not be placed: "
                              + self._placement_message(1, 1))
        return False

    def _give_up(self, index: int) -> None:
        """A lost node's replacement found no node within ``node_wait_s``: the slot is dead; with no actor
        left, the search ends here, its results kept."""
        self._starting.pop(index, None)
        _kill(self.actors[index])
        self.dead.add(index)
        live = len(self.actors) - len(self.dead) - len(self._starting)
        if live:
            log.warning("no node joined within %.0f min for the replacement of evaluator actor %d; continuing on the "
                        "%d actor(s) left", self.node_wait_s / 60, index, live)
            return
        raise SparseAllocError(
            f"the node(s) of every evaluator actor are gone ({', '.join(n[:12] for n in sorted(self._lost_nodes))}) "
            f"and no node with {_resources(self.resources)} joined within {self.node_wait_s / 60:g} min "
            f"(--node-wait-minutes). The {len(self.results)} results written so far are kept in {self.results.dir}: "
            "start nodes (or lower --actors) and rerun the same command with --resume")

    def wait_for_replacements(self) -> None:
        """Block until every replacement being started serves (its ``infos`` entry filled in) or is
        given up (dead, or replaced again); ``evaluate`` does not wait for them."""
        while self._starting:
            done, _ = ray.wait([start.ref for start in self._starting.values()], num_returns=1, timeout=self._poll_s())
            self._check_starting(done[0] if done else None)

    def call(self, method: str, *args):
        """``method(*args)`` on one live actor (Fisher traces, OWL ratios): an actor that is gone is
        replaced and the call tried on another; an error inside the actor is one clear error."""
        while True:
            self.wait_for_replacements()
            live = [i for i in range(len(self.actors)) if i not in self.dead and i not in self._starting]
            if not live:
                raise SparseAllocError(f"no evaluator actor is left to compute {method}; last cause: "
                                       f"{self._last_death or 'unknown'}")
            index = live[0]
            try:
                answer = ray.get(getattr(self.actors[index], method).remote(*args))
            except ray.exceptions.ActorUnavailableError as exc:
                if not self._unavailable(index, exc):
                    log.warning("evaluator actor %s is unavailable computing %s (%s); asking again (%d time(s) in a "
                                "row; replaced after %d)", self._actor_name(index), method,
                                _first_line(str(exc)), self.unavailable[index], self.unavailable_retries + 1)
                    time.sleep(self.retry_backoff_s * 2 ** (self.unavailable[index] - 1))
                continue
            except ray.exceptions.RayActorError as exc:
                self._replace(index, _death_cause(exc))
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None) or exc
                info = self.infos[index] or {}
                raise SparseAllocError(f"evaluator actor {info.get('actor', index)} on node {info.get('node', '?')} "
                                       f"failed computing {method}: {type(cause).__name__}: "
                                       f"{_first_line(str(cause))}") from None
            self.unavailable[index] = 0
            return answer

    def _actor_name(self, index: int) -> str:
        """Slot ``index``'s actor as the logs name it (its Ray name once started, else the slot)."""
        return str((self.infos[index] or {}).get("actor", index))

    def _serving(self, call: "_Call") -> bool:
        """Whether ``call``'s actor still holds its slot (neither replaced nor taken for dead since)."""
        return call.actor is self.actors[call.index] and call.index not in self.dead

    def _unavailable(self, index: int, exc: Exception) -> bool:
        """Count an ``ActorUnavailableError`` of slot ``index``'s actor; past ``unavailable_retries`` in a row
        (no answer between) the actor is taken for gone and replaced: True."""
        self.unavailable[index] += 1
        if self.unavailable[index] <= self.unavailable_retries:
            return False
        self._replace(index, f"unavailable {self.unavailable[index]} times in a row: {_first_line(str(exc))}")
        return True

    # ---- evaluating -----------------------------------------------------------------------------

    def _batch_size(self, queued: int, ready: int) -> int:
        """Candidates per call in one dispatch round: up to ``population``, fewer when a larger batch
        would leave ready actors idle (the queue split evenly over them)."""
        return max(1, min(self.population, math.ceil(queued / max(1, ready))))

    def _write(self, batch: list[Candidate], outcomes: list[dict]) -> None:
        """One results part for the batch that arrived (keys already answered are skipped: one row per
        evaluation)."""
        self.results.append_many([{
            "driver": candidate.driver, "key": candidate.key, "params": candidate.params,
            "sparsities": list(candidate.sparsities), "nm": candidate.nm, "tokens": candidate.tokens or -1,
            "draw": candidate.draw, "metric": candidate.metric, **outcome,
        } for candidate, outcome in zip(batch, outcomes) if self.results.get(candidate.key) is None])

    def _drain(self, in_flight: dict) -> None:
        """Let the other in-flight batches finish (their rows are written) for up to
        ``drain_timeout_s``; cancel what is left (queued calls never run)."""
        deadline = time.monotonic() + self.drain_timeout_s
        while in_flight and (left := deadline - time.monotonic()) > 0:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=left)
            if not done:
                break
            call = in_flight.pop(done[0])
            try:
                self._write(call.batch, ray.get(done[0]))
            except ray.exceptions.RayError:
                pass  # the first error is the one reported
        for ref in in_flight:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: the call's result is dropped either way
                pass
        in_flight.clear()

    def _task_error(self, call: "_Call", exc: ray.exceptions.RayError) -> SparseAllocError:
        info = self.infos[call.index] or {}
        cause = getattr(exc, "cause", None) or exc
        first = (str(cause).strip().splitlines() or [""])[0]
        message = (f"evaluator actor {info.get('actor', call.index)} on node {info.get('node', '?')} failed "
                   f"while scoring {len(call.batch)} candidate(s): {type(cause).__name__}: {first}")
        if isinstance(cause, torch.OutOfMemoryError) or "out of memory" in first.lower():
            message += ("; lower --population or --batch-size, use --evaluator streamed, or give each actor more "
                        "GPUs (--gpus-per-actor)")
        return SparseAllocError(f"{message}. The {len(self.results)} results written so far are kept in "
                                f"{self.results.dir} (--resume reads them back)")

    def dispatch(self, per_actor: int | None = None) -> "Dispatch":
        """A :class:`Dispatch` over this pool's actors, at most ``per_actor`` calls in flight on each (default
        ``max_per_actor``)."""
        return Dispatch(self, self.max_per_actor if per_actor is None else per_actor)

    def evaluate(self, candidates: list[Candidate]) -> list[float]:
        """Fitness per candidate (same order). Known keys come from the results table (resume);
        new ones are evaluated in parallel and written to it as each arrives."""
        dispatch = self.dispatch()
        dispatch.add(candidates)
        try:
            dispatch.finish()
        except BaseException:
            dispatch.cancel()
            raise
        return [self.results.get(c.key)["fitness"] for c in candidates]

    def _drain_quietly(self, in_flight: dict) -> None:
        """Interrupted (or failing): cancel what is still queued so the actors are free for what comes
        next; rows already written stay."""
        for ref in in_flight:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort
                pass
        in_flight.clear()


class Dispatch:
    """Candidates spread over the pool's actors as they come. ``add`` queues the keys not yet scored or queued;
    ``step`` sends what the actors have room for (the least-loaded first), waits for one call to end and writes
    its rows, handling lost actors and nodes as the module doc says. :meth:`EvaluatorPool.evaluate` adds one list
    and steps until it is done; a streaming caller (the Tune drivers' mailbox) adds candidates while others are
    in flight and reads each answer from the results table as soon as its call ends, so an actor that finishes
    a short rung takes the next question instead of waiting for the other actor's long one."""

    def __init__(self, pool: EvaluatorPool, per_actor: int) -> None:
        if per_actor < 1:
            raise SparseAllocError(f"an actor needs room for at least one call, got {per_actor}")
        self.pool, self.per_actor = pool, per_actor
        self.queue: list[Candidate] = []
        self.resubmit: list[tuple[float, list[Candidate], int]] = []  # (when, batch, unavailable attempts so far)
        self.in_flight: dict[ray.ObjectRef, _Call] = {}
        self.load = [0] * len(pool.actors)
        self.keys: set[str] = set()  # every key added and not answered by the table when it was added

    @property
    def busy(self) -> bool:
        """Whether some candidate added is not scored yet."""
        return bool(self.queue or self.resubmit or self.in_flight)

    def add(self, candidates: list[Candidate]) -> None:
        """Queue the candidates whose keys are neither in the results table nor added before."""
        for candidate in candidates:
            if candidate.key not in self.keys and self.pool.results.get(candidate.key) is None:
                self.keys.add(candidate.key)
                self.queue.append(candidate)

    def step(self, max_wait: float | None = None, wake: list[ray.ObjectRef] = ()) -> None:
        """Send what the actors have room for, then wait (at most ``max_wait`` seconds, or until one of ``wake``
        is ready) for one call to end and write its rows; an error of the evaluator or of every actor ends the
        dispatch with one ``SparseAllocError`` (the other calls drained)."""
        pool, queue, resubmit, in_flight, load = self.pool, self.queue, self.resubmit, self.in_flight, self.load
        ready = [i for i in range(len(pool.actors)) if i not in pool.dead and i not in pool._starting]
        if not ready and not pool._starting and not in_flight:
            raise SparseAllocError(
                f"every evaluator actor is gone and the {pool.max_replacements} replacement(s) are used "
                f"up; last cause: {pool._last_death or 'unknown'}. The {len(pool.results)} results "
                f"written so far are kept in {pool.results.dir} (--resume reads them back)")
        now = time.monotonic()
        size = pool._batch_size(len(queue), len(ready))
        while ready and min(load[i] for i in ready) < self.per_actor:
            due = next((r for r in resubmit if r[0] <= now), None)
            if due is None and not queue:
                break
            index = min(ready, key=lambda i: load[i])
            if due is not None:
                resubmit.remove(due)
                batch, attempts = due[1], due[2]
            else:
                batch, queue[:], attempts = queue[:size], queue[size:], 0
                pool.sent += len(batch)
            in_flight[pool.actors[index].evaluate.remote(batch)] = _Call(batch, index, pool.actors[index], attempts)
            load[index] += 1
        waits = list(in_flight) + [start.ref for start in pool._starting.values()]
        # Wake for a backoff ending, a replacement to check or the node table to read; a due batch
        # waits for a call to end.
        timeouts = [when - now for when, _, _ in resubmit if when > now]
        timeout = min(timeouts + [pool._poll_s() if pool._starting else NODE_CHECK_S]
                      + ([max_wait] if max_wait is not None else []))
        stalled = not ready and bool(pool._starting)
        started = time.monotonic()
        if not waits:
            time.sleep(timeout)
            done = []
        else:
            done, _ = ray.wait(waits + list(wake), num_returns=1, timeout=timeout)
        if stalled:
            pool.stalled_s += time.monotonic() - started
            pool._say_waiting()
        pool._watch_nodes(in_flight)
        if pool._check_starting(done[0] if done else None) or not done or done[0] not in in_flight:
            return  # a replacement's info call or a ``wake`` ref was ready, or nothing ended
        call = in_flight.pop(done[0])
        load[call.index] -= 1
        try:
            outcomes = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:  # raised by the evaluator: its traceback in the debug log
            log.debug("evaluator error in actor %d: %s", call.index, exc)
            error = pool._task_error(call, exc)
            pool._drain(in_flight)
            raise error from None
        except ray.exceptions.ActorUnavailableError as exc:
            name = pool._actor_name(call.index)
            if pool._serving(call) and pool._unavailable(call.index, exc):  # frozen, not blipping: replaced
                pool.resubmitted += len(call.batch)
                resubmit.append((0.0, call.batch, 0))
                return
            delay = pool.retry_backoff_s * 2 ** min(call.attempts, pool.unavailable_retries)
            log.warning("evaluator actor %s is unavailable (%s); re-submitting its batch in %.1f s "
                        "(%d time(s) in a row; replaced after %d)", name, _first_line(str(exc)), delay,
                        pool.unavailable[call.index], pool.unavailable_retries + 1)
            resubmit.append((time.monotonic() + delay, call.batch, call.attempts + 1))
            return
        except ray.exceptions.RayActorError as exc:
            if pool._serving(call):
                pool._replace(call.index, _death_cause(exc))  # its other calls fail the same way
            pool.resubmitted += len(call.batch)
            resubmit.append((0.0, call.batch, call.attempts))
            return
        except ray.exceptions.RayError as exc:  # anything else Ray says about the call: reported alike
            error = pool._task_error(call, exc)
            pool._drain(in_flight)
            raise error from None
        if pool._serving(call):
            pool.unavailable[call.index] = 0
        pool._write(call.batch, outcomes)

    def finish(self) -> None:
        """Step until every candidate added is scored (its row written)."""
        while self.busy:
            self.step()

    def cancel(self) -> None:
        """Interrupted (or failing): cancel what is still in flight so the actors are free for what comes next;
        rows already written stay."""
        self.pool._drain_quietly(self.in_flight)
        self.queue.clear()
        self.resubmit.clear()


@dataclass
class _Starting:
    """A replacement actor being started: its ``info`` call, since when it waits for a node (reset once
    placed), how long it may wait, and whether it replaces an actor of a lost node."""

    ref: object
    since: float
    limit: float
    node_lost: bool


@dataclass
class _Call:
    """One in-flight ``evaluate`` call: its batch, the slot and actor it went to, unavailable retries so far."""

    batch: list[Candidate]
    index: int
    actor: object
    attempts: int


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _placed(actor) -> bool:
    """Whether Ray has given the actor a worker process (it is loading or serving), from the GCS actor
    table; False when that cannot be told (then placement time counts until its first answer)."""
    try:
        from ray._private import state

        entry = state.actors(actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - a private table: if it moves, fall back to the plain timeout
        return False
    return bool(entry.get("Pid")) or entry.get("State") == "ALIVE"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _death_cause(exc: ray.exceptions.RayActorError) -> str:
    """One line on why an actor died: the exception its constructor raised, or Ray's reason."""
    text = getattr(exc, "error_msg", None) or str(exc)
    if getattr(exc, "actor_init_failed", False):
        raised = [line for line in text.splitlines() if re.match(r"^[A-Za-z_][\w.]*: ", line)]
        if raised:
            kind, _, message = raised[-1].partition(": ")
            return f"{kind.rsplit('.', 1)[-1]}: {message}"
    because = [line.strip() for line in text.splitlines() if line.strip().startswith("The actor is dead because")]
    return because[0] if because else _first_line(text)


def _number(value: float) -> str:
    return f"{value:g}"


def _resources(resources: dict, only: dict | None = None) -> str:
    keys = list(only) if only is not None else list(resources)
    return ", ".join(f"{key}: {_number(resources.get(key, 0))}" for key in keys)
