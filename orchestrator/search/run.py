"""``sparsealloc search``: run the drivers on Ray, pick the winning profile, run the final pass.

The settings are resolved once (:mod:`orchestrator.search.settings`); the drivers run in turn on one
evaluator pool, each with its share of the budget through a :class:`Charged` view of it; each returns
its best profile by the fast KL proxy. Every driver's best (or the best ``--finalists`` of them, plus
the Tune ATP best, the baseline) gets the real final pruning pass, and the one with the lowest
perplexity on held-out validation windows (not the fitness tokens the search optimised) wins.

The run directory holds ``config.json`` (settings and the identity a resume must match), the
append-only ``results/`` table, ``clock.json`` (seconds per phase), ``sensitivities/`` (Fisher
traces, OWL ratios), each driver's best profile, ``finalists/``, ``summary.json`` and the pruned
model (``model/``). Rerunning the same command with ``--resume`` repeats the same seeded requests,
which the results table answers without re-evaluating, so an interrupted search continues where
it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import ray
import torch

from core.identity import cache_key, versions, write_json
from core.profile import write_profile
from orchestrator.passes.finalists import (driver_summary, finalists, pass_row, pick_margin, run_final_passes,
                                           same_profile_passes, save_model)
from orchestrator.passes.tasks import PassJob, model_spec
from orchestrator.runtime.candidates import Candidate, DriverResult
from orchestrator.runtime.clock import RunClock, monotonic
from orchestrator.runtime.cluster import check_model_on_nodes, check_node_disks, init_ray
from orchestrator.runtime.plan import DTYPE_BYTES
from orchestrator.runtime.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.runtime.options import command_line
from orchestrator.runtime.results import ResultsTable
from orchestrator.runtime.rundir import check_free_space, check_writable, lock_run_dir, open_run_dir
from orchestrator.search.budget import Charged, check_budgets, driver_budget, final_passes_estimate, search_seconds
from orchestrator.search.config import SearchConfig, check_config
from orchestrator.search.drivers.context import DriverContext
from orchestrator.search.drivers.sensitivities import OWL_M_CHOICES
from orchestrator.search.registry import DRIVERS, driver_plan
from orchestrator.search.settings import Settings, Tokens, actor_count, resolve, token_sets
from pruning.load import load_tokenizer
from scoring.level_sources import LEVEL_SOURCES
from search_spaces import families

log = logging.getLogger(__name__)


def prepare_levels(settings: Settings, calibration: torch.Tensor) -> tuple[str, str] | None:
    """(node, path) of what the level source needs built before the actors start (a SparseGPT database),
    or None. It is built once, as a Ray task on a worker with a GPU when the actors get GPUs (never on a
    CPU head), after every node that may host an actor was checked to have room for its copy."""
    config, kind = settings.config, LEVEL_SOURCES[settings.level_source]
    if kind.prepare is None:
        return None
    need = kind.disk_bytes(settings.linear_weights, DTYPE_BYTES[settings.dtype], config.sparsity, config.db_levels)
    check_node_disks(need, f"the {settings.level_source} level source")
    resources = {"num_gpus": 1, "num_cpus": 1} if settings.device == "cuda" else {"num_cpus": config.threads}
    task = ray.remote(_prepare_on_node).options(**resources)
    return ray.get(task.remote(settings.level_source, model_spec(config.model), calibration, config.sparsity,
                               config.db_levels, settings.dtype, settings.device, config.batch_size, config.progress))


def _prepare_on_node(source: str, model: str, calibration: torch.Tensor, target: float,
                     levels: tuple[float, ...] | None, dtype: str, device: str, batch_size: int,
                     progress: bool) -> tuple[str, str]:
    """The level source built on this worker (its GPU for ``cuda``); (this node, the artifact's path)."""
    from pruning.load import pick_device

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    place = pick_device("cpu" if device == "cpu" else "auto")
    path = LEVEL_SOURCES[source].prepare(model, calibration, target, levels, dtype, place, batch_size, progress)
    return ray.get_runtime_context().get_node_id(), path


def make_pool(settings: Settings, calibration: torch.Tensor, fitness: torch.Tensor, results: ResultsTable,
              owl_m: tuple[float, ...] = (), level_artifact: tuple[str, str] | None = None) -> EvaluatorPool:
    """The evaluator pool for ``settings``, writing its rows to ``results``; its actors count OWL ratios
    for tune-owl's M choices and ``owl_m``, and open the level source from ``level_artifact`` (the node
    that built it and its path there)."""
    node, path = level_artifact or (None, None)
    config = settings.config
    memory = None if config.device_memory_gb is None else int(config.device_memory_gb * 2**30)
    spec = EvaluatorSpec(config.model, dtype=settings.dtype, device="auto" if settings.device == "cuda" else "cpu",
                         batch_size=config.batch_size, threads=config.threads, mode=settings.evaluator,
                         memory_budget=memory, gpus_per_actor=config.gpus_per_actor, population=config.population,
                         owl_multipliers=tuple(sorted({float(m) for m in (*OWL_M_CHOICES, *owl_m)})),
                         sequential_windows=config.sequential_windows, level_source=settings.level_source,
                         level_artifact=path, level_node=node, sequential_fitness=settings.sequential_fitness)
    return EvaluatorPool(spec, calibration, fitness, results, settings.actors, gpu=settings.device == "cuda",
                         node_wait_s=config.node_wait_minutes * 60)


def run_drivers(pool: EvaluatorPool, settings: Settings, drivers: dict[str, float], calibration: torch.Tensor,
                top_tokens: int, clock: RunClock, seconds: float | None, run_dir: Path,
                sensitivities: Path | None = None) -> dict[str, DriverResult]:
    """Run ``drivers`` (name -> share) in turn on ``pool``, each with its share of the search's budget
    (plus what the earlier ones left) charged through one :class:`Charged` view of the pool, its clock
    phase kept in ``clock``; every best profile is rescored on all ``top_tokens`` fitness tokens and
    written to ``run_dir/best-<driver>.json``. Fisher traces and OWL ratios are kept in
    ``sensitivities`` (default ``run_dir``)."""
    results: dict[str, DriverResult] = {}
    spent_evals, spent_tokens, spent_seconds = 0, 0, 0.0
    shares = list(drivers.values())
    for index, (name, share) in enumerate(drivers.items()):
        stalled, sent = pool.stalled_s, pool.sent
        with clock.phase(f"driver:{name}") as already:
            budget = driver_budget(settings, seconds, share, sum(shares[index:]),
                                   (spent_evals, spent_tokens, spent_seconds), already)
            charged = Charged(pool, budget, top_tokens, settings.sequential_tokens)
            context = DriverContext(charged, settings, calibration, top_tokens, sensitivities or run_dir,
                                    tuple(r.best for r in results.values()), Path(run_dir).resolve() / "tune")
            result = DRIVERS[name].function()(context)
            # Compare drivers on one footing: every best profile scored on all fitness tokens (not charged).
            result.fitness = pool.evaluate([Candidate.of(result.best, top_tokens, name)])[0]
        result.details["seconds"] = clock.spent(f"driver:{name}")
        result.details["waited_for_nodes_s"] = pool.stalled_s - stalled  # in the seconds, not in the budget
        result.details["tokens"] = budget.used_tokens
        result.details["evaluations_sent"] = pool.sent - sent  # to the actors: keys the results table lacked
        result.details["evaluations_charged"] = budget.used_evals
        spent_evals += budget.used_evals
        spent_tokens += budget.used_tokens
        spent_seconds += result.details["seconds"] - result.details["waited_for_nodes_s"]
        results[name] = result
        layout = pool.layout
        write_profile(run_dir / f"best-{name}.json", result.best, result.best.mean(layout.weights(result.best.granularity)),
                      layout, driver=name, fitness=result.fitness)
        log.info("%s: best validation KL %.4f after %d evaluations, %.0f s", name, result.fitness,
                 result.evaluations, result.details["seconds"])
    return results


def pass_template(settings: Settings) -> PassJob:
    """What every final-pass task of this search shares (model as every node resolves it, pruner, device,
    dtype, batch size, threads); each pass fills in its directory and inputs."""
    config = settings.config
    return PassJob(model_spec(config.model), config.pruner, settings.device, settings.dtype, None,
                   config.batch_size, config.threads, out="", inputs={})


def run_search(config: SearchConfig) -> dict:
    """Run the configured drivers, then the final pass of the finalists; returns the summary.

    Every check that needs no model comes first (flags, budgets, a writable ``--out`` with room for the
    models): a refused run leaves nothing. The run directory is then locked for this process."""
    check_config(config)
    drivers = driver_plan(config.method, config.shares)
    check_budgets(config, drivers)
    check_writable(Path(config.out))
    torch.manual_seed(config.seed)
    wall_start = monotonic()
    lock = lock_run_dir(Path(config.out), "run directory", config.resume, config.overwrite)
    pool: EvaluatorPool | None = None
    clock: RunClock | None = None
    started_ray = False
    actors = actor_count(config)
    try:
        started_ray = init_ray(config.address, actors, config.threads)
        settings = resolve(config, drivers, ray.cluster_resources().get("GPU", 0), actors)
        check_model_on_nodes(model_spec(config.model))
        passes = len(drivers) + config.uniform_baseline
        check_free_space(Path(config.out), passes * settings.model_bytes,
                         f"the final passes' models ({passes} x {settings.model_bytes / 2**30:.2f} GiB)")
        tokens = token_sets(settings, load_tokenizer(config.model))
        run_dir = Path(config.out)
        identity = settings.identity()
        run_id = open_run_dir(run_dir, identity, _record(config), config.resume, config.overwrite)
        results_table = ResultsTable(run_dir, run_id, cache_key(identity))
        clock = RunClock(run_dir, rows=list(results_table.rows()))
        with clock.phase("setup", extra=monotonic() - wall_start):
            artifact = prepare_levels(settings, tokens.calibration)
            pool = make_pool(settings, tokens.calibration, tokens.fitness, results_table, level_artifact=artifact)
            uniform = families.uniform(pool.num_blocks, config.sparsity)
            probe = Candidate.of(uniform, tokens.top_tokens, "setup")
            pool.evaluate([probe])
            per_token = pool.results.get(probe.key)["seconds"] / tokens.top_tokens  # an actor's compute time
        estimate = final_passes_estimate(settings, tokens, per_token, len(pool.actors))
        seconds = search_seconds(settings, clock.spent("setup"), estimate)
        log.info("setup %.0f s; search %s; final passes estimated at %.0f s", clock.spent("setup"),
                 "unbounded in time" if seconds is None else f"{seconds:.0f} s", estimate)
        results = run_drivers(pool, settings, drivers, tokens.calibration, tokens.top_tokens, clock, seconds,
                              run_dir)
        # The setup's probe scored the uniform profile on all fitness tokens.
        baselines = {"uniform": DriverResult("uniform", uniform, pool.results.get(probe.key)["fitness"], 0)} \
            if config.uniform_baseline else {}
        pool.close()  # frees the actors' GPUs for the final-pass tasks
        pool = None
        with clock.phase("final passes"):
            summary = final_stage(settings, tokens, results, run_dir, baselines)
        summary["timings"] = {**{k: round(v, 3) for k, v in clock.seconds.items()},
                              "final_passes_estimate": round(estimate, 3), "search_seconds_allowed": seconds}
        write_json(run_dir / "summary.json", summary)
        from orchestrator.report import write_report

        summary["report"] = [str(path) for path in write_report(run_dir)]
        return summary
    finally:
        if clock is not None:
            clock.close()
        if pool is not None:
            pool.close()
        lock.release()
        if started_ray:
            ray.shutdown()


def final_stage(settings: Settings, tokens: Tokens, results: dict[str, DriverResult], run_dir: Path,
                baselines: dict[str, DriverResult] | None = None) -> dict:
    """The finalists' final passes (Ray tasks), with the ``baselines`` (the uniform profile) beside them;
    the lowest validation perplexity wins (a baseline may) and its model is saved to ``RUN/model``;
    returns the summary (``summary.json`` without the run's timings)."""
    candidates = {**results, **(baselines or {})}
    names = finalists(results, settings.config.finalists, baselines)
    passes, dense = run_final_passes(run_dir, pass_template(settings), tokens.calibration, tokens.selection,
                                     tokens.test, {name: candidates[name].best for name in names},
                                     gpu=settings.device == "cuda", node_wait_s=settings.config.node_wait_minutes * 60)
    best = min(names, key=lambda name: passes[name]["validation_perplexity"])
    summary = _summary(settings, tokens, results, baselines or {}, names, passes, dense, best)
    margin = summary["selection"]["margin"]
    if margin and not margin["clear"]:
        log.warning("the winner %s is %.4f ± %.4f nats ahead of %s on %d selection windows: within noise, the "
                    "pick could go either way (more --selection-windows would settle it)", best,
                    margin["nll_gap"], margin["nll_gap_se"], margin["runner_up"], margin["windows"])
    save_model(run_dir, best, passes[best],
               _model_metrics(settings, tokens, candidates[best], passes[best], dense, summary["selection"]))
    return summary


def _record(config: SearchConfig) -> dict:
    """What ``config.json`` keeps besides the identity: the config (paths as strings) and the command
    that continues this run."""
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "resume_command": command_line("sparsealloc search", config, resume=True, overwrite=False)}


