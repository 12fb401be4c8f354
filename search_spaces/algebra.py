"""Feasibility algebra for sparsity profiles: exact projection onto a fixed mean and a box, and level rounding.

Every profile must have a (parameter-weighted) mean equal to the target sparsity and entries in a box
[lo, hi]; ``project`` maps any proposal to the nearest such vector, ``round_to_levels`` snaps one onto a
discrete menu (a 1 % grid, or N:M ratios) while keeping the mean as close to the target as the menu allows.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from core.errors import SparseAllocError

MAX_SPARSITY = 0.99


def _as_weights(num_values: int, weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return np.ones(num_values)
    w = np.asarray(weights, dtype=float)
    if w.shape != (num_values,):
        raise SparseAllocError(f"got {num_values} values but {len(weights)} weights; give one weight per block")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise SparseAllocError("block weights must be finite and positive (e.g. parameter counts)")
    return w


def _as_values(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise SparseAllocError("expected a non-empty flat list of per-block values")
    if not np.all(np.isfinite(v)):
        raise SparseAllocError("per-block values must be finite numbers (found NaN or infinity)")
    return v


def project(
    values: Sequence[float],
    target: float,
    weights: Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = MAX_SPARSITY,
) -> list[float]:
    """Euclidean projection of ``values`` onto {x : weighted_mean(x, weights) = target, lo <= x_i <= hi}.

    The KKT conditions of min ||x - v||^2 s.t. sum w_i x_i = target * sum w_i and the box give
    x_i = clip(v_i - mu * w_i, lo, hi) for one multiplier mu. The constraint sum is piecewise linear and
    non-increasing in mu with kinks at (v_i - hi) / w_i and (v_i - lo) / w_i, so mu is found exactly on the
    segment between the two kinks where it changes sign.
    """
    v = _as_values(values)
    w = _as_weights(v.size, weights)
    if not lo <= hi:
        raise SparseAllocError(f"bounds lo={lo} and hi={hi} are reversed; need lo <= hi")
    if not (math.isfinite(target) and lo <= target <= hi):
        raise SparseAllocError(f"target {target} is infeasible: it must lie within the block bounds [{lo}, {hi}]")
    total = target * w.sum()

    def excess(mu: np.ndarray) -> np.ndarray:
        return (w[:, None] * np.clip(v[:, None] - mu[None, :] * w[:, None], lo, hi)).sum(axis=0) - total

    kinks = np.unique(np.concatenate([(v - hi) / w, (v - lo) / w]))
    at_kinks = excess(kinks)
    nonpositive = np.flatnonzero(at_kinks <= 0)
    k = int(nonpositive[0]) if nonpositive.size else kinks.size - 1
    if k == 0 or at_kinks[k] >= 0:
        mu = kinks[k]
    else:
        left, right = kinks[k - 1], kinks[k]
        mu = left + at_kinks[k - 1] * (right - left) / (at_kinks[k - 1] - at_kinks[k])
    return np.clip(v - mu * w, lo, hi).tolist()


def level_grid(step: float = 0.01, lo: float = 0.0, hi: float = MAX_SPARSITY) -> list[float]:
    """Evenly spaced levels lo, lo + step, ... up to hi (rounded to 10 decimals)."""
    if not step > 0 or not lo <= hi:
        raise SparseAllocError(f"level grid needs step > 0 and lo <= hi (got step={step}, lo={lo}, hi={hi})")
    count = int(math.floor((hi - lo) / step + 1e-9)) + 1
    return [round(lo + k * step, 10) for k in range(count)]


def nm_levels(m: int = 4) -> list[float]:
    """The N:M menu 1/m, 2/m, ..., (m-1)/m."""
    if m < 2:
        raise SparseAllocError(f"N:M group size M={m} is too small; need M >= 2")
    return [n / m for n in range(1, m)]


def round_to_levels(
    values: Sequence[float],
    levels: Sequence[float],
    target: float,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Snap every value onto ``levels`` keeping the weighted mean within one level step of ``target``.

    Starts from nearest-level rounding; then, while the mean is off, moves one entry a level towards the
    target (the one whose rounding error points furthest the wrong way; lowest index on ties), as long as
    that brings the mean closer (by more than 1e-12, so it terminates). The result's mean is then within
    half the largest level gap of ``target`` (plus 1e-12).
    """
    v = _as_values(values)
    w = _as_weights(v.size, weights)
    grid = np.unique(np.asarray(levels, dtype=float))
    if grid.size == 0 or not np.all(np.isfinite(grid)):
        raise SparseAllocError("levels must be a non-empty list of finite numbers")
    if not grid[0] <= target <= grid[-1]:
        raise SparseAllocError(f"target {target} is outside the level range [{grid[0]}, {grid[-1]}]")
    index = np.argmin(np.abs(v[:, None] - grid[None, :]), axis=1)
    total = w.sum()
    while (gap := float(target - (w * grid[index]).sum() / total)) != 0:
        direction = 1 if gap > 0 else -1
        moved = np.clip(index + direction, 0, grid.size - 1)
        shift = w * (grid[moved] - grid[index]) / total
        useful = (moved != index) & (np.abs(gap - shift) < abs(gap) - 1e-12)
        if not np.any(useful):
            break
        error = direction * (v - grid[index])
        best = int(np.argmax(np.where(useful, error, -np.inf)))
        index[best] = moved[best]
    return grid[index].tolist()
