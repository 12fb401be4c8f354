"""Final passes and the dense perplexity as Ray tasks: what a task needs (:class:`PassJob`), the task
bodies, and :class:`PassTasks`, which submits them with one object-store copy of each token window.

A task loads the dense model from its spec (never a copy held by the driver), runs the sequential
pass — block-offloaded when the model does not fit its device's free memory —, measures held-out
validation and test perplexity and saves the pruned model to ``job.out`` on its node. A result whose
``metrics.json`` records the same ``inputs`` (profile, pruner, model, dtype, token windows) is reused
instead of being computed again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from core.identity import fingerprint, versions, write_json
from core.profile import Profile
from orchestrator.passes.model_io import (choose_offload, device_free_bytes, device_info,
                                          pass_reserve_bytes, place_model, save_pruned)
from core.errors import SparseAllocError
from orchestrator.runtime.cluster import alive_nodes
from orchestrator.runtime.rundir import staged_output
from pruning.load import dtype_name


log = logging.getLogger(__name__)
NODE_CHECK_S = 2.0  # how often the node table is read while passes run


@dataclass(frozen=True)
class PassJob:
    """What a final-pass task needs besides its profile and token windows."""

    model: str  # as every node resolves it: absolute when it is a local path
    pruner: str
    device: str  # cpu, else the task's GPU (or the CPU when it has none)
    dtype: str
    offload: bool | None
    batch_size: int
    threads: int  # torch threads of a CPU task
    out: str  # absolute: RUN/finalists/<driver> (or RUN/finalists for the dense task)
    inputs: dict  # what the result depends on; a stored result with the same inputs is reused
    save: bool = True  # save the pruned model beside its metrics (a sweep keeps only the metrics)
    zero_shot: dict | None = None  # lm-eval tasks to score the pruned model on: {"tasks", "include", "limit"}


def _load(job: PassJob, calibration_windows: int, seqlen: int):
    """Model (placed, offloaded when needed), tokenizer, device, dtype and offload flag on this worker."""
    from pruning.load import load_model, pick_device, pick_dtype
    from pruning.offload import tensor_bytes

    device = pick_device("cpu" if job.device == "cpu" else "auto")
    if device.type == "cpu":
        torch.set_num_threads(job.threads)
    dtype = pick_dtype(job.dtype, device)
    model, tokenizer = load_model(job.model, dtype)
    offload = choose_offload(job.offload, tensor_bytes(model),
                             pass_reserve_bytes(model, calibration_windows, seqlen, job.batch_size),
                             device_free_bytes(device))
    place_model(model, device, offload)
    return model, tokenizer, device, dtype, offload


def final_pass_task(job: PassJob, name: str, profile: Profile, calibration: torch.Tensor, selection: torch.Tensor,
                    test: torch.Tensor) -> dict:
    """One finalist's pass on this worker: load, prune sequentially, validation and test perplexity,
    save to ``job.out``; returns the pass's metrics (with this node's id)."""
    from pruning.load import unit_layout
    from pruning.pruners import get_pruner
    from pruning.sequential import prune_sequentially
    from scoring.perplexity import perplexity, window_nlls
    from scoring.sparsity import achieved_sparsity

    node = ray.get_runtime_context().get_node_id()
    start = time.perf_counter()
    model, tokenizer, device, dtype, offload = _load(job, calibration.shape[0], calibration.shape[1])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prune_sequentially(model, calibration, profile, get_pruner(job.pruner), device, job.batch_size, False, offload)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    validation_nlls = window_nlls(model, selection, device, job.batch_size, False, offload=offload)
    validation = math.exp(sum(validation_nlls) / len(validation_nlls))
    test_ppl = perplexity(model, test, device, job.batch_size, False, offload=offload)
    eval_s = time.perf_counter() - start
    zero_shot = None
    if job.zero_shot:
        from scoring.zero_shot import zero_shot_accuracy

        zero_shot = zero_shot_accuracy(model, tokenizer, job.zero_shot["tasks"], job.zero_shot.get("include"),
                                       job.zero_shot.get("limit"), device, job.batch_size)
    metrics = {
        "driver": name, "model": job.model, "pruner": job.pruner,
        "validation_perplexity": validation, "validation_window_nll": validation_nlls,
        "test_perplexity": test_ppl, "pruned_perplexity": test_ppl,
        "prune_s": prune_s, "achieved_sparsity": achieved_sparsity(model), "profile": profile.to_json(),
        **device_info(device), "dtype": dtype_name(dtype), "offload": offload, "node": node,
        "inputs": job.inputs, "timings": {"load_s": load_s, "prune_s": prune_s, "eval_s": eval_s},
        "zero_shot": zero_shot,
        "versions": versions(),
    }
    if job.save:
        target = profile.mean(unit_layout(model).weights(profile.granularity))
        save_pruned(Path(job.out), True, model, tokenizer, profile, target, metrics)
    else:
        with staged_output(Path(job.out), True) as staging:
            write_json(staging / "metrics.json", metrics)
    return metrics


def dense_perplexity_task(job: PassJob, calibration_windows: int, test: torch.Tensor) -> dict:
    """The dense model's test perplexity on this worker: from this node's dense perplexity cache
    (``scoring.dense_cache``) when an earlier run computed it for the same model, test windows, dtype
    and device type — the model is then not even loaded —, else computed (and cached)."""
    from pruning.load import pick_device, pick_dtype
    from scoring.dense_cache import cached_dense_perplexity
    from scoring.perplexity import perplexity

    node = ray.get_runtime_context().get_node_id()
    device = pick_device("cpu" if job.device == "cpu" else "auto")
    dtype = pick_dtype(job.dtype, device)
    loaded: dict = {"offload": None}

    def compute() -> float:
        model, _, place, _, offload = _load(job, calibration_windows, test.shape[1])
        loaded["offload"] = offload
        return perplexity(model, test, place, job.batch_size, False, offload=offload)

    ppl, cached = cached_dense_perplexity(job.model, test, dtype, device, compute)
    return {"test_perplexity": ppl, "cached": cached, **device_info(device), "dtype": dtype_name(dtype),
            "offload": loaded["offload"], "node": node, "inputs": job.inputs}


def stored_metrics(path: Path, inputs: dict) -> dict | None:
    """The metrics stored at ``path`` when they were computed from the same ``inputs``."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stored if stored.get("inputs") == json.loads(json.dumps(inputs)) else None


