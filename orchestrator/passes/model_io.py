"""A model during a final pass: placed on its device (block-offloaded when it does not fit), described
(device, dtype) in metrics, and saved with its profile and metrics.

Models whose weights (plus the pass's activations) do not fit the device's free memory are pruned
and evaluated block-offloaded: the blocks stay on the host and visit the device one at a time.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from core.identity import write_json
from core.profile import Profile, write_profile
from orchestrator.runtime.rundir import staged_output
from pruning.load import find_blocks, find_linears, unit_layout
from pruning.offload import move_non_blocks


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


def layer_sparsities(model, profile: Profile) -> dict[str, float]:
    """llm-compressor-style per-layer list: every pruned linear's full module name → its sparsity."""
    blocks = find_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    return profile.layer_sparsities(unit_layout(model), prefix)


def save_pruned(out: Path, overwrite: bool, model, tokenizer, profile: Profile, target: float, metrics: dict,
                extra_files: dict | None = None) -> None:
    """Write model, tokenizer, profile.json, layer-sparsities.json, metrics.json (and any extra JSON files)
    atomically."""
    start = time.perf_counter()
    with staged_output(Path(out), overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_profile(staging / "profile.json", profile, target, unit_layout(model), pruner=metrics["pruner"],
                      model=metrics["model"])
        write_json(staging / "layer-sparsities.json", layer_sparsities(model, profile))
        metrics["timings"]["save_s"] = time.perf_counter() - start
        write_json(staging / "metrics.json", metrics)
        for name, data in (extra_files or {}).items():
            write_json(staging / name, data)


