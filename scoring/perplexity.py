"""Perplexity with the standard protocol: non-overlapping windows, mean token NLL, exp.

With ``offload`` the blocks stay on the host: every window's hidden states advance one block at a
time (each block moved to the device only while it runs), then the model's own forward — with its
blocks replaced by pass-throughs and block 0 by the final hidden states — applies the final norm,
LM head and whatever else the architecture does there (Gemma's logit softcapping, OPT's final layer
norm and ``project_out``), so both paths compute the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pruning.capture import capture_block_inputs, head_logits, run_block
from pruning.load import find_blocks
from pruning.offload import move_non_blocks, onloaded


def _nll_rows(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Each window's summed next-token NLL (its first token is context only)."""
    logits = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).sum(dim=1, dtype=torch.float64).tolist()


@torch.no_grad()
def _final_hidden_offloaded(model, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device,
                            batch_size: int, progress: bool, desc: str) -> list[torch.Tensor]:
    """The last block's outputs per mini-batch of ``windows``, blocks onloaded one at a time."""
    move_non_blocks(model, device)
    captured = capture_block_inputs(model, blocks, windows, batch_size, device)
    hidden = captured.hidden
    for index in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        with onloaded(blocks[index], device) as block:
            hidden = run_block(block, hidden, captured.calls[index])
        captured.calls[index] = []  # this block's masks and rotary tables are no longer needed
    return hidden


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, device: torch.device, batch_size: int = 4,
                progress: bool = True, desc: str = "perplexity", offload: bool = False) -> list[float]:
    """Each window's mean next-token NLL (nats), for ``windows`` [n, seqlen].

    Each window is scored on its own (no context carried across windows); its first token is
    context only, so a window of T tokens contributes T − 1 predictions.

    ``offload``: the blocks stay where they are (the host) and run one at a time on ``device``; the
    non-block parts are moved to ``device`` (and stay there). Without it the whole model must already
    be on ``device``.
    """
    sums: list[float] = []
    starts = range(0, windows.shape[0], batch_size)
    if not offload:
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            sums += _nll_rows(model(input_ids=batch, use_cache=False).logits, batch)
    else:
        blocks = find_blocks(model)
        final = _final_hidden_offloaded(model, blocks, windows, device, batch_size, progress, desc)
        for start, hidden in zip(starts, final):
            batch = windows[start : start + batch_size].to(device)
            sums += _nll_rows(head_logits(model, blocks, hidden, batch), batch)
    return [total / (windows.shape[1] - 1) for total in sums]


def mean_nll(model, windows: torch.Tensor, device: torch.device, batch_size: int = 4,
             progress: bool = True, desc: str = "perplexity", offload: bool = False) -> tuple[float, int]:
    """Mean next-token NLL (nats) over every predicted token of ``windows`` [n, seqlen], and the count
    (see :func:`window_nlls`; every window predicts the same number of tokens)."""
    nlls = window_nlls(model, windows, device, batch_size, progress, desc, offload)
    return sum(nlls) / len(nlls), windows.shape[0] * (windows.shape[1] - 1)


def paired_gap(chosen: list[float], other: list[float]) -> tuple[float, float]:
    """How much lower ``chosen``'s mean NLL is than ``other``'s on the same windows, and the standard error of
    that difference (of the per-window differences' mean; 0 with one window). The perplexity ratio of the
    two is exp(gap); a gap within about two standard errors could go either way on other windows."""
    if len(chosen) != len(other) or not chosen:
        raise ValueError("paired_gap needs two equally long, non-empty lists of per-window NLLs")
    diffs = [b - a for a, b in zip(chosen, other)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def perplexity(model, windows: torch.Tensor, device: torch.device, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity", offload: bool = False) -> float:
    """exp(mean token NLL) over ``windows`` (``offload``: see :func:`mean_nll`)."""
    nll, _ = mean_nll(model, windows, device, batch_size, progress, desc, offload)
    return math.exp(nll)
