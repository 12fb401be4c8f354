"""``sparsealloc sweep SPEC.yaml --out DIR``: models × targets × pruners × methods as one Ray workload.

For each model, one evaluator pool is built and serves every cell of that model (its rank tables do
not depend on the target); each cell's method proposes candidate profiles through it (searches keep
their evaluations in the cell's own results table). The pool is then closed and every candidate's
real final pass is submitted as a Ray task at once (``num_gpus=1`` on GPU clusters); they finish
before the next model's pool takes the devices. A cell's pick is its candidate with the lowest
validation perplexity.

Layout of ``DIR``: ``spec.yaml`` (as given), ``sweep.json`` (identity, cells, counts of the last
invocation), ``models/<model>/`` (the model's Fisher traces and OWL ratios), ``cells/<cell>/`` (a
search-like run dir: ``proposal.json``, ``results/``, ``best-<driver>.json``, ``summary.json``),
``passes/<digest>/metrics.json`` (one final pass; the pruned model too with ``save_models: true``),
``table.parquet`` (one row per final pass) and the report. Rerunning with ``--resume`` skips cells
whose proposal is written and passes whose metrics are, and resumes interrupted searches from their
results tables.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from core.errors import SparseAllocError
from core.identity import atomic_file, cache_key, write_json
from core.profile import Profile
from core.units import UnitLayout
from orchestrator.passes.finalists import keep_metrics
from orchestrator.passes.tasks import (PassTasks, as_completed, dense_pass_inputs, model_spec, pass_inputs,
                                       stored_metrics, task_resources, window_digests)
from orchestrator.runtime.transfer import fetch_directory
from orchestrator.runtime.clock import RunClock
from orchestrator.runtime.cluster import check_model_on_nodes, init_ray
from orchestrator.runtime.results import ResultsTable
from orchestrator.runtime.rundir import check_writable, clear_run_dir, lock_run_dir, read_record, staged_output
from orchestrator.search.config import SearchConfig, check_protocol
from orchestrator.search.registry import DRIVERS, driver_plan
from orchestrator.search.run import make_pool, pass_template
from orchestrator.search.settings import Settings, Tokens, actor_count, resolve, token_sets
from orchestrator.sweep.allocations import ALLOCATIONS, CellContext
from orchestrator.sweep.spec import Cell, SweepSpec, model_slug, read_spec
from pruning.pruners import PRUNERS
from search_spaces import families

log = logging.getLogger(__name__)

TABLE = "table.parquet"


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be loaded (its config read on the meta device), or None."""
    from orchestrator.runtime.plan import shape_of

    try:
        shape_of(model)
    except Exception as exc:  # any failure to read the model is a spec problem to list
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def load_sweep_spec(path: Path, check_models: bool = True) -> SweepSpec:
    """The checked spec at ``path`` (every problem listed in one error)."""
    methods = {name: allocation.searches for name, allocation in ALLOCATIONS.items()}
    return read_spec(path, methods, list(PRUNERS), model_problem if check_models else None)


def search_allowance(budget: dict, spent: list[dict], searches_left: int) -> dict:
    """One search's budget (evals / minutes / tokens). ``per: search`` (default): the spec's budget.
    ``per: sweep``: an even share of what the searches so far (``spent``: their evaluations, seconds
    and tokens) left of the whole sweep's budget, at least one evaluation, token and second."""
    limits = {key: budget[key] for key in ("evals", "minutes", "tokens") if key in budget}
    if budget.get("per", "search") == "search":
        return limits
    used = {"evals": sum(s["evaluations"] for s in spent), "minutes": sum(s["seconds"] for s in spent) / 60,
            "tokens": sum(s["tokens"] for s in spent)}
    share = {key: (total - used[key]) / max(1, searches_left) for key, total in limits.items()}
    floor = {"evals": 1, "minutes": 1 / 60, "tokens": 1}
    return {key: max(floor[key], int(value) if key != "minutes" else value) for key, value in share.items()}


def _model_config(spec: SweepSpec, model: str, out: Path, progress: bool) -> SearchConfig:
    """The search settings every cell of ``model`` starts from: the spec's protocol, Wanda rank tables
    (one pool per model serves every pruner's cells); each cell sets its target, method and budget."""
    return SearchConfig(out=out, method="all", pruner=spec.pruners[0], model=model, level_source="wanda",
                        progress=progress, **spec.protocol)


