"""Units of allocation: what one entry of a profile covers in a model.

A model's prunable linears, block by block (:class:`UnitLayout`, built from the model by
``pruning.load.unit_layout``), are grouped into units at one of three granularities:

- ``block``: every linear of a decoder block (the papers' unit; a profile has one entry per block);
- ``group``: attention and MLP within each block (two entries per block; a linear belongs to attention
  when a part of its name mentions ``attn`` or ``attention``, to the MLP otherwise);
- ``linear``: every prunable linear on its own (EvoPress's unit).

Units are listed block by block, in the order the block's linears are found. A unit's weight is its
parameter count, so a profile's parameter-weighted mean is the model's sparsity at any granularity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from core.errors import SparseAllocError

GRANULARITIES = ("block", "group", "linear")
NM = tuple[int, int]
Level = tuple[float, NM | None]


def check_granularity(granularity: str) -> str:
    """``granularity`` itself, or an error naming the choices."""
    if granularity not in GRANULARITIES:
        raise SparseAllocError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    return granularity


def group_of(name: str) -> str:
    """``attention`` or ``mlp``: the group of a linear named ``name`` inside its block."""
    parts = name.lower().replace("_", ".").split(".")
    return "attention" if any(p in ("attn", "attention") or p.endswith("attn") for p in parts) else "mlp"


@dataclass(frozen=True)
class Unit:
    """One profile entry: block ``block``'s linears ``names`` (by their names inside the block)."""

    block: int
    names: tuple[str, ...]
    weight: int
    label: str


@dataclass(frozen=True)
class UnitLayout:
    """Per block, its prunable linears as (name inside the block, weight count), in the model's order."""

    linears: tuple[tuple[tuple[str, int], ...], ...]

    @classmethod
    def of(cls, linears) -> "UnitLayout":
        """From nested sequences (e.g. JSON lists) of (name, count) per block."""
        return cls(tuple(tuple((str(name), int(count)) for name, count in block) for block in linears))

    @property
    def num_blocks(self) -> int:
        return len(self.linears)

    @cached_property
    def _units(self) -> dict[str, tuple[Unit, ...]]:
        out: dict[str, list[Unit]] = {g: [] for g in GRANULARITIES}
        for index, block in enumerate(self.linears):
            out["block"].append(Unit(index, tuple(n for n, _ in block), sum(c for _, c in block), f"{index}"))
            groups: dict[str, list[tuple[str, int]]] = {}
            for name, count in block:
                groups.setdefault(group_of(name), []).append((name, count))
            for group, members in groups.items():
                out["group"].append(Unit(index, tuple(n for n, _ in members), sum(c for _, c in members),
                                         f"{index}.{group}"))
            for name, count in block:
                out["linear"].append(Unit(index, (name,), count, f"{index}.{name}"))
        return {g: tuple(units) for g, units in out.items()}

    def units(self, granularity: str) -> tuple[Unit, ...]:
        """The units of ``granularity``, block by block."""
        return self._units[check_granularity(granularity)]

    def count(self, granularity: str) -> int:
        return len(self.units(granularity))

    def weights(self, granularity: str) -> list[int]:
        """Each unit's parameter count (the weights of a profile's mean)."""
        return [unit.weight for unit in self.units(granularity)]

    def block_of(self, granularity: str) -> list[int]:
        """Each unit's block index."""
        return [unit.block for unit in self.units(granularity)]

    def per_linear(self, sparsities, patterns, granularity: str) -> list[dict[str, Level]]:
        """Per block, per linear name: the (sparsity, N:M or None) the unit holding it is given."""
        units = self.units(granularity)
        if len(sparsities) != len(units):
            raise SparseAllocError(f"a {granularity} profile of this model has {len(units)} entries, not "
                                   f"{len(sparsities)}; give one per {granularity}")
        out: list[dict[str, Level]] = [{} for _ in self.linears]
        for index, unit in enumerate(units):
            level = (float(sparsities[index]), None if patterns is None else patterns[index])
            for name in unit.names:
                out[unit.block][name] = level
        return out

    def groups(self, granularity: str) -> list[str | None]:
        """Each unit's group (``attention`` or ``mlp``); None for a block, which holds both."""
        if granularity == "block":
            return [None] * self.num_blocks
        return [group_of(unit.names[0]) for unit in self.units(granularity)]

    def parents(self, granularity: str, coarser: str) -> list[int]:
        """For each unit of ``granularity``, the index of the ``coarser`` unit that holds it."""
        if GRANULARITIES.index(check_granularity(coarser)) > GRANULARITIES.index(check_granularity(granularity)):
            raise SparseAllocError(f"a {coarser} is not coarser than a {granularity}")
        owner = {(unit.block, name): index for index, unit in enumerate(self.units(coarser)) for name in unit.names}
        return [owner[(unit.block, unit.names[0])] for unit in self.units(granularity)]

    def lift(self, values, granularity: str, coarser: str = "block") -> list:
        """Per-``coarser``-unit ``values`` repeated for each unit of ``granularity`` it holds."""
        if len(values) != self.count(coarser):
            raise SparseAllocError(f"got {len(values)} per-{coarser} values for a model of {self.count(coarser)} "
                                   f"{coarser} units")
        return [values[parent] for parent in self.parents(granularity, coarser)]

    def block_means(self, sparsities, granularity: str) -> list[float]:
        """Each block's parameter-weighted mean of a ``granularity`` profile's entries."""
        totals, counts = [0.0] * self.num_blocks, [0] * self.num_blocks
        for value, unit in zip(sparsities, self.units(granularity)):
            totals[unit.block] += value * unit.weight
            counts[unit.block] += unit.weight
        return [t / c for t, c in zip(totals, counts)]

    def to_json(self) -> list:
        return [[[name, count] for name, count in block] for block in self.linears]
