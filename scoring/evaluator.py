"""Fast candidate evaluator: profiles → fitness, no recalibration, for any model size.

Two places for the weights (``mode``):

- **resident**: every block on the actor's device(s) (split over several GPUs with contiguous runs of
  blocks when more than one is given), next to its rank tables (2 bytes per weight);
- **streamed**: blocks and rank tables stay in host memory and are moved to the device one block at
  a time (the next one already on its way, so at most two are there), for models whose weights do
  not fit the device.

In both modes a *population* of candidates advances block by block together: candidates whose
levels agree on blocks 0..l share the hidden states after block l (a shared prefix is computed
once; candidates whose leading blocks are dense start from the cached dense inputs), and all
candidates that give block l the same level share its masked weights, which are written just in
time into one scratch buffer per linear (no masked copy of the model is kept). Fitness is
KL(dense ‖ pruned) averaged over predicted tokens (lower is better), or perplexity. The dense
reference is a cache of the dense log-probs for as many leading fitness windows as fit in
``LOGPROB_CACHE_LIMIT`` (all of them for small vocabularies × few tokens; for a large vocabulary the
first few, which the low fidelity rungs read), and beyond those the dense final hidden states, sent
through the LM head again in each batch; both give the same numbers.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from pruning.capture import block_output, capture_block_inputs, head_logits
from core.errors import SparseAllocError
from pruning.load import block_param_counts, find_blocks, find_linears, unit_layout
from pruning.offload import move_non_blocks, non_block_bytes, onloaded, pin_blocks, split_blocks, tensor_bytes, to_device
from scoring.level_sources import LevelSource, RankTableLevels
from scoring.levels import Level, RankTables, build_rank_tables
from core.profile import Profile

# kl-seq: KL with the masks of a low-fidelity sequential Wanda pass for that profile (see fitness_many).
METRICS = ("kl", "ppl", "kl-seq")
MODES = ("resident", "streamed")
REFERENCES = ("auto", "logprobs", "hidden")
# Under "auto" the dense log-probs of the leading fitness windows are cached up to this size; windows
# beyond it get their reference recomputed from the dense final hidden states.
LOGPROB_CACHE_LIMIT = 1 << 30
GiB = 1 << 30


def logprob_window_bytes(seqlen: int, vocab: int) -> int:
    """Bytes of one fitness window's cached dense log-probs: (seqlen - 1) x vocab, fp32."""
    return (seqlen - 1) * vocab * 4