def _summary(settings: Settings, tokens: Tokens, results: dict[str, DriverResult], baselines: dict[str, DriverResult],
             names: list[str], passes: dict[str, dict], dense: dict, best: str) -> dict:
    """``summary.json``: the winner, every driver's search cost, the baselines, every final-pass row, and
    the winner against Tune's ATP pick and uniform."""
    final = passes[best]
    summary = {
        "winner": best, "winner_test_perplexity": final["test_perplexity"],
        "dense_test_perplexity": dense["test_perplexity"],
        "selection": {"finalists": names,
                      "criterion": f"validation perplexity after the {settings.config.pruner} pass",
                      "tokens": int(tokens.selection.numel()), "margin": pick_margin(passes, names, best)},
        "drivers": driver_summary(results),
        "baselines": {name: {"validation_kl": b.fitness, "profile": list(b.best.sparsities)}
                      for name, b in baselines.items()},
        "final_passes": {name: {**pass_row(row), **({"same_profile_as": row["same_profile_as"]}
                                                    if "same_profile_as" in row else {})}
                         for name, row in same_profile_passes({**results, **baselines}, passes).items()},
        "device": final.get("device"), "dtype": final.get("dtype"),
    }
    for name, key in (("tune-atp", "atp"), ("uniform", "uniform")):
        if name in summary["final_passes"]:
            test = summary["final_passes"][name]["test_perplexity"]
            summary[f"{key}_test_perplexity"] = test
            summary[f"winner_vs_{key}"] = final["test_perplexity"] / test - 1
    return summary


def _model_metrics(settings: Settings, tokens: Tokens, winner: DriverResult, final: dict, dense: dict,
                   selection: dict) -> dict:
    """``RUN/model/metrics.json``: the winner's pass, with the protocol that produced it."""
    config = settings.config
    return {"model": config.model, "pruner": config.pruner, "target_sparsity": config.sparsity,
            "dense_perplexity": dense["test_perplexity"], "pruned_perplexity": final["test_perplexity"],
            "validation_perplexity": final["validation_perplexity"],
            "achieved_sparsity": final["achieved_sparsity"], "profile": winner.best.to_json(),
            "protocol": {**tokens.protocol, "fitness": "KL(dense || pruned) on validation prefix",
                         "fitness_tokens": settings.fitness_tokens, "selection": selection},
            "device": final.get("device"), "device_name": final.get("device_name"), "dtype": final.get("dtype"),
            "offload": final.get("offload"), "seed": config.seed,
            "timings": {"prune_s": final["prune_s"]}, "versions": versions(),
            "search": {"winner": winner.driver, "run_dir": str(config.out)},
            "inputs": final.get("inputs")}  # its pass's: a resumed run keeps RUN/model when they are the same
