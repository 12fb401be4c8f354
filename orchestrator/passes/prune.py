"""``sparsealloc prune``: the final pruning pass as one call: load, calibrate, prune by profile,
evaluate, save (block-offloaded when the model does not fit the device, see :mod:`.model_io`)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.errors import SparseAllocError
from core.identity import versions
from core.profile import MEAN_TOLERANCE, Profile, parse_nm, read_profile
from core.units import UnitLayout
from orchestrator.passes.model_io import (choose_offload, device_free_bytes, device_info,
                                          pass_reserve_bytes, place_model, save_pruned)
from orchestrator.runtime import options as opt
from orchestrator.runtime.options import option
from orchestrator.runtime.lock import RunLock
from orchestrator.runtime.rundir import check_free_space, check_output, check_writable
from pruning.data import prepare_tokens
from pruning.load import dtype_name, load_model, pick_device, pick_dtype, unit_layout
from pruning.offload import tensor_bytes
from pruning.pruners import PRUNERS, get_pruner
from pruning.sequential import prune_sequentially
from scoring.dense_cache import cached_dense_perplexity, resolve_model
from scoring.perplexity import perplexity
from scoring.sparsity import achieved_sparsity

log = logging.getLogger(__name__)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass
class PruneConfig:
    """Everything a final pass needs; each field is a ``prune`` flag (see :mod:`orchestrator.runtime.options`)."""

    out: Path = option(help="output directory (model, profile.json, metrics.json)")
    model: str = opt.model_option()
    data: str = opt.data_option()
    text_field: str | None = opt.text_field_option()
    pruner: str = option("wanda", "final pass", choices=lambda: list(PRUNERS))
    sparsity: float | None = option(None, "target mean sparsity in [0, 1)")
    nm: str | None = option(None, "uniform N:M pattern, N zeros in every M weights (e.g. 2:4)")
    profile: Path | None = option(None, "profile.json with one sparsity (and optionally one N:M pattern) per "
                                        "decoder block")
    seqlen: int = opt.seqlen_option(2048)
    calib_samples: int = opt.calib_samples_option(128)
    eval_windows: int | None = option(None, "cap on test windows (default: whole test split)", minimum=1)
    batch_size: int = opt.batch_size_option()
    device: str = opt.device_option()
    dtype: str = opt.dtype_option()
    offload: bool | None = option(None, "keep the blocks on the host and move them to the device one at a time "
                                        "(auto: when the model does not fit the device's free memory)",
                                  words={"auto": None, "on": True, "off": False})
    seed: int = opt.seed_option()
    overwrite: bool = opt.overwrite_option()
    progress: bool = opt.progress_option()
    dense_cache: bool = option(True, "recompute the dense perplexity even when an earlier run cached it for the "
                                     "same model, test windows, dtype and device type (cache: "
                                     "$SPARSEALLOC_CACHE/dense)", flag="--no-dense-cache", cli="negated")
    zero_shot_tasks: tuple[str, ...] | None = option(
        None, "also score the pruned model's zero-shot accuracy on these lm-eval tasks (local data only; needs pip "
              "install 'sparsealloc[eval]')", metavar="A,B", parse=_names)
    zero_shot_include: Path | None = option(None, "directory of lm-eval task YAMLs (dataset_path: json, data_files "
                                                  "on this machine)", metavar="DIR")
    zero_shot_limit: int | None = option(None, "at most N examples per zero-shot task (default: all)", minimum=1,
                                         metavar="N")


def _check_ratio(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise SparseAllocError(f"{what} must lie in [0, 1), got {value}")


def resolve_profile(config: PruneConfig, layout: UnitLayout) -> tuple[Profile, float]:
    """The profile (per block, or per group or linear from ``--profile``) and its target mean from
    ``--profile``, ``--nm`` or ``--sparsity`` (``--sparsity`` already checked to lie in [0, 1) by
    :func:`run_prune`)."""
    num_blocks = layout.num_blocks
    if config.profile is not None:
        profile, recorded = read_profile(config.profile)
        target = config.sparsity if config.sparsity is not None else recorded
        if target is None:
            target = profile.mean(layout.weights(profile.granularity))
        profile.check_layout(layout, target)
        return profile, float(target)
    if config.nm is not None:
        n, m = parse_nm(config.nm)
        if config.sparsity is not None and abs(config.sparsity - n / m) > MEAN_TOLERANCE:
            raise SparseAllocError(f"--nm {config.nm} means sparsity {n / m}, but --sparsity is {config.sparsity}")
        return Profile.uniform_nm(num_blocks, (n, m)), n / m
    if config.sparsity is None:
        raise SparseAllocError("say how sparse: give --sparsity, --nm or --profile")
    return Profile.uniform(num_blocks, config.sparsity), config.sparsity


def run_prune(config: PruneConfig) -> dict:
    """Prune ``config.model`` with a per-block profile and save model, profile and metrics to ``config.out``."""
    pruner = get_pruner(config.pruner)
    opt.check(config)
    if config.sparsity is not None:
        _check_ratio(config.sparsity, "--sparsity")
    if config.zero_shot_tasks is not None and not config.zero_shot_tasks:
        raise SparseAllocError("--zero-shot-tasks needs at least one task name")
    out = Path(config.out)
    check_output(out, config.overwrite)
    check_writable(out)
    # The lock sits beside --out: the output directory itself is replaced when the pass ends.
    lock = RunLock(out.parent / f".{out.name}.lock", f"--out {out}", remove=True).acquire()
    try:
        return _prune(config, pruner)
    finally:
        lock.release()


def _prune(config: PruneConfig, pruner) -> dict:
    """:func:`run_prune` once its checks passed and ``--out`` is locked."""
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    timings: dict[str, float] = {}

    if config.zero_shot_tasks:
        from scoring.zero_shot import check_available

        check_available(config.zero_shot_tasks, config.zero_shot_include, config.zero_shot_limit)

    start = time.perf_counter()
    model_spec = resolve_model(config.model)  # resolved once: ``default`` re-hashes its weights
    model, tokenizer = load_model(model_spec, dtype)
    check_free_space(Path(config.out), tensor_bytes(model), "the pruned model")
    profile, target = resolve_profile(config, unit_layout(model))
    offload = choose_offload(config.offload, tensor_bytes(model),
                             pass_reserve_bytes(model, config.calib_samples, config.seqlen, config.batch_size),
                             device_free_bytes(device))
    if offload and config.zero_shot_tasks:
        raise SparseAllocError("zero-shot evaluation needs the whole model on the device, but block offloading is "
                               "on (--offload on, or the model does not fit the device's free memory): use "
                               "--offload off, or drop --zero-shot-tasks")
    place_model(model, device, offload)
    if offload:
        log.info("blocks stay on the host and visit %s one at a time (block offloading)", device)
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    data = prepare_tokens(tokenizer, config.data, seqlen=config.seqlen, calib_samples=config.calib_samples,
                          eval_windows=config.eval_windows, seed=config.seed, text_field=config.text_field)
    timings["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    dense_ppl, dense_cached = cached_dense_perplexity(
        model_spec, data.test, dtype, device, enabled=config.dense_cache,
        compute=lambda: perplexity(model, data.test, device, config.batch_size, config.progress, "dense perplexity",
                                   offload))
    timings["dense_eval_s"] = time.perf_counter() - start

    start = time.perf_counter()
    prune_sequentially(model, data.calibration, profile, pruner, device, config.batch_size, config.progress, offload)
    timings["prune_s"] = time.perf_counter() - start

    start = time.perf_counter()
    pruned_ppl = perplexity(model, data.test, device, config.batch_size, config.progress, "pruned perplexity",
                            offload)
    timings["pruned_eval_s"] = time.perf_counter() - start

    zero_shot = None
    if config.zero_shot_tasks:
        from scoring.zero_shot import zero_shot_accuracy

        start = time.perf_counter()
        zero_shot = zero_shot_accuracy(model, tokenizer, config.zero_shot_tasks, config.zero_shot_include,
                                       config.zero_shot_limit, device, config.batch_size)
        timings["zero_shot_s"] = time.perf_counter() - start

    metrics = {
        "model": config.model,
        "pruner": pruner.name,
        "target_sparsity": target,
        "dense_perplexity": dense_ppl,
        "dense_perplexity_cached": dense_cached,
        "pruned_perplexity": pruned_ppl,
        "achieved_sparsity": achieved_sparsity(model),
        "profile": profile.to_json(),
        "protocol": {**data.protocol, "eval_split": "test", "metric": "exp(mean NLL over predicted tokens)"},
        **device_info(device),
        "dtype": dtype_name(dtype),
        "offload": offload,
        "seed": config.seed,
        "timings": timings,
        "versions": versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    if zero_shot is not None:
        metrics["zero_shot"] = zero_shot
        metrics["protocol"]["zero_shot"] = {"harness": "lm-evaluation-harness", "num_fewshot": 0,
                                            "tasks": list(zero_shot), "include": metrics["config"]["zero_shot_include"],
                                            "limit": config.zero_shot_limit}
    save_pruned(Path(config.out), config.overwrite, model, tokenizer, profile, target, metrics)
    log.info("dense perplexity %.3f, pruned perplexity %.3f", dense_ppl, pruned_ppl)
    return metrics
