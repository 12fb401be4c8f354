"""Level sources, registered once: what gives the evaluator a block's linears at a level.

- ``wanda``: rank tables from Wanda scores, built by every evaluator from the calibration windows
  (masks just in time; the kl-seq fitness rebuilds them per profile from its sequential activations);
- ``sparsegpt-db``: the SparseGPT level database (:mod:`scoring.level_db`), built once per model,
  calibration windows, dtype and grid in ``$SPARSEALLOC_CACHE/level-db/<key>/`` and memory-mapped
  by every evaluator, so that ``--pruner sparsegpt`` is searched with SparseGPT's own weights.

``auto`` is the pruner's own level source (:attr:`pruning.pruners.Pruner.level_source`) when it holds
the levels asked for (N:M or not), else the rank tables. A level source kind says what it supports,
how it is prepared before the evaluators start (``prepare``: built once, its path handed to them) and
how an evaluator opens it (``open``); the evaluator then only asks it for a level's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from core.errors import SparseAllocError
from scoring.level_db import LevelDatabase, database_levels, ensure_database
from scoring.levels import Level


class LevelSource(Protocol):
    """What an evaluator asks of its level source."""

    supports_nm: bool  # holds N:M patterns as well as unstructured levels
    sequential: bool  # the kl-seq fitness (rank tables refreshed per profile) applies

    def snap(self, sparsity: float) -> float:
        """The level a block asked for ``sparsity`` is scored at."""

    def weight(self, block: int, name: str, level: Level, dense: torch.Tensor, table, out: torch.Tensor) -> torch.Tensor:
        """Linear ``name`` of block ``block`` at ``level``, written into ``out`` (``dense``: its dense
        weight, ``table``: its rank table)."""


class RankTableLevels:
    """Wanda rank tables: any sparsity and any N:M pattern, masked just in time (the tables are the
    evaluator's own; nothing to prepare)."""

    supports_nm = True
    sequential = True

    def __init__(self, artifact: str | None = None) -> None:
        del artifact

    def snap(self, sparsity: float) -> float:
        return sparsity

    def weight(self, block: int, name: str, level: Level, dense: torch.Tensor, table, out: torch.Tensor) -> torch.Tensor:
        return table.pruned(dense, *level, out=out)


class DatabaseLevels:
    """A SparseGPT level database: each block scored at its nearest stored level (dense included)."""

    supports_nm = False
    sequential = False

    def __init__(self, artifact: str | Path) -> None:
        self.db = LevelDatabase(Path(artifact))

    @property
    def num_blocks(self) -> int:
        return self.db.num_blocks

    def snap(self, sparsity: float) -> float:
        return self.db.nearest(sparsity)

    def weight(self, block: int, name: str, level: Level, dense: torch.Tensor, table, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.db.weight(block, name, level[0]))


# prepare(model, calibration windows, target, grid or None, dtype, device, batch size, progress) -> artifact
Prepare = Callable[[str, torch.Tensor, float, "tuple[float, ...] | None", str, torch.device, int, bool], str]


@dataclass(frozen=True)
class LevelSourceKind:
    """A registered level source: its help, its class (opened by each evaluator from what ``prepare``
    returned), how it is prepared once before the evaluators start (None: nothing to prepare) and the
    grid evolution searches on it (None: the 1 % grid)."""

    help: str
    source: type
    prepare: Prepare | None = None
    grid: Callable[[float, "tuple[float, ...] | None"], list[float] | None] = lambda target, levels: None

    def disk_bytes(self, linear_weights: int, element_bytes: int, target: float,
                   levels: "tuple[float, ...] | None" = None) -> int:
        """Bytes what ``prepare`` builds takes on each node's disk: every linear weight at each level of the
        grid above 0 (nothing for a source that prepares nothing)."""
        if self.prepare is None:
            return 0
        grid = self.grid(target, levels) or []
        return sum(level > 0 for level in grid) * linear_weights * element_bytes

    @property
    def supports_nm(self) -> bool:
        return self.source.supports_nm

    @property
    def sequential(self) -> bool:
        return self.source.sequential

    def open(self, artifact: str | None) -> LevelSource:
        return self.source(artifact)


def _prepare_database(model: str, calibration: torch.Tensor, target: float, levels: tuple[float, ...] | None,
                      dtype: str, device: torch.device, batch_size: int, progress: bool) -> str:
    return str(ensure_database(model, calibration, database_levels(target, levels), dtype, device, batch_size,
                               progress))


LEVEL_SOURCES: dict[str, LevelSourceKind] = {
    "wanda": LevelSourceKind("Wanda rank tables (masks just in time; kl-seq refreshes them per profile)",
                             RankTableLevels),
    "sparsegpt-db": LevelSourceKind(
        "SparseGPT-pruned weights per level, built once, stored as safetensors, memory-mapped", DatabaseLevels,
        _prepare_database, database_levels),
}


def source_names() -> list[str]:
    """``--level-source`` choices: ``auto`` and every registered source."""
    return ["auto", *LEVEL_SOURCES]


def resolve_level_source(source: str, pruner_default: str, nm_m: int | None) -> str:
    """``auto`` → ``pruner_default`` when it holds the levels asked for (N:M with ``nm_m``), else the rank
    tables; a named source is checked against what it holds."""
    if source == "auto":
        return pruner_default if nm_m is None or LEVEL_SOURCES[pruner_default].supports_nm else "wanda"
    if source not in LEVEL_SOURCES:
        raise SparseAllocError(f"unknown --level-source {source!r}; choose auto or one of {', '.join(LEVEL_SOURCES)}")
    if nm_m is not None and not LEVEL_SOURCES[source].supports_nm:
        raise SparseAllocError(f"the {source} level source holds unstructured levels; drop --nm-m or use "
                               "--level-source wanda")
    return source
