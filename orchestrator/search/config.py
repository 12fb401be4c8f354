"""What a user asks of ``sparsealloc search``: every flag, its help, choices and bounds, whether a
resumed run must match it and whether a sweep spec may set it, declared once here
(:mod:`orchestrator.runtime.options` derives the CLI, the sweep keys and the identity from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import SparseAllocError
from core.units import GRANULARITIES
from orchestrator.runtime import options as opt
from orchestrator.runtime.options import option
from orchestrator.runtime.plan import EVALUATOR_MODES
from orchestrator.search.registry import DRIVERS, all_shares, method_names
from pruning.pruners import PRUNERS
from scoring.level_sources import LEVEL_SOURCES, resolve_level_source, source_names

TOP_FITNESS = ("kl-seq", "kl")
SAMPLERS = ("tpe", "cmaes")
SCHEDULERS = ("asha", "hyperband", "fifo")
ESTIMATORS = ("permutation", "sliding")


def _method_help() -> str:
    shares = ", ".join(f"{name} {share:.0%}" for name, share in all_shares().items())
    drivers = "; ".join(f"{name}: {driver.help}" for name, driver in DRIVERS.items())
    return f"all ({shares} of the budget) or {drivers}"


@dataclass(frozen=True)
class SearchConfig:
    """Everything ``sparsealloc search`` needs; each field is a flag (see :mod:`orchestrator.runtime.options`)."""

    out: Path = option(help="run directory", identity=False)
    method: str = option("all", _method_help, choices=method_names)
    sparsity: float = option(0.7, "target mean sparsity")
    pruner: str = option("wanda", "final pass", choices=lambda: list(PRUNERS), identity=False)
    model: str = opt.model_option()
    data: str = opt.data_option()
    text_field: str | None = opt.text_field_option()
    seqlen: int = opt.seqlen_option(512)
    calib_samples: int = opt.calib_samples_option(32)
    eval_windows: int | None = option(32, "test windows of --seqlen tokens for the final perplexity (the fitness "
                                          "and selection tokens come from the validation split through their own "
                                          "flags)", minimum=1, sweep=True)
    fitness_windows: int = option(32, "validation windows for the KL fitness (the pool evolution draws minibatches "
                                      "from)", minimum=1, sweep=True, sweep_default=8)
    fitness_seqlen: int = option(128, "tokens per fitness window", minimum=1, sweep=True)
    fidelities: tuple[int, ...] = option((256, 1024), "evolution's multi-fidelity token counts", minimum=1,
                                         sweep=True)
    top_fitness: str = option("kl-seq", "evolution's last stage, on all fitness tokens: kl-seq scores each survivor "
                                        "with the masks of a low-fidelity sequential Wanda pass for it "
                                        "(--sequential-windows calibration windows), kl with the rank tables of the "
                                        "dense activations (no extra stage)", choices=TOP_FITNESS, sweep=True)
    sequential_windows: int = option(4, "calibration windows of kl-seq's low-fidelity sequential pass", minimum=1,
                                     sweep=True)
    level_source: str = option("auto", "where the evaluator's per-level weights come from: auto = the pruner's own "
                                       "(a SparseGPT level database, built once per model, calibration and grid in "
                                       "$SPARSEALLOC_CACHE/level-db and memory-mapped, for --pruner sparsegpt), else "
                                       "Wanda rank tables", choices=source_names)
    db_levels: tuple[float, ...] | None = option(None, "the SparseGPT database's levels (default: every 0.05 within "
                                                       "0.2 of --sparsity); evolution searches on them, other "
                                                       "profiles are scored at each block's nearest level")
    granularity: str = option("block", "what one entry of a profile covers: block (every linear of a decoder "
                                       "block), group (attention and MLP of each block) or linear (every prunable "
                                       "linear); Shapley stays per block and seeds the finer search",
                              choices=lambda: list(GRANULARITIES), sweep=True)
    nm_m: int | None = option(None, "evolution over the mixed N:M menu 1:M … (M-1):M", minimum=2)
    free_sampler: str = option("tpe", "Optuna sampler of the tune-free search over per-block vectors",
                               choices=SAMPLERS, sweep=True)
    tune_scheduler: str = option("asha", "Ray Tune's trial scheduler for the tune-* drivers: asha stops a trial at a "
                                         "rung where its running KL is not among the best, hyperband runs ASHA in "
                                         "three brackets, fifo runs every trial to the last rung (plain Optuna)",
                                 choices=SCHEDULERS, sweep=True)
    tune_concurrency: int | None = option(None, "tune-* trials in flight at once (default: two per evaluator actor); "
                                                "1 makes a seeded experiment repeat exactly", minimum=1, sweep=True)
    tune_rungs: tuple[int, ...] = option((256, 1024, 4096), "the fidelity rungs of a tune-* trial, in fitness tokens: "
                                                            "it reports its running KL after each (the last rung is "
                                                            "always every fitness token)", minimum=1, sweep=True)
    estimator: str = option("permutation", "Shapley driver's estimator: antithetic permutation pairs while the "
                                           "budget lasts, or the sliding window of SV-NUP (both anytime)",
                            choices=ESTIMATORS, sweep=True)
    finalists: int | None = option(None, "how many drivers' best profiles (by validation KL) get the real final pass "
                                         "(default: every driver's); the lowest held-out validation perplexity after "
                                         "it wins (the Tune ATP best and uniform always run too)", minimum=1,
                                   identity=False, sweep=True, sweep_default=2, sweep_identity=True)
    selection_windows: int = option(32, "validation windows, after the fitness tokens, that pick the winner "
                                        "among finalists", minimum=1, sweep=True)
    uniform_baseline: bool = option(True, "skip the final pass of the uniform profile (the baseline the search is "
                                          "compared with; it may win)", flag="--no-uniform", cli="negated",
                                    identity=False)
    budget_evals: int | None = option(None, "fitness evaluations, shared by the drivers", identity=False)
    budget_tokens: int | None = option(None, "fitness tokens scored (an evaluation on 1024 tokens costs 4 on 256), "
                                             "shared by the drivers: a budget that does not depend on the machine's "
                                             "speed", identity=False)
    budget_minutes: float | None = option(None, "wall clock for the drivers (setup and final passes come on top)",
                                          identity=False)
    deadline_minutes: float | None = option(None, "wall clock for the whole run: the drivers get what setup "
                                                  "(measured) and the final passes (estimated) leave; at least 0.5 "
                                                  "(the setup alone takes that long)", minimum=0.5, identity=False)
    actors: int | None = option(None, "evaluator actors (default: one per GPU; locally without CUDA, one per "
                                      "--threads cores)", minimum=1, identity=False, sweep=True)
    threads: int = option(1, "torch threads (and CPUs) per CPU actor", minimum=1, identity=False, sweep=True)
    actor_gpus: bool | None = option(None, "GPU actors even if the cluster has no GPU yet (autoscaling clusters)",
                                     flag="--gpu-actors", cli="switch", identity=False)
    address: str | None = option(None, "join a running cluster: auto, or the head's host:port (default: the "
                                       "cluster of a Ray job, else a local one); submit to a remote cluster with "
                                       "`ray job submit`", identity=False, sweep=True)
    node_wait_minutes: float = option(10.0, "how long to wait for a node to replace one that died (its actors or "
                                            "final passes) before ending with the results kept (about an "
                                            "autoscaler's start)", minimum=0, identity=False, sweep=True)
    batch_size: int = opt.batch_size_option()
    device: str = opt.device_option()
    dtype: str = opt.dtype_option()
    evaluator: str = option("auto", "where the evaluator keeps the weights: resident on the actor's GPUs, or "
                                    "streamed block by block from host memory (auto: resident when the memory plan "
                                    "says it fits)", choices=EVALUATOR_MODES, identity=False, sweep=True)
    device_memory_gb: float | None = option(None, "device memory an actor may use per device, GiB (default: the "
                                                  "whole device)", minimum=0, identity=False, sweep=True)
    gpus_per_actor: int = option(1, "GPUs per evaluator actor; its resident blocks are split over them", minimum=1,
                                 identity=False, sweep=True)
    population: int = option(8, "candidates an actor advances block by block together (shared prefixes computed "
                                "once)", minimum=1, identity=False, sweep=True)
    seed: int = opt.seed_option()
    resume: bool = option(False, "continue an interrupted run in --out", cli="switch", identity=False)
    overwrite: bool = opt.overwrite_option()
    progress: bool = opt.progress_option()
    shares: dict | None = option(None, "drivers' shares of the budget under --method all (default: the registry's)",
                                 cli="none")


def check_protocol(config: SearchConfig) -> None:
    """Refuse settings no search or sweep cell can run with (each message names the flag)."""
    opt.check(config)
    if not 0.0 < config.sparsity < 1.0:
        raise SparseAllocError(f"--sparsity must lie in (0, 1), got {config.sparsity}")
    if not config.sequential_windows <= config.calib_samples:
        raise SparseAllocError(f"--sequential-windows must lie in [1, --calib-samples {config.calib_samples}], "
                               f"got {config.sequential_windows}")
    fitness_tokens = config.fitness_windows * config.fitness_seqlen
    if max(config.fidelities) > fitness_tokens:
        raise SparseAllocError(f"--fidelities asks for {max(config.fidelities)} tokens but the fitness set holds "
                               f"{fitness_tokens} (--fitness-windows {config.fitness_windows} x --fitness-seqlen "
                               f"{config.fitness_seqlen}); lower --fidelities or raise those")
    level_source_of(config)


def level_source_of(config: SearchConfig) -> str:
    """The level source ``config`` searches with (``auto``: the pruner's own), its grid checked."""
    source = resolve_level_source(config.level_source, PRUNERS[config.pruner].level_source, config.nm_m)
    kind = LEVEL_SOURCES[source]
    if config.db_levels and kind.prepare is None:
        raise SparseAllocError(f"--db-levels sets a level database's grid; the {source} level source has none (use "
                               "--level-source sparsegpt-db, or auto with --pruner sparsegpt)")
    kind.grid(config.sparsity, config.db_levels)  # a bad grid is refused here
    return source


def check_config(config: SearchConfig) -> None:
    """Refuse, before any work, a search that cannot run: its protocol, and a budget to run within."""
    check_protocol(config)
    budgets = (("--budget-evals", config.budget_evals), ("--budget-tokens", config.budget_tokens),
               ("--budget-minutes", config.budget_minutes), ("--deadline-minutes", config.deadline_minutes))
    for flag, value in budgets:
        if value is not None and value <= 0:
            raise SparseAllocError(f"{flag} must be positive, got {value}")
    if all(value is None for _, value in budgets):
        raise SparseAllocError("give a budget: --budget-evals N, --budget-tokens T, --budget-minutes M and/or "
                               "--deadline-minutes D")
