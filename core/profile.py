"""Profile: one sparsity per unit (a decoder block by default; attention/MLP groups or single linears at a
finer ``granularity``, see :mod:`core.units`), optionally an N:M pattern per unit.

N:M follows Wanda/SparseGPT: in every group of M consecutive input weights of a row, the N
least important are zeroed, so the block's sparsity is N/M (2:4 and 4:8 are both 50 %).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from core.errors import SparseAllocError
from core.units import Level, UnitLayout, check_granularity

MEAN_TOLERANCE = 1e-6
NM = tuple[int, int]


def parse_nm(text: str) -> NM:
    """``"2:4"`` → ``(2, 4)``; requires 1 ≤ N < M."""
    try:
        n_str, m_str = text.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError as exc:
        raise SparseAllocError(f"N:M pattern {text!r} is not of the form N:M, e.g. 2:4") from exc
    check_nm((n, m))
    return n, m


def check_nm(nm: NM) -> None:
    n, m = nm
    if not 1 <= n < m:
        raise SparseAllocError(f"N:M pattern {n}:{m} is invalid: need 1 <= N < M (N zeros in every M weights)")


def weighted_mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Mean of ``values`` weighted by ``weights`` (plain mean when None)."""
    if weights is None:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


@dataclass(frozen=True)
class Profile:
    """Per-unit sparsities in [0, 1); ``nm[u]`` is unit u's N:M pattern or None (unstructured). A unit is a
    block, an attention/MLP group or a linear (``granularity``), in :class:`core.units.UnitLayout` order."""

    sparsities: tuple[float, ...]
    nm: tuple[NM | None, ...] | None = None
    granularity: str = "block"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        check_granularity(self.granularity)
        if not self.sparsities:
            raise SparseAllocError("a profile needs at least one block")
        for index, value in enumerate(self.sparsities):
            if not (0.0 <= value < 1.0) or math.isnan(value):
                raise SparseAllocError(f"{self.granularity} {index} has sparsity {value}; every ratio must lie in "
                                       "[0, 1)")
        if self.nm is not None:
            nm = tuple(None if p is None else (int(p[0]), int(p[1])) for p in self.nm)
            object.__setattr__(self, "nm", nm)
            if len(nm) != len(self.sparsities):
                raise SparseAllocError(
                    f"profile has {len(self.sparsities)} sparsities but {len(nm)} N:M entries; give one per "
                    f"{self.granularity}"
                )
            for index, pattern in enumerate(nm):
                if pattern is None:
                    continue
                check_nm(pattern)
                if abs(pattern[0] / pattern[1] - self.sparsities[index]) > MEAN_TOLERANCE:
                    raise SparseAllocError(
                        f"{self.granularity} {index}: N:M {pattern[0]}:{pattern[1]} means sparsity "
                        f"{pattern[0] / pattern[1]}, but the profile says {self.sparsities[index]}"
                    )

    def __len__(self) -> int:
        return len(self.sparsities)

    @classmethod
    def uniform(cls, num_blocks: int, sparsity: float) -> "Profile":
        return cls((sparsity,) * num_blocks)

    @classmethod
    def uniform_nm(cls, num_blocks: int, nm: NM) -> "Profile":
        check_nm(nm)
        return cls((nm[0] / nm[1],) * num_blocks, (nm,) * num_blocks)

    def pattern(self, block: int) -> NM | None:
        return None if self.nm is None else self.nm[block]

    def mean(self, weights: Sequence[float] | None = None) -> float:
        return weighted_mean(self.sparsities, weights)

    def check_layout(self, layout: UnitLayout, target: float | None = None) -> None:
        """Raise unless the profile has one entry per unit of its granularity in ``layout`` and (if given)
        its parameter-weighted mean is ``target``."""
        units = layout.count(self.granularity)
        if len(self) != units:
            held = f"{units} decoder blocks" if self.granularity == "block" else \
                f"{units} units at granularity {self.granularity}"
            raise SparseAllocError(f"profile has {len(self)} entries but the model has {held}; "
                                   f"give one per {self.granularity}")
        mean = self.mean(layout.weights(self.granularity))
        if target is not None and abs(mean - target) > MEAN_TOLERANCE:
            raise SparseAllocError(f"profile's parameter-weighted mean sparsity is {mean:.6f}, not the target "
                                   f"{target}; rescale it or change --sparsity")

    def levels(self, layout: UnitLayout) -> list[dict[str, Level]]:
        """Per block, per linear name: its (sparsity, N:M or None)."""
        return layout.per_linear(self.sparsities, self.nm, self.granularity)

    def at(self, layout: UnitLayout, granularity: str) -> "Profile":
        """This profile at ``granularity``: itself when it is already there; at a finer granularity each unit
        gets the level of the unit holding it (same levels per linear, same mean)."""
        if granularity == self.granularity:
            return self
        sparsities = layout.lift(list(self.sparsities), granularity, self.granularity)
        nm = None if self.nm is None else tuple(layout.lift(list(self.nm), granularity, self.granularity))
        return Profile(tuple(sparsities), nm, granularity)

    def layer_sparsities(self, layout: UnitLayout, prefix: str) -> dict[str, float]:
        """llm-compressor-style per-layer list: ``{prefix}.{block}.{linear name}`` → sparsity."""
        return {f"{prefix}.{block}.{name}": level[0]
                for block, linears in enumerate(self.levels(layout)) for name, level in linears.items()}

    def to_json(self) -> dict:
        out: dict = {"sparsities": list(self.sparsities)}
        if self.nm is not None:
            out["nm"] = [None if p is None else f"{p[0]}:{p[1]}" for p in self.nm]
        if self.granularity != "block":
            out["granularity"] = self.granularity
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        if not isinstance(data, dict) or "sparsities" not in data:
            raise SparseAllocError("a profile JSON needs a 'sparsities' list (one ratio per block, or per unit "
                                   "with 'granularity')")
        nm = data.get("nm")
        patterns = None if nm is None else tuple(None if p is None else parse_nm(str(p)) for p in nm)
        return cls(tuple(data["sparsities"]), patterns, str(data.get("granularity", "block")))


def read_profile(path: str | Path) -> tuple[Profile, float | None]:
    """A profile and its recorded target (if any) from a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SparseAllocError(f"profile file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise SparseAllocError(f"profile file {path} is not valid JSON: {exc}") from exc
    return Profile.from_json(data), data.get("target")


def write_profile(path: str | Path, profile: Profile, target: float | None = None, layout: UnitLayout | None = None,
                  **extra) -> None:
    """``profile`` as JSON with its target and ``extra`` fields; with ``layout``, a finer profile also records
    each block's parameter-weighted mean (``block_means``, what per-block plots show)."""
    data = {**profile.to_json(), "target": target, **extra}
    if layout is not None and profile.granularity != "block":
        data["block_means"] = layout.block_means(profile.sparsities, profile.granularity)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