def _prepare(spec_path: Path, spec: SweepSpec, out: Path, resume: bool, overwrite: bool) -> str:
    """Create (or, ``resume``, check) the locked sweep directory; returns the sweep's run id."""
    stored = out / "sweep.json"
    if resume:
        if not stored.exists():
            raise SparseAllocError(f"--resume: {out} holds no sweep (no sweep.json); run without --resume first")
        previous = read_record(stored, "restore it from a backup, or start the sweep anew in another --out (the "
                                       "passes already made there are not reused)")
        stored_identity = {k: v for k, v in previous["identity"].items() if k != "budget"}  # older sweeps had it
        # Sweeps from before kl-seq searched with dense-table KL at the top: a spec saying so resumes them.
        stored_identity.setdefault("top_fitness", "kl")
        stored_identity.setdefault("sequential_windows", spec.protocol["sequential_windows"])
        stored_identity.setdefault("granularity", "block")  # sweeps from before --granularity were per block
        identity = spec.identity()
        changed = sorted(k for k in identity if stored_identity.get(k) != identity[k])
        if changed:
            raise SparseAllocError(f"--resume with a spec whose protocol differs ({', '.join(changed)}); only "
                                   "models, targets, pruners and methods may change")
        return previous["run_id"]
    if overwrite:
        clear_run_dir(out)
    shutil.copyfile(spec_path, out / "spec.yaml")
    run_id = uuid.uuid4().hex[:12]
    write_json(stored, {"run_id": run_id, "identity": spec.identity()})
    return run_id


_PROPOSAL_FIX = ("delete it and rerun with --resume: the cell's candidates are proposed again (a search from its "
                 "results table, without evaluating anything twice)")


@dataclass
class _Pending:
    """A final pass submitted (or found done) for one candidate of one cell."""

    cell: Cell
    candidate: str
    profile: Profile
    key: str
    ref: object = None
    metrics: dict | None = None
    reused: bool = False


def _nm_rounded(profile: Profile, cell: Cell, layout: UnitLayout) -> Profile:
    """An N:M target's candidate on the mixed N:M menu of its M (plain N:M when uniform)."""
    nm = cell.nm
    if nm is None:
        return profile
    if len(set(profile.sparsities)) == 1:
        uniform = Profile.uniform_nm(len(profile.sparsities), nm)
        return Profile(uniform.sparsities, uniform.nm, profile.granularity)
    rounded = families.nm_profile(list(profile.sparsities), cell.sparsity, nm[1], layout.weights(profile.granularity))
    return Profile(rounded.sparsities, rounded.nm, profile.granularity)


def _search_cost(cell_dir: Path) -> tuple[int, int]:
    """(fitness tokens, evaluations) the cell's drivers were charged, as their budgets counted them
    (requests the results table answered included), from the cell's ``summary.json``."""
    summary = cell_dir / "summary.json"
    if not summary.exists():
        return 0, 0
    record = read_record(summary, f"delete it and rerun with --resume: the cell's search is answered from "
                                  f"{cell_dir / 'results'}")
    details = [d["details"] for d in record["drivers"].values()]
    return sum(d.get("tokens", 0) for d in details), sum(d.get("evaluations_charged", 0) for d in details)


def _propose(cell: Cell, spec: SweepSpec, base: Settings, pool, tokens: Tokens, cell_dir: Path, model_dir: Path,
             run_id: str, budget: dict) -> dict:
    """Run the cell's method through ``pool`` within ``budget`` (evals / minutes / tokens, for a
    searching method); writes and returns ``cell_dir/proposal.json``."""
    resume = (cell_dir / "results").is_dir()
    cell_dir.mkdir(parents=True, exist_ok=True)
    allocation = ALLOCATIONS[cell.method]
    method = cell.method if cell.method in DRIVERS else "all"
    config = replace(base.config, out=cell_dir, method=method, sparsity=cell.sparsity, pruner=cell.pruner,
                     nm_m=cell.nm[1] if cell.nm else None, resume=resume, budget_evals=budget.get("evals"),
                     budget_minutes=budget.get("minutes"),
                     budget_tokens=None if budget.get("tokens") is None else int(budget["tokens"]))
    settings = replace(base, config=config, drivers=driver_plan(method, config.shares))
    # A search keeps its rows in the cell's own table (resume answers from it); others evaluate nothing.
    pool.results = ResultsTable(cell_dir if allocation.searches else model_dir, run_id)
    clock = RunClock(cell_dir)
    try:
        with clock.phase("search"):
            if cell.sparsity == 0.0:  # dense: every method gives the same profile
                proposal = [("uniform", families.uniform(pool.num_blocks, 0.0))]
            else:
                context = CellContext(pool, settings, tokens.calibration, tokens.top_tokens, clock, model_dir,
                                      None if config.budget_minutes is None else config.budget_minutes * 60,
                                      spec.atp_grid, spec.owl_m, spec.owl_lambda)
                proposal = allocation.propose(context)
        seconds = clock.spent("search")
    finally:
        clock.close()
    tokens, evaluations = _search_cost(cell_dir)
    record = {"cell": cell.__dict__, "budget": budget, "candidates": [
        {"name": name, "profile": _nm_rounded(profile, cell, pool.layout).to_json()}
        for name, profile in proposal],
        "search": {"tokens": tokens, "evaluations": evaluations, "seconds": seconds}}
    write_json(cell_dir / "proposal.json", record)
    log.info("%s: %d candidate(s) after %.0f s, %d evaluations", cell.id, len(proposal), seconds, evaluations)
    return record


