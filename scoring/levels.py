"""Level sources: turn (block, linear, level) into that linear's weights at that level.

A *level* is a block's sparsity on the search grid, optionally with an N:M pattern. The one level
source so far is a rank table per linear: each weight's position in its row's ascending order of
importance (Wanda's |W|·‖X_j‖₂ from dense calibration inputs, or |W|), stored as int16 with an
offset of 2^15 (so rows up to 65,536 wide take 2 bytes per weight). Any unstructured sparsity is
then ``rank >= k`` and an N:M pattern keeps the M − N best-ranked weights of every group of M — no
score copy is kept. OWL's outlier ratios need the scores, so they are counted while the tables are
built, for every multiplier asked for.

Wanda tables normally score with the dense model's activations; :func:`sequential_rank_tables`
scores with the activations the sequential final pass sees for an incumbent profile instead, so
that the tables' masks at the incumbent's levels are the masks the final pass writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from pruning.capture import capture_block_inputs, run_block, run_block_observing
from core.errors import SparseAllocError
from pruning.load import find_blocks, find_linears, unit_layout
from pruning.masks import prune_count
from pruning.offload import onloaded, to_device
from pruning.pruners import InputNorms, wanda_scores
from core.profile import Profile

NM = tuple[int, int]
Level = tuple[float, NM | None]  # (sparsity, N:M pattern or None)
_OFFSET = 2**15


@dataclass
class RankTable:
    """One linear's removal order: ``stored[r, c]`` = rank of weight (r, c) in its row minus 2^15."""

    stored: torch.Tensor  # [rows, cols] int16 (int32 for rows wider than 65,536)

    @classmethod
    def from_scores(cls, scores: torch.Tensor) -> "RankTable":
        """Ranks of ``scores`` within each row (0 = least important; ties broken by column, stably)."""
        order = torch.argsort(scores, dim=1, stable=True)
        positions = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int32).expand_as(order)
        rank = torch.empty(order.shape, dtype=torch.int32, device=scores.device).scatter_(1, order, positions)
        narrow = scores.shape[1] <= 2 * _OFFSET
        return cls((rank - _OFFSET).to(torch.int16) if narrow else rank)

    @property
    def offset(self) -> int:
        return _OFFSET if self.stored.dtype == torch.int16 else 0

    @property
    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()

    def rank(self) -> torch.Tensor:
        """The plain ranks as int32 (0 = removed first)."""
        return self.stored.to(torch.int32) + self.offset

    def keep(self, sparsity: float, nm: NM | None = None) -> torch.Tensor:
        """True for the weights that stay at this level."""
        if nm is None:
            return self.stored >= prune_count(self.stored.shape[1], sparsity) - self.offset
        n, m = nm
        rows, cols = self.stored.shape
        if cols % m:
            raise SparseAllocError(f"N:M with M={m} needs the input width ({cols}) to be a multiple of M")
        groups = self.stored.to(torch.int32).reshape(rows, cols // m, m)
        drop = torch.zeros_like(groups, dtype=torch.bool)
        drop.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
        return ~drop.reshape(rows, cols)

    def mask(self, sparsity: float, nm: NM | None = None) -> torch.Tensor:
        """True for the weights removed at this level."""
        return ~self.keep(sparsity, nm)

    def pruned(self, weight: torch.Tensor, sparsity: float, nm: NM | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` with the removed weights zeroed, written into ``out`` when given."""
        return torch.mul(weight, self.keep(sparsity, nm), out=out)


def outlier_ratio(scores: Sequence[torch.Tensor], multiplier: float) -> float:
    """OWL's D: the share of a block's scores (all its linears pooled) above ``multiplier`` × their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    return sum(int((s > multiplier * mean).sum()) for s in scores) / total


SCORE_KINDS = ("wanda", "magnitude")


@dataclass
class RankTables:
    """Per block, per linear name: its rank table; and OWL ratios per multiplier, per block."""

    tables: list[dict[str, RankTable]]
    outlier_ratios: dict[float, list[float]]

    def block_bytes(self, block: int) -> int:
        return sum(t.nbytes for t in self.tables[block].values())


@torch.no_grad()
def build_rank_tables(model, calibration: torch.Tensor, compute_device: Callable[[int], torch.device],
                      home_device: Callable[[int], torch.device], kind: str = "wanda", batch_size: int = 4,
                      owl_multipliers: Sequence[float] = (), progress: bool = True,
                      incumbent: Profile | None = None) -> RankTables:
    """Rank tables for every block, built block by block: block l runs on ``compute_device(l)`` (moved
    there for the duration when it lives elsewhere) and its tables are kept on ``home_device(l)``.
    Wanda scores use the dense calibration inputs of each block — or, with an ``incumbent`` profile,
    the inputs the sequential final pass would give it for that profile (see
    :func:`sequential_rank_tables`)."""
    if kind not in SCORE_KINDS:
        raise SparseAllocError(f"unknown score kind {kind!r}; choose one of {', '.join(SCORE_KINDS)}")
    blocks = find_blocks(model)
    if incumbent is not None:
        if kind != "wanda":
            raise SparseAllocError(f"an incumbent only changes activation-based scores (wanda), not {kind!r}")
        layout = unit_layout(model)
        incumbent.check_layout(layout)
        incumbent_levels = incumbent.levels(layout)
    captured = capture_block_inputs(model, blocks, calibration, batch_size, compute_device(0)) \
        if kind == "wanda" else None
    hidden = captured.hidden if captured else None
    tables, ratios = [], {float(m): [] for m in owl_multipliers}
    for index in tqdm(range(len(blocks)), desc=f"{kind} rank tables", unit="block", disable=not progress):
        device = compute_device(index)
        with onloaded(blocks[index], device) as block:
            linears = find_linears(block)
            if captured is not None:
                inputs = [h.to(device) for h in hidden]
                calls = to_device(captured.calls[index], device)
                norms, hidden = run_block_observing(block, linears, lambda l: InputNorms(l.in_features, device),
                                                    inputs, calls)

            def scores_of(name: str) -> torch.Tensor:
                weight = linears[name].weight.detach()
                return wanda_scores(weight, norms[name]) if captured is not None else weight.abs().float()

            tables.append({name: RankTable(RankTable.from_scores(scores_of(name)).stored.to(home_device(index)))
                           for name in linears})
            if ratios:
                pooled = [scores_of(name) for name in linears]
                for m in ratios:
                    ratios[m].append(outlier_ratio(pooled, m))
                del pooled
            if incumbent is not None and any(s > 0 for s, _ in incumbent_levels[index].values()):
                # As the final pass: the next block's inputs are this block's outputs with its linears
                # pruned at the incumbent's levels (masks from the dense weights just ranked).
                here = {name: RankTable(t.stored.to(device)) for name, t in tables[-1].items()}
                with _masked(linears, here, incumbent_levels[index]):
                    hidden = run_block(block, inputs, calls)
                del here
    return RankTables(tables, ratios)


@torch.no_grad()
def sequential_rank_tables(model, calibration: torch.Tensor, incumbent: Profile, device: torch.device,
                           batch_size: int = 4, home_device: torch.device | None = None,
                           owl_multipliers: Sequence[float] = (), progress: bool = True) -> RankTables:
    """Wanda rank tables from the activations the sequential final pass (``prune_sequentially`` with
    the wanda pruner, same ``calibration`` and ``batch_size``) sees when it prunes to ``incumbent``:
    block l's input norms come from the outputs of blocks 0..l-1 pruned at the incumbent's levels
    (all linears of a block from one forward of the still-dense block, as the pass does), so the
    tables' masks at the incumbent's levels are exactly the masks that pass writes. Blocks run on
    ``device``, tables are kept on ``home_device`` (default ``device``); the model's weights are only
    masked for the duration of a block's forward and are left exactly as they were."""
    home = device if home_device is None else home_device
    return build_rank_tables(model, calibration, lambda _l: device, lambda _l: home, "wanda", batch_size,
                             owl_multipliers, progress, incumbent=incumbent)


@contextmanager
def _masked(linears: dict[str, torch.nn.Module], tables: dict[str, RankTable],
            levels: dict[str, Level]) -> Iterator[None]:
    """The linears' weights pointed at pruned copies (zeros where the tables remove at each linear's level
    in ``levels``, written as the pruners write them) for the duration; the dense tensors are put back
    untouched."""
    dense = {name: layer.weight.data for name, layer in linears.items()}
    try:
        for name, layer in linears.items():
            if levels[name][0] > 0:
                layer.weight.data = dense[name].masked_fill(tables[name].mask(*levels[name]), 0)
        yield
    finally:
        for name, layer in linears.items():
            layer.weight.data = dense[name]
