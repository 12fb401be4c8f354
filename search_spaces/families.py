"""Profile families: hyper-parameters -> ``Profile``, each with a framework-free search space.

A search space is a dict name -> ("uniform" | "loguniform" | "int", low, high); the orchestrator turns it
into its tuner's own distributions, so this module imports neither ray nor optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from core.errors import SparseAllocError
from search_spaces.algebra import MAX_SPARSITY, nm_levels, project, round_to_levels
from core.profile import Profile

Space = dict[str, tuple[str, float, float]]


def _check_target(target: float) -> None:
    if not (math.isfinite(target) and 0.0 <= target < 1.0):
        raise SparseAllocError(f"target sparsity {target} must lie in [0, 1)")


def _check_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise SparseAllocError(f"a profile needs at least one block (got num_blocks={num_blocks})")


def uniform(num_blocks: int, target: float) -> Profile:
    """Every block at ``target``."""
    _check_blocks(num_blocks)
    _check_target(target)
    return Profile.uniform(num_blocks, target)


def atp_beta_max(num_blocks: int, target: float) -> float:
    """Largest ATP slope: min(2S, 2(1 - S)) / (L - 1), with 1 - S capped to 0.99 - S so no block exceeds 0.99.

    At this slope the first block sits at max(0, 2S - 0.99) and the last at min(2S, 0.99); 0 for one block.
    """
    _check_blocks(num_blocks)
    _check_target(target)
    if num_blocks == 1:
        return 0.0
    return max(0.0, min(2 * target, 2 * (MAX_SPARSITY - target))) / (num_blocks - 1)


def atp(num_blocks: int, target: float, beta: float) -> Profile:
    """ATP: s_l = target + beta * (l - (L - 1) / 2), sparsity rising linearly with depth (beta = 0: uniform)."""
    beta_max = atp_beta_max(num_blocks, target)
    if not (0.0 <= beta <= beta_max + 1e-12):
        raise SparseAllocError(
            f"ATP slope beta={beta} is out of range; for {num_blocks} blocks at target {target} it must lie in "
            f"[0, {beta_max}]"
        )
    centre, top = (num_blocks - 1) / 2, max(MAX_SPARSITY, target)
    return Profile(tuple(min(max(target + beta * (l - centre), 0.0), top) for l in range(num_blocks)))


def atp_space(num_blocks: int, target: float) -> Space:
    """ATP's one hyper-parameter: the slope beta in [0, beta_max]."""
    return {"beta": ("uniform", 0.0, atp_beta_max(num_blocks, target))}


def owl(outlier_ratios: Sequence[float], target: float, lam: float = 0.08) -> Profile:
    """OWL (Yin et al. 2024): blocks with more outliers get less sparsity.

    The outlier ratios D are rescaled to r in [0, 2 * lam], and s_l = target - (r_l - mean(r)): the mean is
    target and max(s) - min(s) = 2 * lam (so every s_l lies in [target - 2 lam, target + 2 lam]). All-equal D
    gives the uniform profile. Should an entry leave [0, 0.99], the vector is projected back (mean kept).
    """
    _check_target(target)
    if not lam >= 0:
        raise SparseAllocError(f"OWL lambda={lam} must be >= 0")
    d = np.asarray(outlier_ratios, dtype=float)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise SparseAllocError("OWL needs one finite outlier ratio per block")
    spread = float(d.max() - d.min())
    if spread == 0:
        return Profile.uniform(d.size, target)
    r = (d - d.min()) / spread * 2 * lam
    sparsities = (target - (r - r.mean())).tolist()
    if min(sparsities) < 0 or max(sparsities) > MAX_SPARSITY:
        sparsities = project(sparsities, target)
    return Profile(tuple(sparsities))


def owl_space(multipliers: Sequence[int]) -> Space:
    """OWL's hyper-parameters: lam (half the sparsity spread) and M, the outlier threshold multiplier, an
    integer among ``multipliers`` (those whose outlier ratios were counted)."""
    return {"lam": ("uniform", 0.0, 0.2), "M": ("int", min(multipliers), max(multipliers))}


