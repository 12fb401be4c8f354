"""Perplexity with the standard protocol: non-overlapping windows, mean token NLL, exp."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor, device: torch.device, batch_size: int = 4,
             progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Mean next-token NLL (nats) over every predicted token of ``windows`` [n, seqlen], and the count.

    Each window is scored on its own (no context carried across windows); its first token is
    context only, so a window of T tokens contributes T − 1 predictions.
    """
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count, count


def perplexity(model, windows: torch.Tensor, device: torch.device, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean token NLL) over ``windows``."""
    nll, _ = mean_nll(model, windows, device, batch_size, progress, desc)
    return math.exp(nll)
