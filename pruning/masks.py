"""Masks from importance scores. ``True`` marks a weight to remove; lower score = removed first."""

from __future__ import annotations

import torch

from core.errors import SparseAllocError


def prune_count(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a sparsity removes (rounded to nearest)."""
    return int(round(size * sparsity))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest-scoring weights within each output row (Wanda's comparison group)."""
    k = prune_count(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest-scoring weights of the whole matrix (layer-wise magnitude pruning)."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each row, remove the ``n`` lowest-scoring of every ``m`` consecutive weights."""
    rows, cols = scores.shape
    if cols % m:
        raise SparseAllocError(f"N:M with M={m} needs the input width ({cols}) to be a multiple of M")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)
