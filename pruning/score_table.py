"""Score tables: per linear, the order in which its weights are removed, so any sparsity
becomes a mask without recomputation (built once, from dense calibration inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pruning.capture import capture_block_inputs, run_block_observing
from pruning.errors import SparseAllocError
from pruning.load import find_blocks, find_linears
from pruning.masks import nm_mask, prune_count
from pruning.pruners import InputNorms

SCORE_KINDS = ("wanda", "magnitude")


@dataclass
class LinearScores:
    """Importance scores of one weight matrix and each weight's rank within its row (0 = lowest)."""

    scores: torch.Tensor  # [rows, cols], float
    rank: torch.Tensor  # [rows, cols], int16/int32: position in the row's stable ascending-score order

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> "LinearScores":
        index_dtype = torch.int16 if scores.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
        order = torch.argsort(scores, dim=1, stable=True)
        positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        return cls(scores, rank.to(index_dtype))

    def mask(self, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
        """Weights to remove at this sparsity (per-row comparison, Wanda's group), or by N:M."""
        if nm:
            return nm_mask(self.scores, *nm)
        return self.rank < prune_count(self.scores.shape[1], sparsity)

    def pruned(self, weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` with :meth:`mask`'s weights zeroed, written into ``out`` when given (one pass,
        no copy of the dense weight is modified)."""
        keep = ~nm_mask(self.scores, *nm) if nm else self.rank >= prune_count(self.scores.shape[1], sparsity)
        return torch.mul(weight, keep, out=out)


@torch.no_grad()
def build_score_tables(model, calibration: torch.Tensor, device: torch.device, kind: str = "wanda",
                       batch_size: int = 4, progress: bool = True) -> list[dict[str, LinearScores]]:
    """Per block, per linear: scores |W|·‖X_j‖₂ (wanda, dense inputs) or |W| (magnitude)."""
    if kind not in SCORE_KINDS:
        raise SparseAllocError(f"unknown score kind {kind!r}; choose one of {', '.join(SCORE_KINDS)}")
    blocks = find_blocks(model)
    captured = capture_block_inputs(model, blocks, calibration, batch_size, device) if kind == "wanda" else None
    hidden = captured.hidden if captured else None
    tables = []
    for index in tqdm(range(len(blocks)), desc=f"{kind} score tables", unit="block", disable=not progress):
        linears = find_linears(blocks[index])
        if captured is not None:
            norms, hidden = run_block_observing(blocks[index], linears,
                                                lambda l: InputNorms(l.in_features, l.weight.device),
                                                hidden, captured.calls[index])
        table = {}
        for name, layer in linears.items():
            scores = layer.weight.detach().abs().float()
            if captured is not None:
                scores = scores * norms[name].sq_mean.sqrt().unsqueeze(0)
            table[name] = LinearScores.from_scores(scores)
        tables.append(table)
    return tables
