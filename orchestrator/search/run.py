"""``sparsealloc search``: run the drivers on Ray, pick the winning profile, run the final pass.

Each driver returns its best profile by the fast KL proxy; the best ``finalists`` of them (and the
Tune ATP best, the baseline) get the real final pruning pass, and the one with the lowest validation
perplexity on held-out validation windows (not the fitness tokens the search optimised) wins.

The run directory holds ``config.json`` (settings and the identity a resume must match), the
append-only ``results/`` table, ``clock.json`` (seconds per phase), ``sensitivities/`` (Fisher
traces, OWL ratios), each driver's best profile, ``finalists/``, ``summary.json`` and the pruned
model (``model/``). Rerunning the same command with ``--resume`` repeats the same seeded requests,
which the results table answers without re-evaluating, so an interrupted search continues where
it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import ray
import torch

from orchestrator.search.budget import Budget, driver_allowance
from orchestrator.runtime.candidates import Candidate, DriverResult
from orchestrator.runtime.clock import RunClock
from orchestrator.search.drivers import DRIVERS, OWL_M_CHOICES, DriverContext, all_shares, sequential_top_stage
from core.identity import package_version, write_json
from orchestrator.passes.finalists import run_final_passes, selection_windows
from orchestrator.search.level_sources import database_levels, ensure_database, resolve_level_source
from orchestrator.runtime.rundir import check_output
from orchestrator.runtime.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.runtime.results import ResultsTable
from pruning.data import DEFAULT_DATA, consecutive_windows, prepare_tokens
from core.errors import SparseAllocError
from pruning.load import DEFAULT_MODEL, load_tokenizer, pick_device, pick_dtype
from pruning.pruners import get_pruner
from search_spaces import families
from core.profile import write_profile

log = logging.getLogger(__name__)



@dataclass
class SearchConfig:
    """Everything ``sparsealloc search`` needs; flags map one to one."""

    out: Path
    method: str = "all"
    sparsity: float = 0.7
    pruner: str = "wanda"
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    text_field: str | None = None
    seqlen: int = 512
    calib_samples: int = 32
    eval_windows: int | None = 32
    fitness_windows: int = 32
    fitness_seqlen: int = 128
    fidelities: tuple[int, ...] = (256, 1024)
    nm_m: int | None = None
    free_sampler: str = "tpe"
    estimator: str = "permutation"
    top_fitness: str = "kl-seq"
    sequential_windows: int = 4
    level_source: str = "auto"
    db_levels: tuple[float, ...] | None = None
    finalists: int | None = None  # None: every driver's best profile
    selection_windows: int = 8
    budget_evals: int | None = None
    budget_minutes: float | None = None
    budget_tokens: int | None = None
    deadline_minutes: float | None = None
    actors: int | None = None
    threads: int = 1
    actor_gpus: bool | None = None
    address: str | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    evaluator: str = "auto"
    device_memory_gb: float | None = None
    gpus_per_actor: int = 1
    population: int = 8
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    shares: dict = field(default_factory=all_shares)

    def drivers(self) -> dict[str, float]:
        """The drivers to run, in order, with their fractions of the budget (summing to 1)."""
        if self.method == "all":
            unknown = [name for name in self.shares if name not in DRIVERS]
            if unknown or not self.shares or min(self.shares.values()) <= 0:
                raise SparseAllocError(f"shares must give positive parts to drivers among {', '.join(DRIVERS)}, "
                                       f"got {self.shares}")
            total = sum(self.shares.values())
            return {name: share / total for name, share in self.shares.items()}
        if self.method not in DRIVERS:
            raise SparseAllocError(f"unknown --method {self.method!r}; choose all or one of {', '.join(DRIVERS)}")
        return {self.method: 1.0}

    def identity(self) -> dict:
        """The fields a resumed run must share with the original."""
        keep = ("method", "sparsity", "model", "data", "text_field", "seqlen", "calib_samples", "fitness_windows",
                "fitness_seqlen", "fidelities", "top_fitness", "sequential_windows", "level_source", "db_levels",
                "nm_m", "free_sampler", "estimator", "seed", "shares", "device",
                "dtype", "batch_size", "selection_windows", "eval_windows")
        identity = {k: getattr(self, k) for k in keep}
        identity["evaluator"] = {"levels": self.level_source, "fitness": "KL(dense || pruned)"}
        identity["version"] = package_version()
        return json.loads(json.dumps(identity))


def _prepare_run_dir(config: SearchConfig) -> str:
    out = Path(config.out)
    stored = out / "config.json"
    if config.resume:
        if not stored.exists():
            raise SparseAllocError(f"--resume: {out} holds no search (no config.json); run without --resume first")
        previous = json.loads(stored.read_text())
        if previous["identity"] != config.identity():
            changed = [k for k in config.identity() if previous["identity"].get(k) != config.identity()[k]]
            raise SparseAllocError(f"--resume with different settings ({', '.join(changed)}); rerun the same command")
        return previous["run_id"]
    check_output(out, config.overwrite)
    if out.exists() and config.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    write_json(stored, {"run_id": run_id, "identity": config.identity(),
                        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}})
    return run_id


def resolve_device(config: SearchConfig) -> SearchConfig:
    """``--device``/``--dtype`` as the actors and final passes will use them: ``auto`` is CUDA with bf16
    when the actors get GPUs (``--gpu-actors`` or a cluster with GPUs), else CPU with fp32."""
    if config.device == "auto":
        gpus = config.actor_gpus if config.actor_gpus is not None else ray.cluster_resources().get("GPU", 0) > 0
        device = "cuda" if gpus else "cpu"
    else:
        device = pick_device(config.device).type
    dtype = str(pick_dtype(config.dtype, torch.device(device))).removeprefix("torch.")
    return replace(config, device=device, dtype={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype])


def uses_sequential_fitness(config: SearchConfig) -> bool:
    """Whether the evaluators will be asked for kl-seq (evolution's last stage, on rank tables)."""
    return "evolution" in config.drivers() and sequential_top_stage(config)


def check_memory(config: SearchConfig) -> str:
    """The memory plan for this search (``sparsealloc plan``), checked before any work; returns the
    evaluator mode. Without ``--device-memory-gb`` the budget is the device this process sees, or,
    for GPU actors seen from a GPU-less driver, unknown: each actor then plans with its own device."""
    from orchestrator.runtime.plan import check_plan, detect_device_memory, make_plan, shape_of

    if config.gpus_per_actor < 1 or config.population < 1:
        raise SparseAllocError(f"--gpus-per-actor and --population must be at least 1, got {config.gpus_per_actor} "
                               f"and {config.population}")
    if config.device_memory_gb is not None:
        budget = int(config.device_memory_gb * 2**30)
    else:
        budget, is_cuda = detect_device_memory()
        if (config.device == "cuda") != is_cuda:
            return config.evaluator
    plan = make_plan(shape_of(config.model), dtype=config.dtype, device_memory_bytes=budget,
                     gpus_per_actor=config.gpus_per_actor, evaluator=config.evaluator,
                     fitness_tokens=config.fitness_windows * config.fitness_seqlen,
                     fitness_seqlen=config.fitness_seqlen, batch_size=config.batch_size,
                     calib_samples=config.calib_samples, seqlen=config.seqlen, population=config.population,
                     pruner=config.pruner, sequential_fitness=uses_sequential_fitness(config))
    check_plan(plan)
    log.info("memory plan: %s evaluator, %.2f bytes per weight on the device", plan.evaluator, plan.bytes_per_weight)
    return plan.evaluator


def token_sets(config: SearchConfig, tokenizer) -> tuple:
    """Calibration, test, fitness and selection tokens, each from its own flags: fitness is the first
    ``--fitness-windows`` x ``--fitness-seqlen`` validation tokens, selection the ``--selection-windows``
    windows of ``--seqlen`` after them, test ``--eval-windows`` windows of the test split."""
    fitness_tokens = config.fitness_windows * config.fitness_seqlen
    if min(config.fitness_windows, config.fitness_seqlen) < 1:
        raise SparseAllocError("--fitness-windows and --fitness-seqlen must be at least 1")
    if max(config.fidelities) > fitness_tokens:
        raise SparseAllocError(f"--fidelities asks for {max(config.fidelities)} tokens but the fitness set holds "
                               f"{fitness_tokens} (--fitness-windows {config.fitness_windows} x --fitness-seqlen "
                               f"{config.fitness_seqlen}); lower --fidelities or raise those")
    validation_windows = math.ceil(fitness_tokens / config.seqlen) + config.selection_windows
    data = prepare_tokens(tokenizer, config.data, seqlen=config.seqlen, calib_samples=config.calib_samples,
                          eval_windows=config.eval_windows, seed=config.seed, text_field=config.text_field,
                          validation_windows=validation_windows)
    fitness = consecutive_windows(data.validation.flatten(), config.fitness_seqlen, config.fitness_windows)
    if fitness.numel() < fitness_tokens:
        raise SparseAllocError(f"the validation split of --data holds {data.validation.numel()} tokens, fewer than the "
                               f"{fitness_tokens} fitness tokens (--fitness-windows x --fitness-seqlen); lower those "
                               "or use a larger --data")
    return data, fitness, selection_windows(data.validation, fitness_tokens, config.selection_windows)


def actor_count(config: SearchConfig) -> int | None:
    """``--actors``, else one CPU actor per ``--threads`` cores on a local machine without CUDA;
    None lets the pool put one actor on each GPU."""
    if config.actors or config.address or torch.cuda.is_available():
        return config.actors
    return max(1, (os.cpu_count() or 1) // config.threads)


def init_ray(config: SearchConfig, actors: int | None) -> bool:
    """Join ``--address`` or start a local Ray; returns whether we started it."""
    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, log_to_driver=False)
        return True
    if actors is None:  # local GPUs: Ray detects them and the cores, one actor per GPU
        ray.init(include_dashboard=False, log_to_driver=False)
        return True
    # One logical CPU more than the CPU actors use, so the dense-perplexity task runs beside a final pass.
    ray.init(num_cpus=actors * config.threads + 1, include_dashboard=False, log_to_driver=False)
    return True


def _budget(config: SearchConfig, search_seconds: float | None, share: float, shares_left: float,
            spent: tuple[int, int, float], top_tokens: int, already: float) -> Budget:
    """The next driver's budget: its share of the search's evaluations, fitness tokens and seconds, plus
    its part of what earlier drivers left (``spent``: evaluations, tokens, seconds); at least one
    evaluation on all ``top_tokens``; its clock starts at the ``already`` seconds it used before a resume."""
    spent_evals, spent_tokens, spent_seconds = spent
    evals = driver_allowance(config.budget_evals, spent_evals, share, shares_left)
    tokens = driver_allowance(config.budget_tokens, spent_tokens, share, shares_left)
    seconds = driver_allowance(search_seconds, spent_seconds, share, shares_left)
    return Budget(max_evals=None if evals is None else max(1, int(evals)),
                  max_seconds=None if seconds is None else max(seconds, 1e-3),
                  max_tokens=None if tokens is None else max(top_tokens, int(tokens)),
                  started=time.monotonic() - already)


# Forward-pass equivalents per calibration token of each pruner's pass (observing, solving).
PASS_COST = {"magnitude": 0.2, "wanda": 1.5, "sparsegpt": 6.0}


def _estimate_final_s(config: SearchConfig, data, selection: torch.Tensor, seconds_per_token: float,
                      actors: int) -> float:
    """Wall-clock estimate of the final stage from the measured cost of one fitness token: each
    finalist prunes on the calibration tokens and scores selection and test tokens, plus the dense
    test perplexity; the passes share the cores the actors used."""
    drivers = len(config.drivers())
    passes = drivers if config.finalists is None else min(drivers, config.finalists + (config.method == "all"))
    tokens = passes * (data.calibration.numel() * PASS_COST[config.pruner] + selection.numel() + data.test.numel())
    tokens += data.test.numel()
    return 1.25 * (seconds_per_token * tokens / max(1, actors) + 10.0 * passes)


def _search_seconds(config: SearchConfig, clock: RunClock, estimate_final_s: float) -> float | None:
    """Seconds the drivers may use in all: ``--budget-minutes``, and under ``--deadline-minutes`` what
    setup (spent) and the final stage (estimated) leave of the deadline."""
    limits = [] if config.budget_minutes is None else [config.budget_minutes * 60]
    if config.deadline_minutes is not None:
        left = config.deadline_minutes * 60 - clock.spent("setup") - estimate_final_s
        if left <= 0:
            raise SparseAllocError(
                f"--deadline-minutes {config.deadline_minutes} leaves no time to search: setup took "
                f"{clock.spent('setup'):.0f} s and the final passes are estimated at {estimate_final_s:.0f} s; "
                "raise the deadline, or lower --finalists, --calib-samples or --eval-windows")
        limits.append(left)
    return min(limits) if limits else None


def make_pool(config: SearchConfig, mode: str, calibration: torch.Tensor, fitness: torch.Tensor,
              results: ResultsTable, actors: int | None, owl_m: tuple[float, ...] = (),
              level_db: Path | None = None) -> EvaluatorPool:
    """The evaluator pool for ``config`` (device and dtype resolved), writing its rows to ``results``;
    its actors count OWL ratios for the drivers' M choices and ``owl_m``, and take a block's levels
    from the SparseGPT database at ``level_db`` when given."""
    spec = EvaluatorSpec(config.model, dtype=config.dtype, device="auto" if config.device == "cuda" else "cpu",
                         batch_size=config.batch_size, threads=config.threads, mode=mode,
                         memory_budget=None if config.device_memory_gb is None else int(config.device_memory_gb * 2**30),
                         gpus_per_actor=config.gpus_per_actor, population=config.population,
                         owl_multipliers=tuple(sorted({float(m) for m in (*OWL_M_CHOICES, *owl_m)})),
                         sequential_windows=config.sequential_windows,
                         level_db=None if level_db is None else str(level_db),
                         sequential_fitness=uses_sequential_fitness(config))
    return EvaluatorPool(spec, calibration, fitness, results, actors, gpu=config.device == "cuda")


def run_drivers(pool: EvaluatorPool, config: SearchConfig, shares: dict[str, float], calibration: torch.Tensor,
                top_tokens: int, clock: RunClock, search_seconds: float | None,
                sensitivity_dir: Path | None = None) -> dict[str, DriverResult]:
    """Run the drivers in turn on ``pool``, each with its share of the search's budget (plus what the
    earlier ones left), its clock phase kept in ``clock``; every best profile is rescored on all
    ``top_tokens`` fitness tokens and written to ``config.out/best-<driver>.json``. Fisher traces and
    OWL ratios are kept in ``sensitivity_dir`` (default ``config.out``)."""
    results: dict[str, DriverResult] = {}
    spent_evals, spent_tokens, spent_seconds = 0, 0, 0.0
    for index, (name, share) in enumerate(shares.items()):
        with clock.phase(f"driver:{name}") as already:
            budget = _budget(config, search_seconds, share, sum(list(shares.values())[index:]),
                             (spent_evals, spent_tokens, spent_seconds), top_tokens, already)
            context = DriverContext(pool, config, calibration, top_tokens, sensitivity_dir,
                                    tuple(r.best for r in results.values()))
            result = DRIVERS[name].run(context, budget)
            # Compare drivers on one footing: every best profile scored on all fitness tokens.
            result.fitness = pool.evaluate([Candidate.of(result.best, top_tokens, name)])[0]
        result.details["seconds"] = clock.spent(f"driver:{name}")
        result.details["tokens"] = budget.used_tokens
        result.details["evaluations_charged"] = budget.used_evals
        spent_evals += budget.used_evals
        spent_tokens += budget.used_tokens
        spent_seconds += result.details["seconds"]
        results[name] = result
        write_profile(Path(config.out) / f"best-{name}.json", result.best, result.best.mean(pool.block_weights),
                      driver=name, fitness=result.fitness)
        log.info("%s: best validation KL %.4f after %d evaluations, %.0f s", name, result.fitness,
                 result.evaluations, result.details["seconds"])
    return results


def run_search(config: SearchConfig) -> dict:
    """Run the configured drivers, then the final pass of the winner; returns the summary."""
    if not 0.0 < config.sparsity < 1.0:
        raise SparseAllocError(f"--sparsity must lie in (0, 1), got {config.sparsity}")
    get_pruner(config.pruner)
    if (config.finalists is not None and config.finalists < 1) or config.selection_windows < 1:
        raise SparseAllocError(f"--finalists and --selection-windows must be at least 1, got {config.finalists} "
                               f"and {config.selection_windows}")
    if config.top_fitness not in ("kl", "kl-seq"):
        raise SparseAllocError(f"unknown --top-fitness {config.top_fitness!r}; choose kl-seq or kl")
    if not 1 <= config.sequential_windows <= config.calib_samples:
        raise SparseAllocError(f"--sequential-windows must lie in [1, --calib-samples {config.calib_samples}], "
                               f"got {config.sequential_windows}")
    if config.evaluator not in ("auto", "resident", "streamed"):
        raise SparseAllocError(f"unknown --evaluator {config.evaluator!r}; choose auto, resident or streamed")
    for flag, value in (("--budget-evals", config.budget_evals), ("--budget-tokens", config.budget_tokens),
                        ("--budget-minutes", config.budget_minutes), ("--deadline-minutes", config.deadline_minutes)):
        if value is not None and value <= 0:
            raise SparseAllocError(f"{flag} must be positive, got {value}")
    if (config.budget_evals is None and config.budget_tokens is None and config.budget_minutes is None
            and config.deadline_minutes is None):
        raise SparseAllocError("give a budget: --budget-evals N, --budget-tokens T, --budget-minutes M and/or "
                               "--deadline-minutes D")
    shares = config.drivers()
    torch.manual_seed(config.seed)
    actors = actor_count(config)
    wall_start = time.monotonic()
    started_ray = init_ray(config, actors)
    pool: EvaluatorPool | None = None
    clock: RunClock | None = None
    try:
        config = resolve_device(config)
        config = replace(config, level_source=resolve_level_source(config.level_source, config.pruner, config.nm_m))
        mode = check_memory(config)
        tokenizer = load_tokenizer(config.model)
        data, fitness, selection = token_sets(config, tokenizer)
        top_tokens = int(fitness.numel())
        if config.level_source == "sparsegpt-db":
            database_levels(config.sparsity, config.db_levels)  # a bad grid is refused before the run dir exists
        elif config.db_levels:
            raise SparseAllocError("--db-levels sets the SparseGPT level database's grid; it needs --level-source "
                                   "sparsegpt-db (or auto with --pruner sparsegpt)")
        run_id = _prepare_run_dir(config)  # only once every input has passed its checks
        clock = RunClock(Path(config.out))
        with clock.phase("setup", extra=time.monotonic() - wall_start):
            level_db = ensure_database(config, data.calibration) if config.level_source == "sparsegpt-db" else None
            pool = make_pool(config, mode, data.calibration, fitness, ResultsTable(Path(config.out), run_id), actors,
                             level_db=level_db)
            probe = Candidate.of(families.uniform(pool.num_blocks, config.sparsity), top_tokens, "setup")
            pool.evaluate([probe])
            per_token = pool.results.get(probe.key)["seconds"] / top_tokens  # an actor's compute time
        estimate_final_s = _estimate_final_s(config, data, selection, per_token, len(pool.actors))
        search_seconds = _search_seconds(config, clock, estimate_final_s)
        log.info("setup %.0f s; search %s; final passes estimated at %.0f s", clock.spent("setup"),
                 "unbounded in time" if search_seconds is None else f"{search_seconds:.0f} s", estimate_final_s)
        results = run_drivers(pool, config, shares, data.calibration, top_tokens, clock, search_seconds)
        pool.close()  # frees the actors' GPUs for the final-pass tasks
        pool = None
        with clock.phase("final passes"):
            summary = run_final_passes(config, data, selection, results, tokenizer)
        summary["timings"] = {**{k: round(v, 3) for k, v in clock.seconds.items()},
                              "final_passes_estimate": round(estimate_final_s, 3),
                              "search_seconds_allowed": search_seconds}
        write_json(Path(config.out) / "summary.json", summary)
        from orchestrator.report.build import write_report

        summary["report"] = [str(path) for path in write_report(Path(config.out))]
        return summary
    finally:
        if clock is not None:
            clock.close()
        if pool is not None:
            pool.close()
        if started_ray:
            ray.shutdown()
