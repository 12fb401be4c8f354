"""The search's last stage: the finalists' real pruning passes as Ray tasks, and the winner.

Every finalist's pass is one Ray task (``num_gpus=1`` when the cluster has GPUs), all submitted at
once so they run side by side on different workers. A task loads the dense model from disk (never a
copy held by the driver), runs the sequential pass — block-offloaded when the model does not fit its
device's free memory —, measures held-out validation and test perplexity, and saves the pruned model
to ``RUN/finalists/<driver>/`` on its node. The dense test perplexity is one more task. The finalist
with the lowest validation perplexity wins and is copied to ``RUN/model``: from the local disk when
its task ran on the driver's node, else read from its node through Ray tasks pinned there, in chunks.

A finalist whose ``RUN/finalists/<driver>/metrics.json`` records the same inputs (profile, pruner,
model, dtype, token windows) is not pruned again on ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch

from orchestrator.runtime.candidates import DriverResult
from orchestrator.passes.prune import (choose_offload, device_free_bytes, device_info, dtype_name, pass_reserve_bytes,
                                     place_model, save_pruned)
from core.identity import fingerprint, versions, write_json
from orchestrator.runtime.rundir import staged_output
from core.errors import SparseAllocError
from core.profile import Profile

if TYPE_CHECKING:
    from orchestrator.search.run import SearchConfig

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # bytes per read when a winner's files come from another node
DENSE_FILE = "dense.json"


def finalists(results: dict[str, DriverResult], count: int | None = None) -> list[str]:
    """Drivers whose best profiles get the real final pass: the ``count`` best by search fitness
    (None: every driver; distinct profiles only), then tune-atp when it ran (the baseline every search
    is compared with)."""
    if count is not None and count < 1:
        raise SparseAllocError(f"--finalists must be at least 1, got {count}")
    chosen, seen = [], set()
    for name in sorted(results, key=lambda n: results[n].fitness):
        profile = (results[name].best.sparsities, results[name].best.nm)
        if (count is None or len(chosen) < count) and profile not in seen:
            chosen.append(name)
            seen.add(profile)
    if "tune-atp" in results and "tune-atp" not in chosen:
        chosen.append("tune-atp")
    return chosen


def selection_windows(validation: torch.Tensor, fitness_tokens: int, count: int) -> torch.Tensor:
    """Validation windows after those holding the search's fitness tokens (held out from the search)."""
    skip = math.ceil(fitness_tokens / validation.shape[1])
    if validation.shape[0] <= skip:
        raise SparseAllocError(f"the validation split holds {validation.shape[0]} windows of {validation.shape[1]} "
                               f"tokens; after the {fitness_tokens} fitness tokens (--fitness-windows x "
                               "--fitness-seqlen) none is left to choose the winner on: lower those, or "
                               "--selection-windows, or use a larger --data")
    return validation[skip : skip + count]


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
    from pruning.load import block_param_counts
    from pruning.pruners import get_pruner
    from pruning.sequential import prune_sequentially
    from scoring.perplexity import perplexity
    from scoring.sparsity import achieved_sparsity

    node = ray.get_runtime_context().get_node_id()
    start = time.perf_counter()
    model, tokenizer, device, dtype, offload = _load(job, calibration.shape[0], calibration.shape[1])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prune_sequentially(model, calibration, profile, get_pruner(job.pruner), device, job.batch_size, False, offload)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    validation = perplexity(model, selection, device, job.batch_size, False, offload=offload)
    test_ppl = perplexity(model, test, device, job.batch_size, False, offload=offload)
    eval_s = time.perf_counter() - start
    zero_shot = None
    if job.zero_shot:
        from scoring.zero_shot import zero_shot_accuracy

        zero_shot = zero_shot_accuracy(model, tokenizer, job.zero_shot["tasks"], job.zero_shot.get("include"),
                                       job.zero_shot.get("limit"), device, job.batch_size)
    metrics = {
        "driver": name, "model": job.model, "pruner": job.pruner,
        "validation_perplexity": validation, "test_perplexity": test_ppl, "pruned_perplexity": test_ppl,
        "prune_s": prune_s, "achieved_sparsity": achieved_sparsity(model), "profile": profile.to_json(),
        **device_info(device), "dtype": dtype_name(dtype), "offload": offload, "node": node,
        "inputs": job.inputs, "timings": {"load_s": load_s, "prune_s": prune_s, "eval_s": eval_s},
        "zero_shot": zero_shot,
        "versions": versions(),
    }
    if job.save:
        save_pruned(Path(job.out), True, model, tokenizer, profile, profile.mean(block_param_counts(model)), metrics)
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


def as_completed(refs: dict) -> Iterator[tuple[object, dict]]:
    """(``refs[ref]``, the task's result) for each ref of ``refs`` as it finishes."""
    waiting = dict(refs)
    while waiting:
        done, _ = ray.wait(list(waiting), num_returns=1)
        yield waiting.pop(done[0]), ray.get(done[0])


