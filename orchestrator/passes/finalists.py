"""The search's last stage: the finalists' real pruning passes as Ray tasks, and the winner's files.

Every finalist's pass is one Ray task (:mod:`orchestrator.passes.tasks`), all submitted at once so
they run side by side on different workers; the dense test perplexity is one more task. A pass saves
its model to ``RUN/finalists/<driver>/`` on its node; its metrics come back to the driver and are
kept in ``RUN/finalists/<driver>/metrics.json`` here, so a finalist whose stored metrics record the
same inputs (profile, pruner, model, dtype, token windows) is not pruned again on ``--resume``.
The winner's files are copied to ``RUN/model`` (:mod:`orchestrator.runtime.transfer`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import ray
import torch

from core.errors import SparseAllocError
from core.identity import write_json
from core.profile import Profile
from orchestrator.passes.tasks import (PassJob, PassTasks, as_completed, dense_pass_inputs, pass_inputs, stored_metrics,
                                       task_resources, window_digests)
from orchestrator.runtime.transfer import copy_local, fetch_directory
from orchestrator.runtime.candidates import DriverResult
from orchestrator.runtime.cluster import alive_nodes
from orchestrator.runtime.rundir import staged_output
from scoring.perplexity import paired_gap

log = logging.getLogger(__name__)

DENSE_FILE = "dense.json"


def finalists(results: dict[str, DriverResult], count: int | None = None,
              baselines: dict[str, DriverResult] | None = None) -> list[str]:
    """Profiles that get the real final pass: the ``count`` best drivers by search fitness (None: every
    driver; distinct profiles only), then tune-atp when it ran (the ATP pick every search is compared
    with), then each of ``baselines`` (the uniform profile) unless a finalist already has its profile."""
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
    for name, baseline in (baselines or {}).items():
        profile = (baseline.best.sparsities, baseline.best.nm)
        if profile not in seen:  # a baseline whose profile a finalist has shares that finalist's pass
            chosen.append(name)
            seen.add(profile)
    return chosen


def run_final_passes(run: Path, template: PassJob, calibration: torch.Tensor, selection: torch.Tensor,
                     test: torch.Tensor, profiles: dict[str, Profile], gpu: bool,
                     node_wait_s: float = 600.0) -> tuple[dict[str, dict], dict]:
    """The final pass of every profile of ``profiles`` (Ray tasks, in parallel; ``template`` gives the
    model, pruner, device, dtype and batch size) and the dense test perplexity; returns the passes' metrics
    by name and the dense metrics. Stored results with the same inputs are reused. Ray must be running."""
    if not ray.is_initialized():
        raise RuntimeError("run_final_passes needs Ray; search initialises it")
    run = Path(run).resolve()
    windows = window_digests(calibration, selection, test)
    jobs: dict[str, PassJob] = {}
    passes: dict[str, dict] = {}
    for name, profile in profiles.items():
        inputs = pass_inputs(template.model, template.device, template.dtype, template.pruner, windows, profile)
        job = replace(template, out=str(run / "finalists" / name), inputs=inputs)
        stored = stored_metrics(run / "finalists" / name / "metrics.json", inputs)
        if stored is None or not _reachable(run / "finalists" / name, stored):
            jobs[name] = job
        else:
            log.info("%s: final pass found in %s, not redone", name, job.out)
            passes[name] = {**stored, "reused": True}
    dense_inputs = dense_pass_inputs(template, windows)
    dense = stored_metrics(run / "finalists" / DENSE_FILE, dense_inputs)

    resources = task_resources(gpu, template.threads, len(jobs) + (dense is None))
    tasks = PassTasks(resources, calibration, selection, test)
    threads = resources["num_cpus"]
    refs: dict = {}
    if jobs or dense is None:
        log.info("%d final pass task(s) with %s each", len(jobs) + (dense is None), resources)
        for name, job in jobs.items():
            refs[tasks.submit(replace(job, threads=threads), name, profiles[name])] = name
        if dense is None:
            refs[tasks.submit_dense(replace(template, threads=threads, out=str(run / "finalists"),
                                            inputs=dense_inputs))] = None
    for name, outcome in as_completed(refs, resources, node_wait_s):
        if name is None:
            dense = outcome
            write_json(run / "finalists" / DENSE_FILE, dense)
            log.info("dense test perplexity %.3f", dense["test_perplexity"])
            continue
        passes[name] = {**outcome, "reused": False}
        keep_metrics(run / "finalists" / name, outcome)
        log.info("%s: validation perplexity %.3f, test perplexity %.3f after the %s pass (%s%s)", name,
                 outcome["validation_perplexity"], outcome["test_perplexity"], template.pruner, outcome["device"],
                 ", offloaded" if outcome["offload"] else "")
    return {name: passes[name] for name in profiles}, dense


def keep_metrics(folder: Path, metrics: dict) -> None:
    """A pass's metrics in ``folder`` on this (the driver's) node: a task that ran on another node wrote
    them on that node's disk only."""
    if not (folder / "metrics.json").exists():
        write_json(folder / "metrics.json", metrics)


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _reachable(folder: Path, stored: dict) -> bool:
    """Whether a stored pass's model can still be read: on this node's disk, or on its node, alive."""
    return _has_model(folder) or stored.get("node") in alive_nodes()


