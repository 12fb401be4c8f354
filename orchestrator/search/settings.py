"""One search's settings, resolved once at the start of a run: the device and dtype the actors and
final passes use, the level source, the drivers with their shares, whether evolution ends with a
kl-seq stage, the evaluator mode and the token sets. Every later step (pool, drivers, final passes,
run directory, sweep cells) reads these instead of deciding again.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace

import torch

from core.errors import SparseAllocError
from core.identity import package_version, plain
from orchestrator.runtime.cluster import cluster_address
from orchestrator.runtime.options import identity_of
from orchestrator.runtime.plan import DTYPE_BYTES, ModelShape, check_plan, detect_device_memory, make_plan, shape_of
from orchestrator.search.config import SearchConfig, check_protocol, level_source_of
from orchestrator.search.registry import all_shares
from pruning.data import consecutive_windows, prepare_tokens
from pruning.load import dtype_name, pick_device, pick_dtype
from scoring.level_sources import LEVEL_SOURCES

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Settings:
    """A search's settings as resolved: ``config`` as asked, and what was decided from it."""

    config: SearchConfig
    device: str  # "cpu" or "cuda": where the actors and final passes run
    dtype: str  # fp32, bf16 or fp16
    level_source: str  # a name of scoring.level_sources.LEVEL_SOURCES
    drivers: dict  # driver -> its fraction of the budget, in the order they run
    evaluator: str  # resident, streamed, or auto (each actor decides from its own device)
    actors: int | None  # evaluator actors (None: one per GPU)
    model_bytes: int = 0  # the model's tensors in ``dtype``: what one saved pruned model takes on disk
    linear_weights: int = 0  # prunable weights in the blocks (what a level database stores per level)

    @property
    def sequential_top(self) -> bool:
        """Evolution ends with a kl-seq stage (the level source's masks refreshed per profile)."""
        return self.config.top_fitness == "kl-seq" and LEVEL_SOURCES[self.level_source].sequential

    @property
    def sequential_fitness(self) -> bool:
        """The evaluators will be asked for kl-seq (a second set of rank tables while it scores)."""
        return "evolution" in self.drivers and self.sequential_top

    @property
    def sequential_tokens(self) -> int:
        """What one kl-seq evaluation is charged beyond its fitness tokens: its calibration forwards."""
        return 2 * self.config.sequential_windows * self.config.seqlen if self.sequential_top else 0

    @property
    def fitness_tokens(self) -> int:
        return self.config.fitness_windows * self.config.fitness_seqlen

    def identity(self) -> dict:
        """What a resumed run must share with the original (``--resume`` names the fields that differ)."""
        identity = identity_of(self.config)
        identity.update(device=self.device, dtype=self.dtype, level_source=self.level_source,
                        shares=self.config.shares or all_shares(), version=package_version(),
                        evaluator={"levels": self.level_source, "fitness": "KL(dense || pruned)"})
        return plain(identity)