def _list_files(root: str) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every file under ``root``."""
    base = Path(root)
    if not base.is_dir():
        raise SparseAllocError(f"{root} is not on node {ray.get_runtime_context().get_node_id()}")
    return [(str(p.relative_to(base)), p.stat().st_size) for p in sorted(base.rglob("*")) if p.is_file()]


def _read_chunk(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def fetch_directory(node_id: str, src: Path, dst: Path, chunk_bytes: int = CHUNK_BYTES, skip: tuple = (),
                    in_flight: int = 4) -> None:
    """Copy the files under ``src`` on node ``node_id`` to ``dst`` here, read through Ray tasks pinned to
    that node, ``chunk_bytes`` at a time (a few reads in flight)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pinned = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    lister = ray.remote(num_cpus=0)(_list_files).options(scheduling_strategy=pinned)
    reader = ray.remote(num_cpus=0)(_read_chunk).options(scheduling_strategy=pinned)
    for relative, size in ray.get(lister.remote(str(src))):
        if relative in skip:
            continue
        target = Path(dst) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            pending: deque = deque()
            for offset in range(0, size, chunk_bytes):
                pending.append(reader.remote(str(Path(src) / relative), offset, chunk_bytes))
                if len(pending) >= in_flight:
                    handle.write(ray.get(pending.popleft()))
            while pending:
                handle.write(ray.get(pending.popleft()))


def _copy_local(src: Path, dst: Path, skip: tuple = ()) -> None:
    """Hard-link (else copy) every file under ``src`` into ``dst``: the finalist's directory stays for
    ``--resume`` without a second copy of the weights on disk."""
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if not path.is_file() or str(relative) in skip:
            continue
        target = dst / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def model_spec(spec: str) -> str:
    """``spec`` as a worker resolves it: local paths made absolute (workers may run elsewhere)."""
    local = Path(spec).expanduser()
    return str(local.resolve()) if local.exists() else spec


