"""``sparsealloc sensitivity``: per-block Shapley values, Fisher traces or OWL outlier ratios."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from core.identity import write_json
from orchestrator.runtime.rundir import check_output, staged_output
from pruning.data import DEFAULT_DATA, consecutive_windows, prepare_tokens
from core.errors import SparseAllocError
from pruning.load import DEFAULT_MODEL, load_model, pick_device, pick_dtype
from scoring.evaluator import CandidateEvaluator
from scoring.sensitivity import (METHODS, Sensitivity, fisher_sensitivity, owl_sensitivity, plot_sensitivity,
                                 shapley_sensitivity)

log = logging.getLogger(__name__)


@dataclass
class SensitivityConfig:
    """What ``sparsealloc sensitivity`` needs; flags map one to one."""

    out: Path
    method: str = "shapley"
    sparsity: float = 0.7
    estimator: str = "sliding"
    window: int = 3
    permutations: int = 8
    owl_m: float = 5.0
    fitness_windows: int = 8
    fitness_seqlen: int = 128
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    text_field: str | None = None
    seqlen: int = 512
    calib_samples: int = 32
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


def run_sensitivity(config: SensitivityConfig) -> Sensitivity:
    """Compute the sensitivity, write ``sensitivity.json`` and ``sensitivity.png`` to ``config.out``."""
    if config.method not in METHODS:
        raise SparseAllocError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < config.sparsity < 1.0:
        raise SparseAllocError(f"--sparsity must lie in (0, 1) for a sensitivity, got {config.sparsity}")
    check_output(Path(config.out), config.overwrite)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    model, tokenizer = load_model(config.model, pick_dtype(config.dtype, device))
    model.to(device)
    data = prepare_tokens(tokenizer, config.data, seqlen=config.seqlen, calib_samples=config.calib_samples,
                          seed=config.seed, text_field=config.text_field)
    if config.method == "fisher":
        result = fisher_sensitivity(model, data.calibration, device, config.progress)
    elif config.method == "owl":
        result = owl_sensitivity(model, data.calibration, device, config.owl_m, config.batch_size, config.progress)
    else:
        fitness = consecutive_windows(data.validation.flatten(), config.fitness_seqlen, config.fitness_windows)
        evaluator = CandidateEvaluator(model, data.calibration, fitness, device, batch_size=config.batch_size,
                                       progress=config.progress)
        result = shapley_sensitivity(evaluator, config.sparsity, config.estimator, config.window,
                                     config.permutations, config.seed, progress=config.progress)
    result.details.update(model=config.model, protocol=data.protocol)
    with staged_output(Path(config.out), config.overwrite) as staging:
        write_json(staging / "sensitivity.json", result.to_json())
        plot_sensitivity(result, staging / "sensitivity.png")
    return result