def save_model(run: Path, name: str, row: dict, metrics: dict) -> None:
    """``RUN/model``: finalist ``name``'s files with ``metrics`` as its ``metrics.json``, copied from this
    node's disk or read from the node ``row`` (its pass's metrics) names; kept as it is when it already
    holds this pass (a resumed run)."""
    run = Path(run).resolve()
    if _has_model(run / "model") and stored_metrics(run / "model" / "metrics.json", metrics["inputs"]) is not None:
        return
    source = run / "finalists" / name
    with staged_output(run / "model", True) as staging:
        if _has_model(source):
            copy_local(source, staging, skip=("metrics.json",))
        elif row["node"] in alive_nodes():
            log.info("copying the winner's files from node %s", row["node"])
            fetch_directory(row["node"], source, staging, skip=("metrics.json",))
        else:
            raise SparseAllocError(f"the winner's pruned model ({name}) was on node {row['node']}, which is gone; "
                                   "rerun the same command with --resume: its pass is made again")
        write_json(staging / "metrics.json", metrics)


def driver_summary(results: dict[str, DriverResult]) -> dict:
    """The summary's entry per driver: fitness, cost, best profile and the driver's details."""
    return {name: {"validation_kl": r.fitness, "evaluations": r.evaluations, "seconds": r.details.get("seconds"),
                   "profile": list(r.best.sparsities), "details": {k: v for k, v in r.details.items() if k != "seconds"}}
            for name, r in results.items()}


def pass_row(metrics: dict) -> dict:
    """The summary's entry for one final pass."""
    keep = ("validation_perplexity", "test_perplexity", "prune_s", "node", "offload", "device", "device_name",
            "dtype", "reused")
    return {**{k: metrics[k] for k in keep if k in metrics}, "achieved": metrics.get("achieved_sparsity")}


PICK_STANDARD_ERRORS = 2.0  # a winner this many standard errors ahead of the runner-up is a clear pick


def pick_margin(passes: dict[str, dict], names: list[str], best: str) -> dict:
    """How far the winner ``best`` is ahead of the runner-up on the selection windows: the paired gap in mean
    NLL (runner-up minus winner, nats; exp(gap) is their perplexity ratio), its standard error over the
    windows and whether it is clear (more than ``PICK_STANDARD_ERRORS`` of them). Empty when there is no
    runner-up or a pass kept no per-window NLLs (a pass stored by an older version)."""
    others = [n for n in names if n != best and passes[n].get("validation_window_nll")]
    if not others or not passes[best].get("validation_window_nll"):
        return {}
    runner = min(others, key=lambda name: passes[name]["validation_perplexity"])
    gap, se = paired_gap(passes[best]["validation_window_nll"], passes[runner]["validation_window_nll"])
    return {"runner_up": runner, "nll_gap": gap, "nll_gap_se": se,
            "windows": len(passes[best]["validation_window_nll"]), "clear": gap > PICK_STANDARD_ERRORS * se}


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
