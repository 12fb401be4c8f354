"""Evaluator actors on Ray and the pool that spreads candidates over them.

One actor per GPU (``num_gpus=1``) when the cluster has GPUs, else CPU actors with a configurable
thread count. Each actor loads the model and builds the fast evaluator once (score tables, dense
reference, cached block inputs); token windows come once through the object store. Actors that die
are restarted by Ray (``max_restarts``) and their in-flight calls retried (``max_task_retries``);
a call that still fails is re-submitted to another actor, so a search never loses a result.
"""

from __future__ import annotations

import logging
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
    """How every actor builds its evaluator (model, score kind, batch size, threads)."""

    model: str = "default"
    dtype: str = "auto"
    score_kind: str = "wanda"
    batch_size: int = 4
    threads: int = 1


class EvaluatorActor:
    """Holds one model copy plus its CandidateEvaluator; answers small fitness requests."""

    def __init__(self, spec: EvaluatorSpec, calibration: torch.Tensor, fitness_windows: torch.Tensor) -> None:
        from pruning.load import load_model, pick_device, pick_dtype
        from scoring.evaluator import CandidateEvaluator

        torch.set_num_threads(spec.threads)
        device = pick_device("auto")
        model, _ = load_model(spec.model, pick_dtype(spec.dtype, device))
        model.to(device)
        self.evaluator = CandidateEvaluator(model, calibration, fitness_windows, device, spec.score_kind,
                                            spec.batch_size, progress=False)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict:
        return {"actor": self.name, "node": ray.get_runtime_context().get_node_id(),
                "blocks": self.evaluator.num_blocks, "weights": self.evaluator.block_weights,
                "max_tokens": self.evaluator.max_tokens}

    def fisher_traces(self, windows: torch.Tensor) -> list[float]:
        from scoring.fisher import block_fisher_traces

        return block_fisher_traces(self.evaluator.model, windows, self.evaluator.device, progress=False)

    def outlier_ratios(self, multiplier: float) -> list[float]:
        from scoring.outliers import outlier_ratios

        return outlier_ratios(self.evaluator.tables, multiplier)

    def evaluate(self, candidate: Candidate) -> dict:
        start = time.perf_counter()
        fitness = self.evaluator.fitness(candidate.profile, candidate.tokens, candidate.metric, candidate.draw)
        return {"fitness": fitness, "seconds": time.perf_counter() - start, "actor": self.name,
                "node": ray.get_runtime_context().get_node_id()}


class EvaluatorPool:
    """Spreads candidates over the actors; every result is written to the results table at once."""

    def __init__(self, spec: EvaluatorSpec, calibration: torch.Tensor, fitness_windows: torch.Tensor,
                 results: ResultsTable, num_actors: int | None = None, gpu: bool | None = None,
                 max_restarts: int = 3) -> None:
        """``gpu``: None = GPU actors when the cluster has GPUs now; True = GPU actors even when it has
        none yet (an autoscaling cluster then adds GPU workers for them); False = CPU actors."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 if gpu is None else gpu
        num_actors = num_actors or max(1, gpus)
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": spec.threads}
        remote = ray.remote(EvaluatorActor).options(max_restarts=max_restarts, max_task_retries=max_restarts,
                                                    **options)
        # Held for the pool's lifetime: a restarted actor is rebuilt from these same objects.
        self._token_refs = (ray.put(calibration), ray.put(fitness_windows))
        self.actors = [remote.remote(spec, *self._token_refs) for _ in range(num_actors)]
        self.infos = ray.get([actor.info.remote() for actor in self.actors])
        self.results = results
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

    def evaluate(self, candidates: list[Candidate]) -> list[float]:
        """Fitness per candidate (same order). Known keys come from the results table (resume);
        new ones are evaluated in parallel and written to it as each arrives."""
        pending = [c for c in dict((c.key, c) for c in candidates).values() if self.results.get(c.key) is None]
        queue = list(pending)
        in_flight: dict[ray.ObjectRef, tuple[Candidate, int]] = {}
        load = [0] * len(self.actors)
        while queue or in_flight:
            if len(self.dead) == len(self.actors):
                raise SparseAllocError("every evaluator actor has died; see the Ray logs for the cause")
            live = [i for i in range(len(self.actors)) if i not in self.dead]
            while queue and min(load[i] for i in live) < self.max_per_actor:
                index = min(live, key=lambda i: load[i])
                candidate = queue.pop(0)
                in_flight[self.actors[index].evaluate.remote(candidate)] = (candidate, index)
                load[index] += 1
            done, _ = ray.wait(list(in_flight), num_returns=1)
            candidate, index = in_flight.pop(done[0])
            load[index] -= 1
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayActorError:
                log.warning("actor %d is gone after its restarts; re-submitting its candidate elsewhere", index)
                self.dead.add(index)
                queue.append(candidate)
                continue
            self.results.append({
                "driver": candidate.driver, "key": candidate.key, "params": candidate.params,
                "sparsities": list(candidate.sparsities), "nm": candidate.nm, "tokens": candidate.tokens or -1,
                "draw": candidate.draw, "metric": candidate.metric, **outcome,
            })
        return [self.results.get(c.key)["fitness"] for c in candidates]
