"""``sparsealloc search``: run the drivers on Ray, pick the winning profile, run the final pass.

Each driver returns its best profile by the fast KL proxy; the best ``finalists`` of them (and the
Tune ATP best, the baseline) get the real final pruning pass, and the one with the lowest validation
perplexity on held-out validation windows (not the fitness tokens the search optimised) wins.

The run directory holds ``config.json``, the append-only ``results/`` table, Tune state, each
driver's best profile, ``summary.json`` and the pruned model (``model/``). Rerunning the same
command with ``--resume`` repeats the same seeded requests, which the results table answers
without re-evaluating, so an interrupted search continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import torch

from orchestrator.budget import Budget, driver_allowance
from orchestrator.candidates import Candidate, DriverResult
from orchestrator.evolution import EvolutionConfig, run_evolution
from orchestrator.final_pass import save_pruned, versions
from orchestrator.output import check_output, write_json
from orchestrator.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.progress import DriverProgress
from orchestrator.results import ResultsTable
from orchestrator.shapley_driver import run_shapley
from orchestrator.tune_driver import run_tune
from pruning.data import DEFAULT_DATA, consecutive_windows, prepare_tokens
from pruning.errors import SparseAllocError
from pruning.load import DEFAULT_MODEL, load_model, load_tokenizer, pick_device, pick_dtype
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.perplexity import perplexity
from scoring.sparsity import achieved_sparsity
from search_spaces import families
from search_spaces.profile import Profile, write_profile

log = logging.getLogger(__name__)

DRIVERS = ("shapley", "evolution", "tune-atp", "tune-owl", "tune-fisher", "tune-free")
# Share of the budget each driver gets under --method all.
ALL_SHARES = {"shapley": 0.3, "evolution": 0.4, "tune-free": 0.15, "tune-atp": 0.15}
OWL_M_CHOICES = (3, 4, 5, 6, 7, 8, 9, 10)


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
    fitness_windows: int = 8
    fitness_seqlen: int = 128
    fidelities: tuple[int, ...] = (256, 1024)
    nm_m: int | None = None
    free_sampler: str = "tpe"
    finalists: int = 2
    selection_windows: int = 8
    budget_evals: int | None = None
    budget_minutes: float | None = None
    actors: int | None = None
    threads: int = 1
    actor_gpus: bool | None = None
    address: str | None = None
    batch_size: int = 4
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    shares: dict = field(default_factory=lambda: dict(ALL_SHARES))

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
                "fitness_seqlen", "fidelities", "nm_m", "free_sampler", "seed", "budget_evals", "shares")
        return json.loads(json.dumps({k: getattr(self, k) for k in keep}))


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


def _actor_count(config: SearchConfig) -> int | None:
    """``--actors``, else one CPU actor per ``--threads`` cores on a local machine without CUDA;
    None lets the pool put one actor on each GPU."""
    if config.actors or config.address or torch.cuda.is_available():
        return config.actors
    return max(1, (os.cpu_count() or 1) // config.threads)


def _init_ray(config: SearchConfig, actors: int | None) -> bool:
    """Join ``--address`` or start a local Ray; returns whether we started it."""
    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, log_to_driver=False)
        return True
    if actors is None:  # local GPUs: Ray detects them and the cores, one actor per GPU
        ray.init(include_dashboard=False, log_to_driver=False)
        return True
    # One logical CPU more than the CPU actors use: Tune trials only wait on actor calls.
    ray.init(num_cpus=actors * config.threads + 1, include_dashboard=False, log_to_driver=False)
    return True


def _budget(config: SearchConfig, share: float, shares_left: float, spent_evals: int, spent_seconds: float) -> Budget:
    """The next driver's budget: its share of the search's, plus its part of what earlier drivers left."""
    if config.budget_evals is None and config.budget_minutes is None:
        raise SparseAllocError("give a budget: --budget-evals N and/or --budget-minutes M")
    evals = driver_allowance(config.budget_evals, spent_evals, share, shares_left)
    seconds = driver_allowance(None if config.budget_minutes is None else config.budget_minutes * 60,
                               spent_seconds, share, shares_left)
    return Budget(max_evals=None if evals is None else max(1, int(evals)), max_seconds=seconds)


def _run_driver(name: str, pool: EvaluatorPool, config: SearchConfig, budget: Budget, calibration: torch.Tensor,
                top_tokens: int) -> DriverResult:
    n, target, weights = pool.num_blocks, config.sparsity, pool.block_weights
    if name == "shapley":
        return run_shapley(pool, target, budget, tokens=top_tokens, seed=config.seed, progress=config.progress)
    if name == "evolution":
        fisher = ray.get(pool.actors[0].fisher_traces.remote(calibration[: max(1, calibration.shape[0] // 2)]))
        seeds = [families.sensitivity_map(fisher, target, 1.0, weights), families.uniform(n, target),
                 families.atp(n, target, families.atp_beta_max(n, target) / 2)]
        bar = DriverProgress("evolution", budget, config.progress)
        survivors = tuple([4] * (len(config.fidelities) - 1) + [1])
        result = run_evolution(
            pool.evaluate, seeds,
            EvolutionConfig(target=target, nm_m=config.nm_m, fidelities=tuple(config.fidelities), survivors=survivors,
                            seed=config.seed, weights=weights),
            budget, on_generation=lambda _g, best, _e: bar.update(best))
        bar.close()
        return DriverResult("evolution", result.best, result.fitness, result.evaluations,
                            {"generations": result.generations, "history": result.history, "fisher": fisher})
    run_dir = Path(config.out)
    if name == "tune-atp":
        return run_tune(pool, name, families.atp_space(n, target), lambda c: families.atp(n, target, c["beta"]),
                        budget, run_dir, top_tokens, config.seed, resume=config.resume,
                        progress=config.progress)
    if name == "tune-owl":
        ratios = {m: ray.get(pool.actors[0].outlier_ratios.remote(float(m))) for m in OWL_M_CHOICES}
        space = {"lam": ("uniform", 0.0, 0.2), "M": ("int", OWL_M_CHOICES[0], OWL_M_CHOICES[-1])}
        return run_tune(pool, name, space, lambda c: families.owl(ratios[int(c["M"])], target, c["lam"]),
                        budget, run_dir, top_tokens, config.seed, resume=config.resume,
                        progress=config.progress)
    if name == "tune-fisher":
        fisher = ray.get(pool.actors[0].fisher_traces.remote(calibration[: max(1, calibration.shape[0] // 2)]))
        return run_tune(pool, name, families.sensitivity_space(),
                        lambda c: families.sensitivity_map(fisher, target, c["strength"], weights),
                        budget, run_dir, top_tokens, config.seed, resume=config.resume,
                        progress=config.progress)
    keys = families.free_keys(n)
    lo, hi = max(0.0, target - 0.25), min(0.99, target + 0.25)
    return run_tune(pool, name, families.free_space(n, lo, hi),
                    lambda c: families.free_vector([c[k] for k in keys], target, weights, lo, hi),
                    budget, run_dir, top_tokens, config.seed, resume=config.resume, progress=config.progress,
                    sampler=config.free_sampler)


def finalists(results: dict[str, DriverResult], count: int) -> list[str]:
    """Drivers whose best profiles get the real final pass: the ``count`` best by search fitness
    (distinct profiles only), then tune-atp when it ran (the baseline every search is compared with)."""
    if count < 1:
        raise SparseAllocError(f"--finalists must be at least 1, got {count}")
    chosen, seen = [], set()
    for name in sorted(results, key=lambda n: results[n].fitness):
        profile = (results[name].best.sparsities, results[name].best.nm)
        if len(chosen) < count and profile not in seen:
            chosen.append(name)
            seen.add(profile)
    if "tune-atp" in results and "tune-atp" not in chosen:
        chosen.append("tune-atp")
    return chosen


def selection_windows(validation: torch.Tensor, fitness_tokens: int, count: int) -> torch.Tensor:
    """Validation windows after those holding the search's fitness tokens (held out from the search)."""
    skip = math.ceil(fitness_tokens / validation.shape[1])
    if validation.shape[0] <= skip:
        raise SparseAllocError(f"no validation tokens are left after the {fitness_tokens} fitness tokens to choose "
                               f"the winner on; raise --eval-windows (now {validation.shape[0]} windows)")
    return validation[skip : skip + count]