def sensitivity_map(
    sensitivities: Sequence[float],
    target: float,
    strength: float,
    weights: Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = MAX_SPARSITY,
) -> Profile:
    """More sensitive blocks get less sparsity (Shapley values, Fisher traces, ...).

    With z the standardized sensitivities, s_l = target - strength * z_l * min(target, 1 - target) / 2,
    then projected onto weighted mean = target and [lo, hi]. strength = 0 (or constant sensitivities)
    gives the uniform profile.
    """
    _check_target(target)
    if not strength >= 0:
        raise SparseAllocError(f"sensitivity strength={strength} must be >= 0")
    x = np.asarray(sensitivities, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise SparseAllocError("sensitivity map needs one finite sensitivity per block")
    scaled = x / max(float(np.abs(x).max()), np.finfo(float).tiny)  # avoids under/overflow in std
    std = scaled.std()
    z = np.zeros_like(x) if std == 0 else (scaled - scaled.mean()) / std
    raw = target - strength * z * min(target, 1 - target) / 2
    return Profile(tuple(project(raw.tolist(), target, weights, lo, hi)))


def sensitivity_space() -> Space:
    """The sensitivity map's one hyper-parameter: its strength."""
    return {"strength": ("uniform", 0.0, 3.0)}


def free_vector(
    values: Sequence[float],
    target: float,
    weights: Sequence[float] | None = None,
    lo: float = 0.0,
    hi: float = MAX_SPARSITY,
    granularity: str = "block",
) -> Profile:
    """The feasible profile nearest to an arbitrary proposed per-unit vector (a block, group or linear per
    entry: ``granularity``)."""
    _check_target(target)
    return Profile(tuple(project(values, target, weights, lo, hi)), granularity=granularity)


def group_shift(profile: Profile, groups: Sequence[str | None], blocks: Sequence[int], weights: Sequence[float],
                target: float, shift: float) -> Profile:
    """``profile`` (per group or per linear) with attention ``shift`` sparser than the MLP in every block
    (negative: the MLP sparser), each block's weighted mean kept: attention units move by
    ``shift`` × the MLP's share of the block, MLP units by −``shift`` × attention's. Should an entry leave
    [0, 0.99], the vector is projected back (mean ``target`` kept)."""
    _check_target(target)
    if len(groups) != len(profile) or len(blocks) != len(profile) or len(weights) != len(profile):
        raise SparseAllocError("group_shift needs one group, block and weight per unit of the profile")
    attention: dict[int, float] = {}
    total: dict[int, float] = {}
    for group, block, weight in zip(groups, blocks, weights):
        total[block] = total.get(block, 0.0) + weight
        attention[block] = attention.get(block, 0.0) + (weight if group == "attention" else 0.0)
    values = []
    for value, group, block in zip(profile.sparsities, groups, blocks):
        share = attention[block] / total[block]
        if 0 < share < 1:
            value += shift * (1 - share) if group == "attention" else -shift * share
        values.append(value)
    if min(values) < 0 or max(values) > MAX_SPARSITY:
        values = project(values, target, weights)
    return Profile(tuple(values), granularity=profile.granularity)


def free_keys(num_blocks: int) -> list[str]:
    """Flat per-block parameter names "s_00", "s_01", ... in block order."""
    _check_blocks(num_blocks)
    width = max(2, len(str(num_blocks - 1)))
    return [f"s_{l:0{width}d}" for l in range(num_blocks)]


def free_space(num_blocks: int, lo: float = 0.0, hi: float = MAX_SPARSITY) -> Space:
    """One uniform [lo, hi] parameter per block, keyed by ``free_keys``."""
    return {key: ("uniform", lo, hi) for key in free_keys(num_blocks)}


def nm_profile(values: Sequence[float], target: float, m: int = 4, weights: Sequence[float] | None = None) -> Profile:
    """Mixed N:M: each block snapped onto {0, 1/m, ..., (m-1)/m} with pattern (n, m), or dense (None) at 0.

    The weighted mean ends within one level (1/m) of ``target``, not exactly on it.
    """
    _check_target(target)
    sparsities = round_to_levels(values, [0.0, *nm_levels(m)], target, weights)
    patterns = tuple(None if s == 0 else (round(s * m), m) for s in sparsities)
    return Profile(tuple(sparsities), patterns)


@dataclass(frozen=True)
class FamilyInputs:
    """What a family may build from: the block count, the target, per-block values (sensitivities or
    a free vector, when the family needs them) and its hyper-parameters."""

    num_blocks: int
    target: float
    values: Sequence[float] | None = None
    beta: float | None = None
    lam: float = 0.08
    strength: float = 1.0


@dataclass(frozen=True)
class Family:
    """A registered family: its builder (inputs -> profile and the parameters used), what per-block
    values it needs (None, a sensitivity method's name, or "values" for a free vector) and its help."""

    build: Callable[[FamilyInputs], tuple[Profile, dict]]
    needs: str | None
    help: str


def _atp_family(inputs: FamilyInputs) -> tuple[Profile, dict]:
    beta = inputs.beta if inputs.beta is not None else atp_beta_max(inputs.num_blocks, inputs.target) / 2
    return atp(inputs.num_blocks, inputs.target, beta), {"beta": beta}


FAMILIES: dict[str, Family] = {
    "uniform": Family(lambda i: (uniform(i.num_blocks, i.target), {}), None, "the same sparsity in every block"),
    "atp": Family(_atp_family, None, "arithmetic progression with depth (--beta)"),
    "owl": Family(lambda i: (owl(i.values, i.target, i.lam), {"lam": i.lam}), "owl", "OWL outlier ratios (--lam)"),
    "shapley": Family(lambda i: (sensitivity_map(i.values, i.target, i.strength), {"strength": i.strength}),
                      "shapley", "Shapley values: more important blocks less sparse (--strength)"),
    "fisher": Family(lambda i: (sensitivity_map(i.values, i.target, i.strength), {"strength": i.strength}),
                     "fisher", "Fisher traces: more sensitive blocks less sparse (--strength)"),
    "free": Family(lambda i: (free_vector(i.values, i.target), {}), "values",
                   "any per-block vector (--values), projected onto the mean"),
}
