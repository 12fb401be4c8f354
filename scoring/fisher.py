"""Trace of the empirical Fisher information per decoder block (MSP's sensitivity).

trace_l = (1/N) Σ_n ‖∇_{θ_l} log-likelihood_n‖² / |θ_l|: the mean over calibration samples of
the squared gradient of a sample's mean token log-likelihood w.r.t. block l's linear weights,
normalised by their count.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning.load import find_blocks, find_linears


def empirical_fisher_trace(loss_fn: Callable[[object], torch.Tensor], samples: Iterable,
                           groups: Sequence[Sequence[torch.Tensor]], progress: bool = False) -> list[float]:
    """Per parameter group: mean over samples of Σ (∂loss/∂θ)², divided by the group's size."""
    params = [p for group in groups for p in group]
    sums = [0.0 for _ in groups]
    count = 0
    for sample in tqdm(list(samples), desc="fisher trace", unit="sample", disable=not progress):
        grads = torch.autograd.grad(loss_fn(sample), params, allow_unused=True)
        offset = 0
        for index, group in enumerate(groups):
            group_grads = grads[offset : offset + len(group)]
            sums[index] += sum(float(g.float().pow(2).sum()) for g in group_grads if g is not None)
            offset += len(group)
        count += 1
    return [total / count / sum(p.numel() for p in group) for total, group in zip(sums, groups)]


def block_fisher_traces(model, windows: torch.Tensor, device: torch.device, progress: bool = True) -> list[float]:
    """Fisher trace per decoder block over the calibration ``windows`` (one sample per window)."""
    groups = [[layer.weight for layer in find_linears(block).values()] for block in find_blocks(model)]
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for group in groups:
        for p in group:
            p.requires_grad_(True)

    def nll(window: torch.Tensor) -> torch.Tensor:
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    try:
        return empirical_fisher_trace(nll, windows, groups, progress)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