def _final_pass(model, dense_state, data, selection: torch.Tensor, profile: Profile, config: SearchConfig,
                device, name: str) -> dict:
    """The real pruning pass with ``profile``, then validation (held-out) and test perplexity."""
    model.load_state_dict(dense_state)
    start = time.perf_counter()
    prune_sequentially(model, data.calibration, profile, get_pruner(config.pruner), device, config.batch_size,
                       config.progress)
    prune_s = time.perf_counter() - start
    validation = perplexity(model, selection, device, config.batch_size, config.progress,
                            f"{name}: validation perplexity")
    test = perplexity(model, data.test, device, config.batch_size, config.progress, f"{name}: test perplexity")
    return {"validation_perplexity": validation, "test_perplexity": test, "prune_s": prune_s,
            "achieved": achieved_sparsity(model)}


def run_search(config: SearchConfig) -> dict:
    """Run the configured drivers, then the final pass of the winner; returns the summary."""
    if not 0.0 < config.sparsity < 1.0:
        raise SparseAllocError(f"--sparsity must lie in (0, 1), got {config.sparsity}")
    get_pruner(config.pruner)
    if config.finalists < 1 or config.selection_windows < 1:
        raise SparseAllocError(f"--finalists and --selection-windows must be at least 1, got {config.finalists} "
                               f"and {config.selection_windows}")
    shares = config.drivers()
    run_id = _prepare_run_dir(config)
    torch.manual_seed(config.seed)
    actors = _actor_count(config)
    started_ray = _init_ray(config, actors)
    pool: EvaluatorPool | None = None
    try:
        tokenizer = load_tokenizer(config.model)
        data = prepare_tokens(tokenizer, config.data, seqlen=config.seqlen, calib_samples=config.calib_samples,
                              eval_windows=config.eval_windows, seed=config.seed, text_field=config.text_field)
        fitness = consecutive_windows(data.validation.flatten(), config.fitness_seqlen, config.fitness_windows)
        top_tokens = int(fitness.numel())
        if max(config.fidelities) > top_tokens:
            raise SparseAllocError(f"fidelity {max(config.fidelities)} tokens exceeds the {top_tokens} fitness tokens "
                                   "(--fitness-windows x --fitness-seqlen)")
        selection = selection_windows(data.validation, top_tokens, config.selection_windows)
        pool = EvaluatorPool(EvaluatorSpec(config.model, batch_size=config.batch_size, threads=config.threads),
                             data.calibration, fitness, ResultsTable(Path(config.out), run_id), actors,
                             gpu=config.actor_gpus)
        results: dict[str, DriverResult] = {}
        spent_evals, spent_seconds = 0, 0.0
        for index, (name, share) in enumerate(shares.items()):
            start = time.perf_counter()
            budget = _budget(config, share, sum(list(shares.values())[index:]), spent_evals, spent_seconds)
            result = _run_driver(name, pool, config, budget, data.calibration, top_tokens)
            # Compare drivers on one footing: every best profile scored on all fitness tokens.
            result.fitness = pool.evaluate([Candidate.of(result.best, top_tokens, name)])[0]
            result.details["seconds"] = time.perf_counter() - start
            spent_evals += budget.used_evals
            spent_seconds += result.details["seconds"]
            results[name] = result
            write_profile(Path(config.out) / f"best-{name}.json", result.best, result.best.mean(pool.block_weights),
                          driver=name, fitness=result.fitness)
            log.info("%s: best validation KL %.4f after %d evaluations", name, result.fitness, result.evaluations)
    finally:
        if pool is not None:
            pool.close()
        if started_ray:
            ray.shutdown()
    return _finish(config, data, selection, results, tokenizer)


