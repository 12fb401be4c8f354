"""Evaluator actors on Ray and the pool that spreads candidates over them.

One actor per ``gpus_per_actor`` GPUs (``num_gpus=k``; its resident blocks split over them) when the
cluster has GPUs, else CPU actors with a configurable thread count. Each actor loads the model on
the host and builds the evaluator once (rank tables, dense reference, cached block inputs) in the
mode its spec says (resident or streamed); token windows come once through the object store.
Candidates go to the least-loaded actor in small batches, which the actor scores as one population
(shared prefixes and shared levels computed once). Actors that die are restarted by Ray
(``max_restarts``) and their in-flight calls retried (``max_task_retries``); a call that still fails
is re-submitted to another actor, so a search never loses a result.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass

import ray
import torch

from orchestrator.candidates import Candidate
from orchestrator.results import ResultsTable
from pruning.errors import SparseAllocError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluatorSpec:
    """How every actor builds its evaluator: model, dtype, device, mode (resident / streamed), device
    memory budget per device (bytes; None = no limit), GPUs per actor, population size."""

    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    score_kind: str = "wanda"
    batch_size: int = 4
    threads: int = 1
    mode: str = "resident"
    memory_budget: int | None = None
    gpus_per_actor: int = 1
    population: int = 8
    owl_multipliers: tuple[float, ...] = ()


def actor_devices(spec: EvaluatorSpec) -> list[torch.device]:
    """The devices an actor uses: the GPUs Ray gave it (all visible ones), else ``spec.device``."""
    from pruning.load import pick_device

    device = pick_device(spec.device)
    if device.type == "cuda" and spec.device == "auto":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _auto_mode(model, spec: EvaluatorSpec, devices: list[torch.device], fitness_windows: torch.Tensor) -> str:
    """``--evaluator auto`` decided on the actor, from the memory plan for its own devices."""
    from orchestrator.plan import check_plan, detect_device_memory, make_plan, ModelShape

    budget = spec.memory_budget if spec.memory_budget is not None else detect_device_memory()[0]
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[next(model.parameters()).dtype]
    plan = make_plan(ModelShape.from_model(model), dtype=dtype, device_memory_bytes=budget,
                     gpus_per_actor=len(devices), fitness_tokens=int(fitness_windows.numel()),
                     fitness_seqlen=int(fitness_windows.shape[1]), batch_size=spec.batch_size,
                     population=spec.population)
    check_plan(plan)
    return plan.evaluator


class EvaluatorActor:
    """Holds one model copy plus its CandidateEvaluator; answers small fitness requests."""

    def __init__(self, spec: EvaluatorSpec, calibration: torch.Tensor, fitness_windows: torch.Tensor) -> None:
        from pruning.load import load_model, pick_dtype
        from scoring.evaluator import CandidateEvaluator

        torch.set_num_threads(spec.threads)
        devices = actor_devices(spec)
        model, _ = load_model(spec.model, pick_dtype(spec.dtype, devices[0]))  # on the host; placed below
        mode = spec.mode if spec.mode != "auto" else _auto_mode(model, spec, devices, fitness_windows)
        self.evaluator = CandidateEvaluator(model, calibration, fitness_windows, devices, spec.score_kind,
                                            spec.batch_size, progress=False, mode=mode,
                                            memory_budget=spec.memory_budget, owl_multipliers=spec.owl_multipliers)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict:
        evaluator = self.evaluator
        dtype = next(evaluator.model.parameters()).dtype
        return {"actor": self.name, "node": ray.get_runtime_context().get_node_id(),
                "blocks": evaluator.num_blocks, "weights": evaluator.block_weights,
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
        """Score a batch of candidates: those sharing fidelity, draw and metric as one population."""
        groups: dict[tuple, list[int]] = {}
        for index, candidate in enumerate(candidates):
            groups.setdefault((candidate.tokens, candidate.metric, candidate.draw), []).append(index)
        outcomes: list[dict] = [{} for _ in candidates]
        node = ray.get_runtime_context().get_node_id()
        for (tokens, metric, draw), members in groups.items():
            start = time.perf_counter()
            values = self.evaluator.fitness_many([candidates[i].profile for i in members], tokens, metric, draw)
            seconds = (time.perf_counter() - start) / len(members)
            for i, value in zip(members, values):
                outcomes[i] = {"fitness": value, "seconds": seconds, "actor": self.name, "node": node}
        return outcomes


class EvaluatorPool:
    """Spreads candidates over the actors; every result is written to the results table at once."""

    def __init__(self, spec: EvaluatorSpec, calibration: torch.Tensor, fitness_windows: torch.Tensor,
                 results: ResultsTable, num_actors: int | None = None, gpu: bool | None = None,
                 max_restarts: int = 3) -> None:
        """``gpu``: None = GPU actors when the cluster has GPUs now; True = GPU actors even when it has
        none yet (an autoscaling cluster then adds GPU workers for them); False = CPU actors."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 if gpu is None else gpu
        num_actors = num_actors or max(1, gpus // spec.gpus_per_actor)
        options = {"num_gpus": spec.gpus_per_actor, "num_cpus": 1} if use_gpu else {"num_cpus": spec.threads}
        remote = ray.remote(EvaluatorActor).options(max_restarts=max_restarts, max_task_retries=max_restarts,
                                                    **options)
        # Held for the pool's lifetime: a restarted actor is rebuilt from these same objects.
        self._token_refs = (ray.put(calibration), ray.put(fitness_windows))
        self.actors = [remote.remote(spec, *self._token_refs) for _ in range(num_actors)]
        self.infos = ray.get([actor.info.remote() for actor in self.actors])
        self.results = results
        self.population = spec.population
        self.max_per_actor = 2
        self.dead: set[int] = set()

    def close(self) -> None:
        """Stop the actors and drop every handle and object ref (before ``ray.shutdown``)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._token_refs = ()

    @property
    def num_blocks(self) -> int:
        return self.infos[0]["blocks"]

    @property
    def block_weights(self) -> list[int]:
        return self.infos[0]["weights"]

    @property
    def max_tokens(self) -> int:
        return self.infos[0]["max_tokens"]

    def _chunk(self, queue: list[Candidate], live: int) -> list[Candidate]:
        """The next batch for one actor: up to ``population`` candidates, fewer when that would leave
        other actors idle."""
        size = max(1, min(self.population, math.ceil(len(queue) / live)))
        batch, queue[:] = queue[:size], queue[size:]
        return batch

    def evaluate(self, candidates: list[Candidate]) -> list[float]:
        """Fitness per candidate (same order). Known keys come from the results table (resume);
        new ones are evaluated in parallel and written to it as each arrives."""
        pending = [c for c in dict((c.key, c) for c in candidates).values() if self.results.get(c.key) is None]
        queue = list(pending)
        in_flight: dict[ray.ObjectRef, tuple[list[Candidate], int]] = {}
        load = [0] * len(self.actors)
        while queue or in_flight:
            if len(self.dead) == len(self.actors):
                raise SparseAllocError("every evaluator actor has died; see the Ray logs for the cause")
            live = [i for i in range(len(self.actors)) if i not in self.dead]
            while queue and min(load[i] for i in live) < self.max_per_actor:
                index = min(live, key=lambda i: load[i])
                batch = self._chunk(queue, len(live))
                in_flight[self.actors[index].evaluate.remote(batch)] = (batch, index)
                load[index] += 1
            done, _ = ray.wait(list(in_flight), num_returns=1)
            batch, index = in_flight.pop(done[0])
            load[index] -= 1
            try:
                outcomes = ray.get(done[0])
            except ray.exceptions.RayActorError:
                log.warning("actor %d is gone after its restarts; re-submitting its candidates elsewhere", index)
                self.dead.add(index)
                queue.extend(batch)
                continue
            for candidate, outcome in zip(batch, outcomes):
                self.results.append({
                    "driver": candidate.driver, "key": candidate.key, "params": candidate.params,
                    "sparsities": list(candidate.sparsities), "nm": candidate.nm, "tokens": candidate.tokens or -1,
                    "draw": candidate.draw, "metric": candidate.metric, **outcome,
                })
        return [self.results.get(c.key)["fitness"] for c in candidates]