def _sibling(cell: Cell, cells: list[Cell], proposals: dict) -> Cell | None:
    """A cell with a proposal that differs from ``cell`` in the pruner only: the evaluator scores the
    same (Wanda-ranked) masks whatever the final pass, so its candidates are ``cell``'s too."""
    for other in cells:
        if other.id in proposals and (other.model, other.target, other.method) == (cell.model, cell.target,
                                                                                  cell.method):
            return other
    return None


def _share(proposal: dict, cell: Cell, sibling: Cell, out: Path) -> dict:
    """``sibling``'s proposal recorded as ``cell``'s (its search cost is that search's, not repeated)."""
    record = {**proposal, "cell": cell.__dict__, "shared_with": proposal.get("shared_with") or sibling.id}
    (out / "cells" / cell.id).mkdir(parents=True, exist_ok=True)
    write_json(out / "cells" / cell.id / "proposal.json", record)
    log.info("%s: candidates of %s (the search does not depend on the pruner)", cell.id, sibling.id)
    return record


def _search_dir(out: Path, cell: Cell, proposals: dict) -> str | None:
    """The run dir (relative to ``out``) holding the search behind ``cell``'s candidates, if any."""
    source = proposals[cell.id].get("shared_with") or cell.id
    return f"cells/{source}" if (out / "cells" / source / "results").is_dir() else None


def _submit_passes(spec: SweepSpec, settings: Settings, out: Path, cells: list[Cell], proposals: dict,
                   tokens: Tokens) -> tuple[list[_Pending], object, dict]:
    """Final-pass tasks for every candidate of ``cells`` not already done, plus the model's dense
    perplexity; returns the pending passes, the dense task (or stored dense metrics) and the tasks'
    resources. The tasks' threads are sized by how many will run (passes stored by an earlier run are not
    counted)."""
    template = pass_template(settings)
    windows = window_digests(tokens.calibration, tokens.selection, tokens.test)
    zero_shot = None if not spec.zero_shot.tasks else {"tasks": list(spec.zero_shot.tasks),
                                                       "include": spec.zero_shot.include,
                                                       "limit": spec.zero_shot.limit}
    pending: list[_Pending] = []
    to_run: dict[str, tuple[_Pending, dict]] = {}  # one task per distinct key
    for cell in cells:
        for candidate in proposals[cell.id]["candidates"]:
            profile = Profile.from_json(candidate["profile"])
            inputs = pass_inputs(template.model, template.device, template.dtype, cell.pruner, windows, profile,
                                 zero_shot=zero_shot, saved=spec.save_models)
            item = _Pending(cell, candidate["name"], profile, cache_key(inputs))
            folder = out / "passes" / item.key
            item.metrics = stored_metrics(folder / "metrics.json", inputs)
            if spec.save_models and not (folder / "config.json").exists():
                item.metrics = None  # its model never reached this node: the pass is made again
            item.reused = item.metrics is not None
            if not item.reused and item.key not in to_run:
                to_run[item.key] = (item, inputs)
            pending.append(item)
    dense_inputs = dense_pass_inputs(template, windows)
    dense_path = out / "models" / model_slug(settings.config.model) / "dense.json"
    dense = stored_metrics(dense_path, dense_inputs)
    resources = task_resources(settings.device == "cuda", template.threads, len(to_run) + (dense is None))
    tasks = PassTasks(resources, tokens.calibration, tokens.selection, tokens.test)
    threads = resources["num_cpus"]
    for key, (item, inputs) in to_run.items():
        job = replace(template, pruner=item.cell.pruner, threads=threads, out=str((out / "passes" / key).resolve()),
                      inputs=inputs, save=spec.save_models, zero_shot=zero_shot)
        item.ref = tasks.submit(job, item.cell.method, item.profile)
    if dense is None:
        job = replace(template, threads=threads, out=str(dense_path.parent.resolve()), inputs=dense_inputs)
        dense = (tasks.submit_dense(job), dense_path)
    return pending, dense, resources