def window_digests(calibration: torch.Tensor, selection: torch.Tensor, test: torch.Tensor) -> dict[str, str]:
    """The token windows a pass's metrics depend on, as digests (part of every pass's ``inputs``)."""
    return {"calibration": fingerprint(calibration), "selection": fingerprint(selection), "test": fingerprint(test)}


def pass_inputs(model: str, device: str, dtype: str, pruner: str, windows: dict[str, str], profile: Profile,
                **extra) -> dict:
    """Everything a final pass's metrics depend on: a stored result with equal inputs is reused."""
    return {"model": model, "device": device, "dtype": dtype, "pruner": pruner, **windows,
            "profile": profile.to_json(), **extra}


def dense_pass_inputs(template: PassJob, windows: dict[str, str]) -> dict:
    """Everything the dense test perplexity depends on (a stored result with equal inputs is reused)."""
    return {"model": template.model, "device": template.device, "dtype": template.dtype, "test": windows["test"]}


class PassTasks:
    """Final-pass and dense-perplexity Ray tasks with ``resources`` each, sharing one object-store copy
    of each token window (put when the first task that needs it is submitted)."""

    def __init__(self, resources: dict, calibration: torch.Tensor, selection: torch.Tensor, test: torch.Tensor):
        self.resources = resources
        self._windows = [calibration, selection, test]
        self._refs: list = [None] * 3
        self._pass = ray.remote(final_pass_task).options(**resources)
        self._dense = ray.remote(dense_perplexity_task).options(**resources)

    def _ref(self, index: int) -> "ray.ObjectRef":
        if self._refs[index] is None:
            self._refs[index] = ray.put(self._windows[index])
        return self._refs[index]

    def submit(self, job: PassJob, name: str, profile: Profile) -> "ray.ObjectRef":
        """``profile``'s final pass; its result is ``final_pass_task``'s metrics."""
        return self._pass.remote(job, name, profile, *(self._ref(i) for i in range(3)))

    def submit_dense(self, job: PassJob) -> "ray.ObjectRef":
        """The dense model's test perplexity; its result is ``dense_perplexity_task``'s metrics."""
        return self._dense.remote(job, self._windows[0].shape[0], self._ref(2))


def as_completed(refs: dict, resources: dict | None = None, node_wait_s: float = 600.0,
                 ) -> Iterator[tuple[object, dict]]:
    """(``refs[ref]``, the task's result) for each ref of ``refs`` as it finishes.

    Meanwhile it watches the nodes: a node that dies is said at once (Ray runs its passes again
    elsewhere); when no live node has the tasks' ``resources`` it waits at most ``node_wait_s`` for one,
    with a progress line, then ends with an error that says what is kept and how to resume. A task
    that fails is one clear error naming it."""
    waiting, seen = dict(refs), alive_nodes()
    unplaceable_since = said = None
    while waiting:
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=NODE_CHECK_S)
        if done:
            name = waiting.pop(done[0])
            try:
                yield name, ray.get(done[0])
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise SparseAllocError(f"the final pass of {name or 'the dense model'} failed: {type(cause).__name__}: "
                                       f"{(str(cause).strip().splitlines() or [''])[0]}; the passes finished so far are "
                                       "kept: rerun the same command with --resume") from None
            continue
        alive = alive_nodes()
        for node in seen - alive:
            log.warning("node %s is gone: the final passes it was running are run again on another node", node[:12])
        seen = alive
        if resources is None or _placeable(resources):
            unplaceable_since = None
            continue
        now = time.monotonic()
        unplaceable_since = unplaceable_since or now
        if said is None or now - said >= 30:
            said = now
            log.warning("%d final pass(es) wait for a node with %s: %.0f s of %.0f s (--node-wait-minutes)", len(waiting),
                        resources, now - unplaceable_since, node_wait_s)
        if now - unplaceable_since > node_wait_s:
            raise SparseAllocError(f"{len(waiting)} final pass(es) found no node with {resources} within "
                                   f"{node_wait_s / 60:g} min (--node-wait-minutes); the search's results and the passes "
                                   "finished so far are kept: start a node and rerun the same command with --resume "
                                   "(finished passes are not redone)")


def _placeable(resources: dict) -> bool:
    """Whether some live node has ``resources`` (``num_cpus``/``num_gpus``) in all."""
    need = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0)}
    return any(all(node["Resources"].get(key, 0) >= amount for key, amount in need.items())
               for node in ray.nodes() if node.get("Alive"))


def model_spec(spec: str) -> str:
    """``spec`` as a worker resolves it: local paths made absolute (workers may run elsewhere)."""
    local = Path(spec).expanduser()
    return str(local.resolve()) if local.exists() else spec


def task_resources(gpu: bool, threads: int, tasks: int) -> dict:
    """One GPU per task on GPU workers, else CPU tasks sharing the largest node's cores among ``tasks``
    tasks (``threads`` each at least)."""
    if gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    node_cpus = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1])
    cpus = max(1, min(node_cpus, max(threads, node_cpus // max(1, tasks))))
    return {"num_gpus": 0, "num_cpus": cpus}
