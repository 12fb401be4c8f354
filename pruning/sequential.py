"""The final pruning pass: block by block, each calibrated on the outputs of the already-pruned
blocks before it (Wanda / SparseGPT protocol). Only one block's activations live at a time."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from pruning.capture import capture_block_inputs, run_block, run_block_observing
from pruning.load import find_blocks, find_linears
from pruning.pruners import Pruner
from search_spaces.profile import Profile

log = logging.getLogger(__name__)


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
    captured = capture_block_inputs(model, blocks, calibration, batch_size, device) if pruner.needs_inputs else None
    hidden = captured.hidden if captured else None
    for index in tqdm(range(len(blocks)), desc=f"{pruner.name} pass", unit="block", disable=not progress):
        block = blocks[index]
        sparsity, nm = profile.sparsities[index], profile.pattern(index)
        linears = find_linears(block)
        stats = {}
        if pruner.needs_inputs and sparsity > 0:
            stats, _ = run_block_observing(block, linears, pruner.new_stats, hidden, captured.calls[index])
        if sparsity > 0:
            for name, layer in linears.items():
                pruner.prune(layer, stats.get(name), sparsity, nm)
        if captured is not None:
            hidden = run_block(block, hidden, captured.calls[index])