def task_resources(config: "SearchConfig", tasks: int) -> dict:
    """``num_gpus`` 1 per task for ``--device cuda`` (``auto``: when the cluster has GPUs or GPU workers
    were asked for), else CPU tasks sharing the largest node's cores."""
    device = getattr(config, "device", "auto")
    if device == "auto":
        gpu = ray.cluster_resources().get("GPU", 0) > 0 or bool(getattr(config, "actor_gpus", None))
    else:
        gpu = device.startswith("cuda")
    if gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    node_cpus = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1])
    cpus = max(1, min(node_cpus, max(config.threads, node_cpus // max(1, tasks))))
    return {"num_gpus": 0, "num_cpus": cpus}


def run_final_passes(config: "SearchConfig", data, selection: torch.Tensor, results: dict[str, DriverResult],
                     tokenizer=None) -> dict:
    """Final pass for each finalist (Ray tasks, in parallel); the one with the lowest held-out validation
    perplexity wins and is saved to ``RUN/model``; returns (and writes) the summary. Ray must be running.
    (``tokenizer`` is not needed: each task saves the tokenizer it loads with the model.)"""
    if not ray.is_initialized():
        raise RuntimeError("run_final_passes needs Ray; search initialises it")
    run = Path(config.out).resolve()
    names = finalists(results, config.finalists)
    model = model_spec(config.model)
    device = getattr(config, "device", "auto")
    dtype = getattr(config, "dtype", "auto")
    offload = getattr(config, "offload", None)
    windows = window_digests(data.calibration, selection, data.test)

    jobs: dict[str, PassJob] = {}
    passes: dict[str, dict] = {}
    for name in names:
        inputs = pass_inputs(model, device, dtype, config.pruner, windows, results[name].best)
        job = PassJob(model, config.pruner, device, dtype, offload, config.batch_size, config.threads,
                      str(run / "finalists" / name), inputs)
        stored = stored_metrics(run / "finalists" / name / "metrics.json", inputs)
        if stored is None:
            jobs[name] = job
        else:
            log.info("%s: final pass found in %s, not redone", name, job.out)
            passes[name] = {**stored, "node": ray.get_runtime_context().get_node_id(), "reused": True}
    dense_inputs = {"model": model, "device": device, "dtype": dtype, "test": windows["test"]}
    dense = stored_metrics(run / "finalists" / DENSE_FILE, dense_inputs)

    resources = task_resources(config, len(jobs) + (dense is None))
    tasks = PassTasks(resources, data.calibration, selection, data.test)
    threads = resources["num_cpus"]
    refs: dict = {}
    if jobs or dense is None:
        log.info("%d final pass task(s) with %s each", len(jobs) + (dense is None), resources)
        for name, job in jobs.items():
            refs[tasks.submit(replace(job, threads=threads), name, results[name].best)] = name
        if dense is None:
            refs[tasks.submit_dense(PassJob(model, config.pruner, device, dtype, offload, config.batch_size,
                                            threads, str(run / "finalists"), dense_inputs))] = None
    for name, outcome in as_completed(refs):
        if name is None:
            dense = outcome
            (run / "finalists").mkdir(parents=True, exist_ok=True)
            write_json(run / "finalists" / DENSE_FILE, dense)
            log.info("dense test perplexity %.3f", dense["test_perplexity"])
            continue
        passes[name] = {**outcome, "reused": False}
        log.info("%s: validation perplexity %.3f, test perplexity %.3f after the %s pass (%s%s)", name,
                 outcome["validation_perplexity"], outcome["test_perplexity"], config.pruner, outcome["device"],
                 ", offloaded" if outcome["offload"] else "")
    passes = {name: passes[name] for name in names}
    best = min(names, key=lambda name: passes[name]["validation_perplexity"])
    return _finish(config, run, data, selection, results, names, passes, best, dense)


def driver_summary(results: dict[str, DriverResult]) -> dict:
    """The summary's entry per driver: fitness, cost, best profile and the driver's details."""
    return {name: {"validation_kl": r.fitness, "evaluations": r.evaluations, "seconds": r.details.get("seconds"),
                   "profile": list(r.best.sparsities), "details": {k: v for k, v in r.details.items() if k != "seconds"}}
            for name, r in results.items()}


def _pass_row(metrics: dict) -> dict:
    """The summary's entry for one final pass."""
    keep = ("validation_perplexity", "test_perplexity", "prune_s", "node", "offload", "device", "device_name",
            "dtype", "reused")
    return {**{k: metrics[k] for k in keep if k in metrics}, "achieved": metrics.get("achieved_sparsity")}


def same_profile_passes(results: dict[str, DriverResult], passes: dict[str, dict]) -> dict[str, dict]:
    """The final-pass rows of every driver: a driver left out of the finalists because another's best
    profile is the same gets that finalist's row, marked ``same_profile_as``."""
    rows = {}
    for name, result in results.items():
        if name in passes:
            rows[name] = passes[name]
            continue
        twin = next((other for other in passes if results[other].best.sparsities == result.best.sparsities
                     and results[other].best.nm == result.best.nm), None)
        if twin is not None:
            rows[name] = {**passes[twin], "same_profile_as": twin}
    return rows


def _finish(config: "SearchConfig", run: Path, data, selection: torch.Tensor, results: dict[str, DriverResult],
            names: list[str], passes: dict[str, dict], best: str, dense: dict) -> dict:
    winner, final = results[best], passes[best]
    summary = {
        "winner": winner.driver, "winner_test_perplexity": final["test_perplexity"],
        "dense_test_perplexity": dense["test_perplexity"],
        "selection": {"finalists": names, "criterion": f"validation perplexity after the {config.pruner} pass",
                      "tokens": int(selection.numel())},
        "drivers": driver_summary(results),
        "final_passes": {name: {**_pass_row(row), **({"same_profile_as": row["same_profile_as"]}
                                                          if "same_profile_as" in row else {})}
                         for name, row in same_profile_passes(results, passes).items()},
        "device": final.get("device"), "dtype": final.get("dtype"),
    }
    if "tune-atp" in passes:
        summary["atp_test_perplexity"] = passes["tune-atp"]["test_perplexity"]
        summary["winner_vs_atp"] = final["test_perplexity"] / summary["atp_test_perplexity"] - 1
    metrics = {"model": config.model, "pruner": config.pruner, "target_sparsity": config.sparsity,
               "dense_perplexity": dense["test_perplexity"], "pruned_perplexity": final["test_perplexity"],
               "validation_perplexity": final["validation_perplexity"],
               "achieved_sparsity": final["achieved_sparsity"], "profile": winner.best.to_json(),
               "protocol": {**data.protocol, "fitness": "KL(dense || pruned) on validation prefix",
                            "fitness_tokens": config.fitness_windows * config.fitness_seqlen,
                            "selection": summary["selection"]},
               "device": final.get("device"), "device_name": final.get("device_name"), "dtype": final.get("dtype"),
               "offload": final.get("offload"), "seed": config.seed,
               "timings": {"prune_s": final["prune_s"]}, "versions": versions(),
               "search": {"winner": winner.driver, "run_dir": str(config.out)}}
    source = run / "finalists" / best
    with staged_output(run / "model", True) as staging:
        if final["node"] == ray.get_runtime_context().get_node_id():
            _copy_local(source, staging, skip=("metrics.json",))
        else:
            log.info("copying the winner's files from node %s", final["node"])
            fetch_directory(final["node"], source, staging, skip=("metrics.json",))
        write_json(staging / "metrics.json", metrics)
    write_json(run / "summary.json", summary)
    return summary