def actor_count(config: SearchConfig) -> int | None:
    """``--actors``, else one CPU actor per ``--threads`` cores on a local machine without CUDA;
    None lets the pool put one actor on each GPU."""
    if config.actors or cluster_address(config.address) or torch.cuda.is_available():
        return config.actors
    return max(1, (os.cpu_count() or 1) // config.threads)


def resolve(config: SearchConfig, drivers: dict[str, float], cluster_gpus: float, actors: int | None) -> Settings:
    """The settings of ``config``: ``auto`` device is CUDA with bf16 when the actors get GPUs
    (``--gpu-actors`` or ``cluster_gpus``), else CPU with fp32; ``auto`` level source the pruner's own;
    ``actors``: :func:`actor_count`'s, as Ray was started for;
    the evaluator mode from the memory plan (checked here: a run that cannot fit is refused)."""
    check_protocol(config)
    if config.device == "auto":
        gpus = config.actor_gpus if config.actor_gpus is not None else cluster_gpus > 0
        device = "cuda" if gpus else "cpu"
    else:
        device = pick_device(config.device).type
    dtype = dtype_name(pick_dtype(config.dtype, torch.device(device)))
    level_source = level_source_of(config)
    shape = shape_of(config.model)
    settings = Settings(config, device, dtype, level_source, drivers, config.evaluator, actors,
                        shape.total_elements * DTYPE_BYTES[dtype], shape.linear_weights)
    return replace(settings, evaluator=evaluator_mode(settings, shape))


def evaluator_mode(settings: Settings, shape: ModelShape) -> str:
    """The memory plan for this search (``sparsealloc plan``), checked before any work; returns the
    evaluator mode. Without ``--device-memory-gb`` the budget is the device this process sees, or,
    for GPU actors seen from a GPU-less driver, unknown: each actor then plans with its own device."""
    config = settings.config
    if config.device_memory_gb is not None:
        budget = int(config.device_memory_gb * 2**30)
    else:
        budget, is_cuda = detect_device_memory()
        if (settings.device == "cuda") != is_cuda:
            return config.evaluator
    plan = make_plan(shape, dtype=settings.dtype, device_memory_bytes=budget,
                     gpus_per_actor=config.gpus_per_actor, evaluator=config.evaluator,
                     fitness_tokens=settings.fitness_tokens, fitness_seqlen=config.fitness_seqlen,
                     batch_size=config.batch_size, calib_samples=config.calib_samples, seqlen=config.seqlen,
                     population=config.population, pruner=config.pruner,
                     sequential_fitness=settings.sequential_fitness)
    check_plan(plan)
    log.info("memory plan: %s evaluator, %.2f bytes per weight on the device", plan.evaluator, plan.bytes_per_weight)
    return plan.evaluator


@dataclass(frozen=True)
class Tokens:
    """A search's token windows: calibration, test, the fitness windows (the first validation tokens)
    and the selection windows after them (held out from the search), with the data protocol."""

    calibration: torch.Tensor
    test: torch.Tensor
    fitness: torch.Tensor
    selection: torch.Tensor
    protocol: dict

    @property
    def top_tokens(self) -> int:
        """All fitness tokens: what an evaluation on all of them scores."""
        return int(self.fitness.numel())


def token_sets(settings: Settings, tokenizer) -> Tokens:
    """Calibration, test, fitness and selection tokens, each from its own flags: fitness is the first
    ``--fitness-windows`` x ``--fitness-seqlen`` validation tokens, selection the ``--selection-windows``
    windows of ``--seqlen`` after them, test ``--eval-windows`` windows of the test split."""
    config = settings.config
    fitness_tokens = settings.fitness_tokens
    validation_windows = math.ceil(fitness_tokens / config.seqlen) + config.selection_windows
    data = prepare_tokens(tokenizer, config.data, seqlen=config.seqlen, calib_samples=config.calib_samples,
                          eval_windows=config.eval_windows, seed=config.seed, text_field=config.text_field,
                          validation_windows=validation_windows)
    fitness = consecutive_windows(data.validation.flatten(), config.fitness_seqlen, config.fitness_windows)
    if fitness.numel() < fitness_tokens:
        raise SparseAllocError(f"the validation split of --data holds {data.validation.numel()} tokens, fewer than the "
                               f"{fitness_tokens} fitness tokens (--fitness-windows x --fitness-seqlen); lower those "
                               "or use a larger --data")
    selection = selection_windows(data.validation, fitness_tokens, config.selection_windows)
    return Tokens(data.calibration, data.test, fitness, selection, data.protocol)


def selection_windows(validation: torch.Tensor, fitness_tokens: int, count: int) -> torch.Tensor:
    """Validation windows after those holding the search's fitness tokens (held out from the search)."""
    skip = math.ceil(fitness_tokens / validation.shape[1])
    if validation.shape[0] <= skip:
        raise SparseAllocError(f"the validation split holds {validation.shape[0]} windows of {validation.shape[1]} "
                               f"tokens; after the {fitness_tokens} fitness tokens (--fitness-windows x "
                               "--fitness-seqlen) none is left to choose the winner on: lower those, or "
                               "--selection-windows, or use a larger --data")
    return validation[skip : skip + count]
