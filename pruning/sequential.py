"""The final pruning pass: block by block, each calibrated on the outputs of the already-pruned
blocks before it (Wanda / SparseGPT protocol). Only one block's activations live at a time."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from pruning.capture import capture_block_inputs, run_block
from pruning.load import find_blocks, find_linears
from pruning.pruners import Pruner
from search_spaces.profile import Profile

log = logging.getLogger(__name__)


def _collect_stats(block, linears: dict, pruner: Pruner, inputs) -> dict:
    """Run the (not yet pruned) block on its inputs, accumulating each linear's input statistics."""
    stats = {name: pruner.new_stats(layer) for name, layer in linears.items()}
    handles = [
        layer.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, layer in linears.items()
    ]
    try:
        run_block(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def prune_sequentially(
    model,
    calibration: torch.Tensor,
    profile: Profile,
    pruner: Pruner,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Prune every linear of block l to ``profile.sparsities[l]`` (embeddings, lm_head stay dense)."""
    blocks = find_blocks(model)
    profile.check_fits(len(blocks))
    inputs = capture_block_inputs(model, blocks, calibration, batch_size, device) if pruner.needs_inputs else None
    for index in tqdm(range(len(blocks)), desc=f"{pruner.name} pass", unit="block", disable=not progress):
        block = blocks[index]
        sparsity, nm = profile.sparsities[index], profile.pattern(index)
        linears = find_linears(block)
        stats = _collect_stats(block, linears, pruner, inputs) if pruner.needs_inputs and sparsity > 0 else {}
        if sparsity > 0:
            for name, layer in linears.items():
                pruner.prune(layer, stats.get(name), sparsity, nm)
        if inputs is not None:
            inputs = run_block(block, inputs)