def cached_logprob_windows(windows: int, seqlen: int, vocab: int, limit: int) -> int:
    """How many leading fitness windows' dense log-probs fit in ``limit`` bytes."""
    return min(windows, limit // max(1, logprob_window_bytes(seqlen, vocab)))


def _size(count: int) -> str:
    return f"{count / GiB:.3f} GiB ({count:,} bytes)"


class CandidateEvaluator:
    """Scores profiles (per block, group or linear) against the dense model on fixed fitness windows."""

    def __init__(self, model, calibration: torch.Tensor, fitness_windows: torch.Tensor,
                 device: torch.device | Sequence[torch.device], score_kind: str = "wanda", batch_size: int = 4,
                 progress: bool = True, mode: str = "resident", memory_budget: int | None = None,
                 reference: str = "auto", owl_multipliers: Sequence[float] = (), sequential_windows: int = 4,
                 levels: LevelSource | None = None) -> None:
        """``device``: one device, or the actor's devices (resident blocks are split over them).
        ``memory_budget``: bytes this evaluator may hold on each device (None: no limit).
        ``sequential_windows``: calibration windows of the low-fidelity sequential pass behind ``kl-seq``.
        ``levels``: where a block's linears at a level come from (default: the Wanda rank tables' masks;
        a SparseGPT level database gives its stored weights, each block at its nearest level)."""
        if mode not in MODES:
            raise SparseAllocError(f"unknown evaluator mode {mode!r}; choose one of {', '.join(MODES)}")
        if reference not in REFERENCES:
            raise SparseAllocError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
        self.model = model
        self.devices = [device] if isinstance(device, torch.device) else list(device)
        self.device = self.devices[0]
        self.mode = mode
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.blocks = find_blocks(model)
        self.block_weights = block_param_counts(model)
        self.layout = unit_layout(model)
        self.windows = fitness_windows
        self._ids = fitness_windows.to(self.device)
        self._linears = [find_linears(block) for block in self.blocks]
        self._non_block_bytes = non_block_bytes(model)
        self._device_ranks: dict[int, dict[str, torch.Tensor]] = {}  # streamed: ranks of the blocks on the device
        self._place()
        self.score_kind = score_kind
        self.levels = levels if levels is not None else RankTableLevels()
        stored = getattr(self.levels, "num_blocks", self.num_blocks)
        if stored != self.num_blocks:
            raise SparseAllocError(f"the level source holds {stored} blocks, the model {self.num_blocks}")
        self.sequential_calibration = calibration[: max(1, sequential_windows)].cpu()
        self.ranks: RankTables = build_rank_tables(
            model, calibration, lambda l: self._block_device[l], lambda l: self._home[l], score_kind, batch_size,
            owl_multipliers, progress)
        self._block_cost = [self._cost(l) for l in range(self.num_blocks)]
        self._lookahead = self._check_budget()
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._calls: dict[tuple[int, int], tuple[tuple, dict]] = {}
        self.block_bytes_on_device = 0
        self.peak_block_bytes = 0
        self._dense_inputs, self._dense_final = self._dense_pass()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        total = fitness_windows.shape[0]
        self.cached_windows = cached_logprob_windows(total, fitness_windows.shape[1], vocab, LOGPROB_CACHE_LIMIT) \
            if reference == "auto" else (total if reference == "logprobs" else 0)
        # "mixed": the leading windows (the fidelity rungs' draw 0) from the cache, the rest recomputed.
        self.reference = "logprobs" if self.cached_windows == total else \
            "hidden" if self.cached_windows == 0 else "mixed"
        self._dense_logprobs = self._cache_logprobs(self.cached_windows) if self.cached_windows else None
        # KL is summed in token chunks small enough to stay in CPU cache (one pass per chunk on GPU).
        self._kl_chunk = fitness_windows.shape[1] if self.device.type == "cuda" else max(1, 2**19 // vocab)
        self.evaluations = 0

    def refresh_ranks(self, calibration: torch.Tensor, incumbent: Profile) -> None:
        """Rank tables rebuilt from the inputs the sequential final pass gives each block for
        ``incumbent`` (same calibration windows, batch size and dtype: at the incumbent's levels the
        masks are then the final pass's). OWL ratios stay those of the dense model."""
        fresh = build_rank_tables(self.model, calibration, lambda l: self._block_device[l],
                                  lambda l: self._home[l], self.score_kind, self.batch_size, progress=False,
                                  incumbent=incumbent)
        self.ranks = RankTables(fresh.tables, self.ranks.outlier_ratios)

    # ---- placement and memory -------------------------------------------------------------------

    def _place(self) -> None:
        """Resident: blocks on their devices; streamed: blocks at home on the host, page-locked."""
        host = torch.device("cpu")
        if self.mode == "resident":
            assignment = split_blocks(self.block_weights, len(self.devices))
            self._block_device = [self.devices[a] for a in assignment]
            self._check_resident_fits()
            for block, device in zip(self.blocks, self._block_device):
                block.to(device)
            self._home = list(self._block_device)
        else:
            self._block_device = [self.device] * self.num_blocks
            for block in self.blocks:
                block.to(host)
            if self.device.type == "cuda":
                pin_blocks(self.model)
            self._home = [host] * self.num_blocks
        move_non_blocks(self.model, self.device)

    def _check_resident_fits(self) -> None:
        """A resident evaluator needs every block (weights, 2-byte ranks) plus one scratch block per
        device; refuse before moving anything when that exceeds the budget."""
        if self.memory_budget is None:
            return
        need = [0] * len(self.devices)
        index = {id(d): i for i, d in enumerate(self.devices)}
        for l, device in enumerate(self._block_device):
            need[index[id(device)]] += tensor_bytes(self.blocks[l]) + 2 * self.block_weights[l]
        need[0] += self._non_block_bytes
        scratch = max(self._linear_bytes(l) for l in range(self.num_blocks))
        worst = max(need) + scratch
        if worst > self.memory_budget:
            raise SparseAllocError(
                f"the resident evaluator needs {_size(worst)} on a device but the budget is "
                f"{_size(self.memory_budget)}; use --evaluator streamed, more --gpus-per-actor, "
                "or a larger --device-memory-gb")

    def _linear_bytes(self, block: int) -> int:
        return sum(layer.weight.numel() * layer.weight.element_size() for layer in self._linears[block].values())

    def _cost(self, block: int) -> int:
        """Device bytes of one block in use: its tensors, its rank tables and its masked scratch."""
        return tensor_bytes(self.blocks[block]) + self.ranks.block_bytes(block) + self._linear_bytes(block)

    def _check_budget(self) -> int:
        """Streamed mode: how many blocks may be on the device at once (2 when they fit, else 1)."""
        if self.mode == "resident" or self.memory_budget is None:
            return 2
        left = self.memory_budget - self._non_block_bytes
        biggest = max(self._block_cost)
        if biggest > left:
            raise SparseAllocError(
                f"--device-memory-gb {self.memory_budget / GiB:.3f} is too small for the streamed evaluator: the "
                f"non-block weights take {_size(self._non_block_bytes)} and one block needs {_size(biggest)} "
                f"(weights, ranks, masked scratch); give at least {_size(biggest + self._non_block_bytes)}")
        return 2 if 2 * biggest <= left else 1

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def max_tokens(self) -> int:
        return self.windows.numel()

    @property
    def tables(self):
        """Rank table per block, per linear name."""
        return self.ranks.tables

    def outlier_ratios(self, multiplier: float) -> list[float]:
        """OWL's ratio per block for ``multiplier`` (counted when the tables were built)."""
        if float(multiplier) not in self.ranks.outlier_ratios:
            raise SparseAllocError(f"OWL ratios were counted for M in {sorted(self.ranks.outlier_ratios)}, "
                                   f"not {multiplier}")
        return self.ranks.outlier_ratios[float(multiplier)]

    # ---- blocks on the device -------------------------------------------------------------------

    def _blocks_in_turn(self) -> Iterator[int]:
        """Block indices in order; in streamed mode each block is on the device while it is yielded
        (the next one is moved in before the current one is released, when two fit)."""
        if self.mode == "resident":
            yield from range(self.num_blocks)
            return
        with ExitStack() as stack:
            entered: dict[int, ExitStack] = {}

            def enter(l: int) -> None:
                if l < self.num_blocks and l not in entered:
                    inner = ExitStack()
                    inner.enter_context(onloaded(self.blocks[l], self.device))
                    self._onload_ranks(l)
                    self._account(self._block_cost[l])
                    inner.callback(self._release_ranks, l)
                    entered[l] = inner

            stack.callback(lambda: [entered.pop(l).close() for l in list(entered)])
            for l in range(self.num_blocks):
                enter(l)
                if self._lookahead > 1:
                    enter(l + 1)
                yield l
                entered.pop(l).close()

    def _account(self, delta: int) -> None:
        self.block_bytes_on_device += delta
        self.peak_block_bytes = max(self.peak_block_bytes, self.block_bytes_on_device)
        if self.memory_budget is not None and self.mode == "streamed":
            assert self.block_bytes_on_device + self._non_block_bytes <= self.memory_budget

    def _onload_ranks(self, block: int) -> None:
        self._device_ranks[block] = {name: t.stored.to(self.device, non_blocking=True)
                                     for name, t in self.ranks.tables[block].items()}

    def _release_ranks(self, block: int) -> None:
        del self._device_ranks[block]
        self._account(-self._block_cost[block])

    def _masked(self, block: int, levels: tuple[Level | None, ...]) -> dict[str, torch.Tensor]:
        """The block's linears at their ``levels`` (one per linear, in order; None: dense), the pruned ones
        written into the scratch buffers of its device."""
        device = self._block_device[block]
        out = {}
        if any(level is not None and level[1] is not None for level in levels) and not self.levels.supports_nm:
            raise SparseAllocError(f"the {type(self.levels).__name__} level source holds unstructured levels, not "
                                   "N:M patterns")
        for (name, layer), level in zip(self._linears[block].items(), levels):
            if level is None:
                out[name] = layer.weight.data
                continue
            table = self.ranks.tables[block][name]
            if self.mode == "streamed":
                table = type(table)(self._device_ranks[block][name])
            weight = layer.weight.data
            key = (device, name, tuple(weight.shape), weight.dtype)
            if key not in self._scratch:
                self._scratch[key] = torch.empty_like(weight)
            out[name] = self.levels.weight(block, name, level, weight, table, self._scratch[key])
        return out

    def _calls_for(self, block: int, batch: int) -> tuple[tuple, dict]:
        """Block ``block``'s extra call arguments (rotary tables, masks …) for a batch of ``batch``
        windows, captured once per batch size and kept on the block's device."""
        if (block, batch) not in self._calls:
            captured = capture_block_inputs(self.model, self.blocks, self._ids[:batch], batch, self.device)
            for l in range(self.num_blocks):
                self._calls[(l, batch)] = to_device(captured.calls[l][0], self._block_device[l])
        return self._calls[(block, batch)]

    def _run_block(self, block: int, hidden: torch.Tensor, batches: list[slice],
                   weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Block ``block`` on ``hidden`` ([windows, seqlen, hidden]) in mini-batches, with its linears
        pointed at ``weights`` (None: dense)."""
        device = self._block_device[block]
        hidden = hidden.to(device)
        linears = self._linears[block]
        dense = {name: layer.weight.data for name, layer in linears.items()}
        try:
            if weights is not None:
                for name, layer in linears.items():
                    layer.weight.data = weights[name]
            outputs = []
            for part in batches:
                args, kwargs = self._calls_for(block, part.stop - part.start)
                outputs.append(block_output(self.blocks[block](hidden[part], *args, **kwargs)))
            return torch.cat(outputs)
        finally:
            for name, layer in linears.items():
                layer.weight.data = dense[name]

    @torch.no_grad()
    def _dense_pass(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Dense inputs of every block on all fitness windows (kept where the block lives), and the
        dense final hidden states (on the first device)."""
        captured = capture_block_inputs(self.model, self.blocks, self._ids, self.batch_size, self.device)
        hidden = torch.cat(captured.hidden)
        batches = self._batches(hidden.shape[0])
        inputs = []
        for l in self._blocks_in_turn():
            inputs.append(hidden.to(self._home[l]))
            hidden = self._run_block(l, hidden, batches, None)
        return inputs, hidden.to(self.device)

    def _batches(self, count: int) -> list[slice]:
        return [slice(s, min(s + self.batch_size, count)) for s in range(0, count, self.batch_size)]

    # ---- the reference --------------------------------------------------------------------------

    @torch.no_grad()
    def _cache_logprobs(self, windows: int) -> torch.Tensor:
        """The dense log-probs of the first ``windows`` fitness windows (windows x (s - 1) x V, fp32)."""
        parts = [F.log_softmax(self._logits(self._dense_final[b], self._ids[b])[:, :-1].float(), dim=-1)
                 for b in self._batches(windows)]
        return torch.cat(parts)

    def _logits(self, final_hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, self.blocks, final_hidden.to(self.device), ids)

    # ---- fitness --------------------------------------------------------------------------------

    def window_ids(self, tokens: int | None = None, draw: int = 0, skip: int = 0) -> list[int]:
        """The fitness windows a fidelity of ``tokens`` tokens uses: draw 0 = the first ones after the
        first ``skip`` tokens (all windows when ``tokens`` is None); draw d > 0 = a random minibatch of that
        many windows, the same for the same d (a fresh minibatch per selection stage, EvoPress-style)."""
        total, size = self.windows.shape
        first = math.ceil(skip / size)
        count = total - first if tokens is None else max(1, math.ceil(tokens / size))
        if draw and skip:
            raise SparseAllocError("a candidate scores either a random draw of windows or the ones after a skip")
        if first + count > total:
            raise SparseAllocError(f"fidelity of {tokens} tokens after {skip} exceeds the {self.max_tokens} cached "
                                   "fitness tokens")
        if draw == 0:
            return list(range(first, first + count))
        order = torch.randperm(total, generator=torch.Generator().manual_seed(draw))
        return sorted(order[:count].tolist())

    @torch.no_grad()
    def fitness(self, profile: Profile, tokens: int | None = None, metric: str = "kl", draw: int = 0,
                skip: int = 0) -> float:
        """Mean KL(dense ‖ pruned) per predicted token, or perplexity, on ``tokens`` tokens
        (the windows of :meth:`window_ids`)."""
        return self.fitness_many([profile], tokens, metric, draw, skip)[0]

    @torch.no_grad()
    def fitness_many(self, profiles: Sequence[Profile], tokens: int | None = None, metric: str = "kl",
                     draw: int = 0, skip: int = 0) -> list[float]:
        """:meth:`fitness` of each profile, the population advancing block by block together.

        ``kl-seq`` scores each profile alone, with rank tables rebuilt from the inputs the sequential
        Wanda pass gives each block for that very profile on the first ``sequential_windows``
        calibration windows: the masks of a low-fidelity real pass (exactly the real pass's with all
        calibration windows), at the cost of one calibration forward per profile and a second set of
        rank tables while it is scored."""
        if metric not in METRICS:
            raise SparseAllocError(f"unknown fitness metric {metric!r}; choose one of {', '.join(METRICS)}")
        for profile in profiles:
            profile.check_layout(self.layout)
        if metric == "kl-seq":
            if self.score_kind != "wanda" or not self.levels.sequential:
                raise SparseAllocError("kl-seq needs Wanda rank tables (activation-based masks), not "
                                       f"{type(self.levels).__name__} with {self.score_kind} scores")
            dense_ranks, values = self.ranks, []
            try:
                for profile in profiles:
                    self.ranks = dense_ranks  # at most two sets at once: the dense one and this profile's
                    self.refresh_ranks(self.sequential_calibration, profile)
                    values += self.fitness_many([profile], tokens, "kl", draw, skip)
            finally:
                self.ranks = dense_ranks
            return values
        ids = torch.tensor(self.window_ids(tokens, draw, skip), device=self.device)
        levels = [self._block_levels(p) for p in profiles]
        batches = self._batches(len(ids))
        # A group: members sharing the levels so far; its hidden states (None while still dense).
        groups: list[tuple[list[int], torch.Tensor | None]] = [(list(range(len(profiles))), None)]
        for l in self._blocks_in_turn():
            jobs: dict[tuple | None, list[tuple[list[int], torch.Tensor | None]]] = {}
            advanced: list[tuple[list[int], torch.Tensor | None]] = []
            for members, hidden in groups:
                split: dict[tuple | None, list[int]] = {}
                for member in members:
                    split.setdefault(levels[member][l], []).append(member)
                for level, sub in split.items():
                    if level is None and hidden is None:
                        advanced.append((sub, None))
                    else:
                        jobs.setdefault(level, []).append((sub, hidden))
            for level, work in jobs.items():
                weights = None if level is None else self._masked(l, level)
                for sub, hidden in work:
                    start = self._dense_inputs[l][ids.to(self._home[l])] if hidden is None else hidden
                    advanced.append((sub, self._run_block(l, start, batches, weights)))
            groups = advanced
        scores = [0.0] * len(profiles)
        for (members, _), value in zip(groups, self._score(ids, [hidden for _, hidden in groups], metric)):
            for member in members:
                scores[member] = value
        self.evaluations += len(profiles)
        return scores

    def _level(self, sparsity: float, pattern) -> Level | None:
        """A linear's level for ``sparsity`` (as its level source snaps it), None when that is dense."""
        sparsity = self.levels.snap(sparsity)
        return (sparsity, pattern) if sparsity > 0 else None

    def _block_levels(self, profile: Profile) -> list[tuple[Level | None, ...] | None]:
        """Per block, the levels of its linears in order (what candidates must share to share the block's
        output); None for a block left dense."""
        out = []
        for block, linears in zip(self._linears, profile.levels(self.layout)):
            key = tuple(self._level(*linears[name]) for name in block)
            out.append(None if all(level is None for level in key) else key)
        return out

    def _score(self, ids: torch.Tensor, finals: list[torch.Tensor | None], metric: str) -> list[float]:
        """Mean KL or perplexity for each of ``finals`` (final hidden states; None: the dense model) on
        windows ``ids``. The head runs one window at a time (logits are T x V); a recomputed dense
        reference is computed once per window for all of them."""
        finals = [self._dense_final[ids] if final is None else final for final in finals]
        totals, count = [0.0] * len(finals), 0
        for position in range(len(ids)):
            part = slice(position, position + 1)
            window_ids = ids[part]
            batch = self._ids[window_ids]
            reference = self._logits(self._dense_final[window_ids], batch) \
                if metric == "kl" and int(window_ids[0]) >= self.cached_windows else None
            for index, final in enumerate(finals):
                logits = self._logits(final[part], batch)
                totals[index] += self._kl_sum(window_ids, logits, reference) if metric == "kl" \
                    else self._nll_sum(batch, logits)
            count += batch[:, 1:].numel()
        return [total / count if metric == "kl" else math.exp(total / count) for total in totals]

    def _token_chunks(self, logits: torch.Tensor) -> Iterator[tuple[int, slice, torch.Tensor]]:
        """(sample, token slice, fp32 log-probs) over the predicted positions, in cache-sized chunks."""
        predicted = logits.shape[1] - 1
        for sample in range(logits.shape[0]):
            for start in range(0, predicted, self._kl_chunk):
                tokens = slice(start, min(start + self._kl_chunk, predicted))
                yield sample, tokens, F.log_softmax(logits[sample, tokens].float(), dim=-1)

    def _kl_sum(self, windows: torch.Tensor, logits: torch.Tensor, reference_logits: torch.Tensor | None) -> float:
        """Σ over the batch's predicted tokens of KL(dense ‖ pruned), against the cached dense log-probs
        or the dense logits recomputed for this batch."""
        total = 0.0
        for sample, tokens, logprobs in self._token_chunks(logits):
            if reference_logits is None:
                reference = self._dense_logprobs[windows[sample], tokens]
            else:
                reference = F.log_softmax(reference_logits[sample, tokens].float(), dim=-1)
            total += float(torch.linalg.vecdot(reference.exp(), reference - logprobs).sum(dtype=torch.float64))
        return total

    def _nll_sum(self, batch: torch.Tensor, logits: torch.Tensor) -> float:
        """Σ over the batch's predicted tokens of −log p(next token)."""
        total = 0.0
        for sample, tokens, logprobs in self._token_chunks(logits):
            targets = batch[sample, tokens.start + 1 : tokens.stop + 1].unsqueeze(-1)
            total -= float(logprobs.gather(-1, targets).sum(dtype=torch.float64))
        return total

    def coalition_fitness(self, coalition: frozenset[int], sparsity: float, tokens: int | None = None,
                          metric: str = "kl") -> float:
        """Fitness when exactly the blocks in ``coalition`` are pruned at ``sparsity`` (others dense)."""
        values = [sparsity if l in coalition else 0.0 for l in range(self.num_blocks)]
        return self.fitness(Profile(tuple(values)), tokens, metric)
