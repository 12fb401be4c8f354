"""``sparsealloc sensitivity``: per-block Shapley values, Fisher traces or OWL outlier ratios."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from core.identity import write_json
from orchestrator.runtime.rundir import check_output, staged_output
from orchestrator.runtime import options as opt
from orchestrator.runtime.options import option
from pruning.data import consecutive_windows, prepare_tokens
from core.errors import SparseAllocError
from pruning.load import load_model, pick_device, pick_dtype
from scoring.evaluator import CandidateEvaluator
from scoring.sensitivity import (METHODS, Sensitivity, fisher_sensitivity, owl_sensitivity, plot_sensitivity,
                                 shapley_sensitivity)

log = logging.getLogger(__name__)


@dataclass
class SensitivityConfig:
    """What ``sparsealloc sensitivity`` needs; each field is a flag (see :mod:`orchestrator.runtime.options`)."""

    out: Path = option(help="output directory (sensitivity.json, sensitivity.png)")
    method: str = option(help="per-block Shapley values, Fisher traces or OWL outlier ratios", choices=METHODS)
    sparsity: float = option(0.7, "sparsity a pruned block gets in a coalition")
    estimator: str = option("sliding", "Shapley estimator", choices=("sliding", "permutation", "exact"))
    window: int = option(3, "sliding-window size (blocks)", minimum=1)
    permutations: int = option(8, "sampled orders (even: antithetic pairs)", minimum=1)
    owl_m: float = option(5.0, "OWL outlier threshold multiplier M", minimum=0)
    fitness_windows: int = option(8, "validation windows for the KL fitness", minimum=1)
    fitness_seqlen: int = option(128, "tokens per fitness window", minimum=1)
    model: str = opt.model_option()
    data: str = opt.data_option()
    text_field: str | None = opt.text_field_option()
    seqlen: int = opt.seqlen_option(512)
    calib_samples: int = opt.calib_samples_option(32)
    batch_size: int = opt.batch_size_option()
    device: str = opt.device_option()
    dtype: str = opt.dtype_option()
    seed: int = opt.seed_option()
    overwrite: bool = opt.overwrite_option()
    progress: bool = opt.progress_option()


def run_sensitivity(config: SensitivityConfig) -> Sensitivity:
    """Compute the sensitivity, write ``sensitivity.json`` and ``sensitivity.png`` to ``config.out``."""
    opt.check(config)
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
