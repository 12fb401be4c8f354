"""OWL's per-block outlier ratio: the share of Wanda scores in a block above M × their mean."""

from __future__ import annotations

import torch

from pruning.score_table import LinearScores


def outlier_ratios(tables: list[dict[str, LinearScores]], multiplier: float = 5.0) -> list[float]:
    """D_l for each block, from its linears' Wanda scores pooled together (OWL, Yin et al. 2024)."""
    ratios = []
    for table in tables:
        scores = torch.cat([entry.scores.flatten() for entry in table.values()])
        ratios.append(float((scores > multiplier * scores.mean()).float().mean()))
    return ratios
