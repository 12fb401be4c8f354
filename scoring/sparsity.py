"""Achieved sparsity, counted from the weights themselves."""

from __future__ import annotations

from pruning.load import find_blocks, find_linears


def achieved_sparsity(model) -> dict:
    """Share of exact zeros per block, per linear and overall (over the linears of the blocks)."""
    per_block, per_linear = [], {}
    zeros_total = weights_total = 0
    for index, block in enumerate(find_blocks(model)):
        zeros = weights = 0
        for name, layer in find_linears(block).items():
            z = int((layer.weight == 0).sum())
            n = layer.weight.numel()
            per_linear[f"{index}.{name}"] = z / n
            zeros, weights = zeros + z, weights + n
        per_block.append(zeros / weights)
        zeros_total, weights_total = zeros_total + zeros, weights_total + weights
    return {"overall": zeros_total / weights_total, "per_block": per_block, "per_linear": per_linear}