def _finish(config: SearchConfig, data, selection: torch.Tensor, results: dict[str, DriverResult],
            tokenizer) -> dict:
    """Final pass for each finalist; the one with the lowest held-out validation perplexity wins and
    is saved. The search's KL proxy picks each driver's best, the real pass picks among them."""
    names = finalists(results, config.finalists)
    device = pick_device("auto")
    model, _ = load_model(config.model, pick_dtype("auto", device))
    model.to(device)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense_ppl = perplexity(model, data.test, device, config.batch_size, config.progress, "dense test perplexity")
    passes: dict[str, dict] = {}
    best = None
    for name in names:
        passes[name] = _final_pass(model, dense_state, data, selection, results[name].best, config, device, name)
        log.info("%s: validation perplexity %.3f, test perplexity %.3f after the %s pass", name,
                 passes[name]["validation_perplexity"], passes[name]["test_perplexity"], config.pruner)
        if best is None or passes[name]["validation_perplexity"] < passes[best]["validation_perplexity"]:
            best, winner_state = name, {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    winner, final = results[best], passes[best]
    model.load_state_dict(winner_state)
    summary = {
        "winner": winner.driver, "winner_test_perplexity": final["test_perplexity"], "dense_test_perplexity": dense_ppl,
        "selection": {"finalists": names, "criterion": f"validation perplexity after the {config.pruner} pass",
                      "tokens": int(selection.numel())},
        "drivers": {name: {"validation_kl": r.fitness, "evaluations": r.evaluations,
                           "seconds": r.details.get("seconds"), "profile": list(r.best.sparsities),
                           "details": {k: v for k, v in r.details.items() if k != "seconds"}}
                    for name, r in results.items()},
        "final_passes": passes,
    }
    if "tune-atp" in passes:
        summary["atp_test_perplexity"] = passes["tune-atp"]["test_perplexity"]
        summary["winner_vs_atp"] = final["test_perplexity"] / summary["atp_test_perplexity"] - 1
    metrics = {"model": config.model, "pruner": config.pruner, "target_sparsity": config.sparsity,
               "dense_perplexity": dense_ppl, "pruned_perplexity": final["test_perplexity"],
               "achieved_sparsity": final["achieved"], "profile": winner.best.to_json(),
               "protocol": {**data.protocol, "fitness": "KL(dense || pruned) on validation prefix",
                            "fitness_tokens": config.fitness_windows * config.fitness_seqlen,
                            "selection": summary["selection"]},
               "seed": config.seed, "timings": {"prune_s": final["prune_s"]}, "versions": versions(),
               "search": {"winner": winner.driver, "run_dir": str(config.out)}}
    save_pruned(Path(config.out) / "model", True, model, tokenizer, winner.best, winner.best.mean(), metrics)
    write_json(Path(config.out) / "summary.json", summary)
    return summary