def _collect(pending: list[_Pending], out: Path, save_models: bool, resources: dict, node_wait_s: float) -> int:
    """Wait for the submitted passes (candidates with one key share one task; nodes watched, see
    :func:`as_completed`) and keep each one's ``passes/<key>/metrics.json`` here, with its pruned model
    when ``save_models`` (read from the node the task ran on); returns how many ran."""
    by_key = {p.key: p for p in pending if p.ref is not None}
    ran = 0
    for key, metrics in as_completed({by_key[key].ref: key for key in by_key}, resources, node_wait_s):
        item = by_key[key]
        item.metrics = metrics
        folder = (out / "passes" / key).resolve()
        if save_models and not (folder / "config.json").exists():  # the task ran on another node
            log.info("%s %s: copying the pruned model from node %s", item.cell.id, item.candidate, metrics["node"])
            with staged_output(folder, True) as staging:  # complete, or not there at all
                fetch_directory(metrics["node"], folder, staging, skip=("metrics.json",))
        keep_metrics(folder, metrics)
        ran += 1
        log.info("%s %s: validation %.3f, test %.3f", item.cell.id, item.candidate,
                 metrics["validation_perplexity"], metrics["test_perplexity"])
    for item in pending:
        if item.metrics is None:
            item.metrics = by_key[item.key].metrics
    return ran


def _rows(cells: list[Cell], pending: list[_Pending], proposals: dict, dense: dict, protocol: dict) -> list[dict]:
    """One table row per final pass; ``chosen`` marks each cell's lowest validation perplexity."""
    rows = []
    for cell in cells:
        items = [p for p in pending if p.cell == cell]
        best = min(items, key=lambda p: p.metrics["validation_perplexity"])
        search = proposals[cell.id]["search"]
        for item in items:
            m = item.metrics
            rows.append({
                "cell": cell.id, "model": cell.model, "target": cell.target, "sparsity": cell.sparsity,
                "nm": cell.target if cell.nm else None, "pruner": cell.pruner, "method": cell.method,
                "candidate": item.candidate, "chosen": item is best,
                "profile": json.dumps(list(item.profile.sparsities)),
                "profile_nm": None if item.profile.nm is None else json.dumps(item.profile.nm),
                "achieved_sparsity": float(m["achieved_sparsity"]["overall"]),
                "validation_perplexity": float(m["validation_perplexity"]),
                "test_perplexity": float(m["test_perplexity"]),
                "dense_test_perplexity": float(dense["test_perplexity"]),
                "search_tokens": int(search["tokens"]), "search_seconds": float(search["seconds"]),
                "search_evaluations": int(search["evaluations"]),
                "search_shared_with": proposals[cell.id].get("shared_with"),
                "pass_seconds": float(sum(m["timings"].values())),
                "zero_shot": json.dumps(m["zero_shot"]) if m.get("zero_shot") else None,
                "protocol": json.dumps(protocol), "device": m.get("device"), "dtype": m.get("dtype"),
                "reused": item.reused,
            })
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    """The sweep table as parquet, written to a temporary name and renamed."""
    with atomic_file(path) as temp:
        pq.write_table(pa.Table.from_pylist(rows), temp)


def _searches(spec: SweepSpec) -> set[tuple[str, str, str]]:
    """The distinct searches of the sweep: (model, target, method) of each searching method."""
    return {(c.model, c.target, c.method) for c in spec.cells() if ALLOCATIONS[c.method].searches}


def _spent_searches(spec: SweepSpec, out: Path) -> list[dict]:
    """Search costs of the searches already done in ``out``, one per distinct search."""
    spent: dict[tuple[str, str, str], dict] = {}
    for cell in spec.cells():
        stored = out / "cells" / cell.id / "proposal.json"
        if ALLOCATIONS[cell.method].searches and stored.exists():
            spent[(cell.model, cell.target, cell.method)] = read_record(stored, _PROPOSAL_FIX)["search"]
    return list(spent.values())


