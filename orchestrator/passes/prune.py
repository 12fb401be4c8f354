"""The final pruning pass as one call: load, calibrate, prune by profile, evaluate, save.

Models whose weights (plus the pass's activations) do not fit the device's free memory are pruned
and evaluated block-offloaded: the blocks stay on the host and visit the device one at a time.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.identity import versions, write_json
from orchestrator.runtime.rundir import check_output, staged_output
from pruning.data import DEFAULT_DATA, prepare_tokens
from core.errors import SparseAllocError
from pruning.load import (DEFAULT_MODEL, DTYPES, block_param_counts, find_blocks, find_linears, load_model,
                          pick_device, pick_dtype)
from pruning.offload import move_non_blocks, tensor_bytes
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.dense_cache import cached_dense_perplexity, resolve_model
from scoring.perplexity import perplexity
from scoring.sparsity import achieved_sparsity
from core.profile import MEAN_TOLERANCE, Profile, parse_nm, read_profile, write_profile

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """Everything a final pass needs; the CLI's ``prune`` flags map one to one."""

    out: Path
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    text_field: str | None = None
    pruner: str = "wanda"
    sparsity: float | None = None
    nm: str | None = None
    profile: Path | None = None
    seqlen: int = 2048
    calib_samples: int = 128
    eval_windows: int | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    offload: bool | None = None  # None: when the model does not fit the device's free memory
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    dense_cache: bool = True  # reuse the dense test perplexity cached by an earlier run (scoring.dense_cache)
    zero_shot_tasks: list[str] | None = None  # lm-eval task names (optional extra [eval]); local data only
    zero_shot_include: Path | None = None  # directory of lm-eval task YAMLs
    zero_shot_limit: int | None = None  # at most this many examples per zero-shot task


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device in bytes; None for the CPU (the host is never offloaded from)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def pass_reserve_bytes(model, calib_windows: int, seqlen: int, batch_size: int) -> int:
    """Device bytes the pass needs besides the weights (as ``sparsealloc plan`` counts them): the
    calibration hidden states (inputs and outputs of a block), one block's SparseGPT Hessians (fp32,
    the largest statistics of any pruner), a forward chunk's working activations and a mini-batch of
    fp32 logits (×3: logits, their float copy, the softmax)."""
    text = getattr(model.config, "text_config", None) or model.config
    element = next(model.parameters()).element_size()
    hidden_size = int(text.hidden_size)
    linears = find_linears(find_blocks(model)[0]).values()
    calibration = 2 * calib_windows * seqlen * hidden_size * element
    hessians = sum(layer.in_features ** 2 * 4 for layer in linears)
    widest = max(layer.out_features for layer in linears)
    activations = batch_size * seqlen * (4 * hidden_size + 2 * widest) * element * 2
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else int(text.vocab_size)
    return calibration + hessians + activations + 3 * batch_size * seqlen * vocab * 4


def choose_offload(requested: bool | None, model_bytes: int, reserve_bytes: int, free_bytes: int | None) -> bool:
    """``requested`` when given; else offload when the weights plus the reserve exceed the device's
    free memory (never on the CPU, ``free_bytes`` None)."""
    if requested is not None:
        return requested
    return free_bytes is not None and model_bytes + reserve_bytes > free_bytes


def place_model(model, device: torch.device, offload: bool) -> None:
    """The whole model on ``device``, or (``offload``) only its non-block parts, the blocks on the host."""
    if offload:
        move_non_blocks(model, device)
    else:
        model.to(device)


def device_info(device: torch.device) -> dict:
    """``device`` (its type: cuda, cpu …) and ``device_name`` (the GPU's or CPU's model name)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"device": device.type, "device_name": name}


def _check_ratio(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise SparseAllocError(f"{what} must lie in [0, 1), got {value}")


def resolve_profile(config: PruneConfig, num_blocks: int, weights: list[int]) -> tuple[Profile, float]:
    """The per-block profile and its target mean from ``--profile``, ``--nm`` or ``--sparsity``
    (``--sparsity`` already checked to lie in [0, 1) by :func:`run_prune`)."""
    if config.profile is not None:
        profile, recorded = read_profile(config.profile)
        target = config.sparsity if config.sparsity is not None else recorded
        if target is None:
            target = profile.mean(weights)
        profile.check_fits(num_blocks, weights, target)
        return profile, float(target)
    if config.nm is not None:
        n, m = parse_nm(config.nm)
        if config.sparsity is not None and abs(config.sparsity - n / m) > MEAN_TOLERANCE:
            raise SparseAllocError(f"--nm {config.nm} means sparsity {n / m}, but --sparsity is {config.sparsity}")
        return Profile.uniform_nm(num_blocks, (n, m)), n / m
    if config.sparsity is None:
        raise SparseAllocError("say how sparse: give --sparsity, --nm or --profile")
    return Profile.uniform(num_blocks, config.sparsity), config.sparsity


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` spelling of ``dtype`` (fp32, bf16, fp16)."""
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def save_pruned(out: Path, overwrite: bool, model, tokenizer, profile: Profile, target: float, metrics: dict,
                extra_files: dict | None = None) -> None:
    """Write model, tokenizer, profile.json, metrics.json (and any extra JSON files) atomically."""
    start = time.perf_counter()
    with staged_output(Path(out), overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_profile(staging / "profile.json", profile, target, pruner=metrics["pruner"], model=metrics["model"])
        metrics["timings"]["save_s"] = time.perf_counter() - start
        write_json(staging / "metrics.json", metrics)
        for name, data in (extra_files or {}).items():
            write_json(staging / name, data)


def run_prune(config: PruneConfig) -> dict:
    """Prune ``config.model`` with a per-block profile and save model, profile and metrics to ``config.out``."""
    pruner = get_pruner(config.pruner)
    if config.sparsity is not None:
        _check_ratio(config.sparsity, "--sparsity")
    check_output(Path(config.out), config.overwrite)
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
    weights = block_param_counts(model)
    profile, target = resolve_profile(config, len(find_blocks(model)), weights)
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
