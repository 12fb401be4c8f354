"""The three pruners behind one interface: per linear layer, optional input statistics, then prune.

- magnitude: |W|, compared across the whole matrix (or within N:M groups).
- Wanda: |W| · ‖X_j‖₂, compared within each output row (Sun et al., 2023).
- SparseGPT: OBS with the layer Hessian H = 2XXᵀ, dampening, lazy column-block updates
  (Frantar & Alistarh, 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.errors import SparseAllocError
from pruning.masks import layer_mask, nm_mask, prune_count, row_mask

NM = tuple[int, int] | None


class InputNorms:
    """Running mean over tokens of x_j² per input feature (Wanda's ‖X_j‖₂² / tokens)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.sq_mean = torch.zeros(columns, device=device, dtype=torch.float32)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        self.sq_mean.mul_(self.tokens / (self.tokens + n)).add_(x.pow(2).sum(0) / (self.tokens + n))
        self.tokens += n


class Hessian:
    """Running H = 2/N Σ x xᵀ over the N tokens seen (SparseGPT's layer Hessian)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.matrix = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        self.matrix.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.matrix.addmm_(x.t(), x)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: NM = None) -> torch.Tensor:
    scores = weight.abs().float()
    return nm_mask(scores, *nm) if nm else layer_mask(scores, sparsity)


def wanda_scores(weight: torch.Tensor, norms: InputNorms) -> torch.Tensor:
    """Wanda's importance |W_ij| · ‖X_j‖₂ (up to the per-layer constant √tokens), as float32."""
    return weight.abs().float() * norms.sq_mean.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, norms: InputNorms, sparsity: float, nm: NM = None) -> torch.Tensor:
    scores = wanda_scores(weight, norms)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: NM = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """The pruned weight (same dtype) after OBS reconstruction; ``hessian`` is not modified.

    Unstructured masks are chosen per column block of ``blocksize`` (exactly the requested share
    of that block), N:M masks per group of M columns, both by w² / [H⁻¹]_jj².
    """
    rows, columns = weight.shape
    if nm and columns % nm[1]:
        raise SparseAllocError(f"N:M with M={nm[1]} needs the input width ({columns}) to be a multiple of M")
    if nm and blocksize % nm[1]:
        raise SparseAllocError(f"SparseGPT block size {blocksize} must be a multiple of M={nm[1]}")
    W = weight.detach().clone().float()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d_inv = torch.diag(Hinv1)
        if nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            scores = W1.pow(2) / d_inv.unsqueeze(0).pow(2)
            mask1 = torch.zeros(scores.numel(), dtype=torch.bool, device=W.device)
            k = prune_count(scores.numel(), sparsity)
            if k:
                mask1[torch.topk(scores.flatten(), k, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:
                group = W1[:, i : i + nm[1]].pow(2) / d_inv[i : i + nm[1]].unsqueeze(0).pow(2)
                mask1.scatter_(1, i + torch.topk(group, nm[0], dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


@dataclass(frozen=True)
class Pruner:
    """How one method prunes a linear layer given its (optional) input statistics, and what its pass
    costs: ``pass_cost`` forward-pass equivalents per calibration token (observing and solving),
    ``stats_bytes(columns)`` device bytes of one linear's input statistics, and ``level_source``, the
    evaluator's level source that reproduces this pruner's weights best (``--level-source auto``)."""

    name: str
    new_stats: Callable[[nn.Linear], object] | None
    prune: Callable[[nn.Linear, object, float, NM], None]
    pass_cost: float
    stats_bytes: Callable[[int], int]
    level_source: str = "wanda"

    @property
    def needs_inputs(self) -> bool:
        return self.new_stats is not None


def _apply_mask(layer: nn.Linear, mask: torch.Tensor) -> None:
    layer.weight.data[mask] = 0


def _prune_magnitude(layer: nn.Linear, _stats, sparsity: float, nm: NM) -> None:
    _apply_mask(layer, magnitude_mask(layer.weight.data, sparsity, nm))


def _prune_wanda(layer: nn.Linear, stats: InputNorms, sparsity: float, nm: NM) -> None:
    _apply_mask(layer, wanda_mask(layer.weight.data, stats, sparsity, nm))


def _prune_sparsegpt(layer: nn.Linear, stats: Hessian, sparsity: float, nm: NM) -> None:
    layer.weight.data = sparsegpt_prune(layer.weight.data, stats.matrix, sparsity, nm)


def _input_stats(kind: type) -> Callable[[nn.Linear], object]:
    return lambda layer: kind(layer.in_features, layer.weight.device)


PRUNERS: dict[str, Pruner] = {
    "magnitude": Pruner("magnitude", None, _prune_magnitude, pass_cost=0.2, stats_bytes=lambda columns: 0),
    "wanda": Pruner("wanda", _input_stats(InputNorms), _prune_wanda, pass_cost=1.5,
                    stats_bytes=lambda columns: 4 * columns),  # fp32 squared norms
    "sparsegpt": Pruner("sparsegpt", _input_stats(Hessian), _prune_sparsegpt, pass_cost=6.0,
                        stats_bytes=lambda columns: 4 * columns * columns,  # the fp32 Hessian
                        level_source="sparsegpt-db"),
}


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise SparseAllocError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")
    return PRUNERS[name]