def _sweep_model(model: str, spec: SweepSpec, out: Path, run_id: str, counts: dict, progress: bool,
                 spent: list[dict]) -> tuple[list[dict], dict]:
    """One model's cells: proposals through one pool (built only when a cell still needs it), then
    every candidate's final pass; returns the model's table rows and its cells' proposals. ``spent``:
    the costs of the sweep's searches so far (a search done here is appended)."""
    from pruning.load import load_tokenizer

    model_dir = out / "models" / model_slug(model)
    config = _model_config(spec, model, model_dir, progress)
    settings = resolve(config, driver_plan("all"), ray.cluster_resources().get("GPU", 0), actor_count(config))
    check_model_on_nodes(model_spec(model))
    tokens = token_sets(settings, load_tokenizer(model))
    cells = [c for c in spec.cells() if c.model == model]
    proposals: dict[str, dict] = {}
    for cell in cells:
        stored = out / "cells" / cell.id / "proposal.json"
        if stored.exists():
            proposals[cell.id] = read_record(stored, _PROPOSAL_FIX)
            counts["cells_skipped"] += 1
    todo = [c for c in cells if c.id not in proposals]
    if todo:
        model_dir.mkdir(parents=True, exist_ok=True)
        pool = make_pool(settings, tokens.calibration, tokens.fitness, ResultsTable(model_dir, run_id),
                         owl_m=(spec.owl_m,))
        counts["pools_built"] += 1
        searches_total = len(_searches(spec))
        try:
            for cell in todo:
                sibling = _sibling(cell, cells, proposals)
                if sibling is not None:
                    proposals[cell.id] = _share(proposals[sibling.id], cell, sibling, out)
                    continue
                searches = ALLOCATIONS[cell.method].searches
                budget = search_allowance(spec.budget, spent, searches_total - len(spent)) if searches else {}
                proposals[cell.id] = _propose(cell, spec, settings, pool, tokens, out / "cells" / cell.id,
                                              model_dir, run_id, budget)
                counts["cells_proposed"] += 1
                if searches:
                    spent.append(proposals[cell.id]["search"])
        finally:
            pool.close()  # frees the actors' devices for the final passes
    protocol = {**tokens.protocol, "fitness_tokens": tokens.top_tokens, "fitness_split": "validation (prefix)",
                "selection_tokens": int(tokens.selection.numel()), "dtype": settings.dtype, "device": settings.device}
    pending, dense, resources = _submit_passes(spec, settings, out, cells, proposals, tokens)
    wait = settings.config.node_wait_minutes * 60
    # The passes hold the devices the next model's actors would need: they finish first.
    if isinstance(dense, tuple):
        ref, path = dense
        _, dense = next(as_completed({ref: None}, resources, wait))
        write_json(path, dense)
    counts["passes_run"] += _collect(pending, out, spec.save_models, resources, wait)
    counts["passes_reused"] += sum(p.reused for p in pending)
    return _rows(cells, pending, proposals, dense, protocol), proposals


def run_sweep(spec_path: Path, out: Path, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Run every cell of the spec at ``spec_path`` into ``out``; returns the summary (counts, table
    path, report paths)."""
    spec = load_sweep_spec(spec_path)
    out = Path(out)
    check_writable(out)
    counts = {"pools_built": 0, "cells_proposed": 0, "cells_skipped": 0, "passes_run": 0, "passes_reused": 0}
    first = _model_config(spec, spec.models[0], out, progress)
    check_protocol(first)  # one protocol for every model: refused before any work
    rows: list[dict] = []
    proposals: dict[str, dict] = {}
    start = time.monotonic()
    lock = lock_run_dir(out, "sweep directory", resume, overwrite)
    started_ray = False
    try:
        started_ray = init_ray(first.address, actor_count(first), first.threads)
        run_id = _prepare(Path(spec_path), spec, out, resume, overwrite)
        spent = _spent_searches(spec, out)
        for model in spec.models:
            model_rows, model_proposals = _sweep_model(model, spec, out, run_id, counts, progress, spent)
            rows.extend(model_rows)
            proposals.update(model_proposals)
        table = out / TABLE
        write_table(rows, table)
        summary = {"table": str(table), "rows": len(rows), "seconds": time.monotonic() - start, **counts}
        stored = read_record(out / "sweep.json", "")
        cells = [{"id": c.id, **c.__dict__, "dir": _search_dir(out, c, proposals)} for c in spec.cells()]
        write_json(out / "sweep.json", {**stored, "spec": spec.to_json(), "cells": cells, "last_run": summary})
        summary["report"] = _report(out)
        return summary
    finally:
        lock.release()
        if started_ray:
            ray.shutdown()


def _report(out: Path) -> list[str]:
    """The sweep's report: paths of its HTML page and markdown twin."""
    from orchestrator.report import write_report

    return [str(p) for p in write_report(out)]
