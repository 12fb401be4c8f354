"""The final pruning pass: block by block, each calibrated on the outputs of the already-pruned
blocks before it (Wanda / SparseGPT protocol). Only one block's activations live at a time.

With ``offload`` the blocks stay on the host and are moved to the device one at a time
(:func:`pruning.offload.onloaded`), pruned there and written back, so a model of any size is pruned
with one block's weights on the device; the host copy ends up with exactly the weights the
in-memory pass would write.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from pruning.capture import capture_block_inputs, run_block, run_block_observing
from pruning.load import find_blocks, find_linears, unit_layout
from pruning.offload import move_non_blocks, onloaded
from pruning.pruners import Pruner
from core.profile import Profile

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
    offload: bool = False,
) -> None:
    """Prune every linear to its unit's level in ``profile`` (block l's linears all to ``profile.sparsities[l]``
    for a per-block profile; embeddings, lm_head stay dense).

    ``offload``: the blocks stay where they are (the host) and each is moved to ``device`` only while
    it is calibrated, pruned and run; the non-block parts are moved to ``device`` (and stay there).
    Without it the whole model must already be on ``device``.
    """
    blocks = find_blocks(model)
    layout = unit_layout(model)
    profile.check_layout(layout)
    levels = profile.levels(layout)
    if offload:
        move_non_blocks(model, device)
    captured = capture_block_inputs(model, blocks, calibration, batch_size, device) if pruner.needs_inputs else None
    hidden = captured.hidden if captured else None
    for index in tqdm(range(len(blocks)), desc=f"{pruner.name} pass", unit="block", disable=not progress):
        pruned = any(sparsity > 0 for sparsity, _ in levels[index].values())
        if not pruned and captured is None:
            continue  # nothing to prune, nothing to run
        place = onloaded(blocks[index], device, write_back=pruned) if offload else nullcontext(blocks[index])
        with place as block:
            linears = find_linears(block)
            stats = {}
            if pruner.needs_inputs and pruned:
                stats, _ = run_block_observing(block, linears, pruner.new_stats, hidden, captured.calls[index])
            for name, layer in linears.items():
                sparsity, nm = levels[index][name]
                if sparsity > 0:
                    pruner.prune(layer, stats.get(name), sparsity, nm)
            del stats
            if captured is not None:
                hidden = run_block(block, hidden, captured.calls[index])
