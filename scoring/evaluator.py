"""Fast candidate evaluator: a Profile → fitness in one forward pass, no recalibration.

Built once per model: score tables (masks for any sparsity by comparing a precomputed rank),
the dense next-token distributions on the fitness windows, and the dense inputs of every block
on those windows, so a candidate whose first k blocks are dense starts at block k. A fidelity of
n windows is scored on the first n windows, or on another slice of them (``draw`` d: the d-th run
of n consecutive windows, cyclically), so multi-fidelity searches can see fresh tokens. Pruned weights
are written into one persistent buffer per linear and kept with their level, so consecutive
candidates that share a block's level (EA children, Shapley coalitions) do not re-mask it.
Fitness is KL(dense ‖ pruned) averaged over predicted tokens (lower is better), or perplexity.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pruning.capture import capture_block_inputs, run_block
from pruning.errors import SparseAllocError
from pruning.load import block_param_counts, find_blocks, find_linears
from pruning.score_table import LinearScores, build_score_tables
from search_spaces.profile import Profile

METRICS = ("kl", "ppl")


class _Passthrough(nn.Module):
    """Stands in for a skipped (dense, cached) block: returns its hidden states unchanged."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *_args, **_kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class CandidateEvaluator:
    """Scores per-block profiles against the dense model on fixed fitness windows."""

    def __init__(self, model, calibration: torch.Tensor, fitness_windows: torch.Tensor, device: torch.device,
                 score_kind: str = "wanda", batch_size: int = 4, progress: bool = True) -> None:
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.blocks = find_blocks(model)
        self.block_weights = block_param_counts(model)
        self.windows = fitness_windows
        self.tables: list[dict[str, LinearScores]] = build_score_tables(
            model, calibration, device, score_kind, batch_size, progress)
        self._linears = [find_linears(block) for block in self.blocks]
        self._dense = [{name: layer.weight.data for name, layer in linears.items()} for linears in self._linears]
        self._masked: list[dict[str, torch.Tensor]] = [{} for _ in self.blocks]  # filled on first use
        self._masked_level: list[tuple[float, tuple[int, int] | None] | None] = [None] * len(self.blocks)
        self._windows = fitness_windows.to(device)
        self._block_inputs = self._cache_block_inputs()  # [block] -> [windows, seqlen, hidden]
        self._dense_logprobs = torch.cat([self._logprobs(self._windows[i : i + batch_size])
                                          for i in range(0, fitness_windows.shape[0], batch_size)])
        vocab = self._dense_logprobs.shape[-1]
        # KL is summed in token chunks small enough to stay in CPU cache (one pass per chunk on GPU).
        self._kl_chunk = fitness_windows.shape[1] if device.type == "cuda" else max(1, 2**19 // vocab)
        self.evaluations = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def max_tokens(self) -> int:
        return self.windows.numel()

    @torch.no_grad()
    def _cache_block_inputs(self) -> list[torch.Tensor]:
        """Dense hidden states entering each block, for every fitness window."""
        captured = capture_block_inputs(self.model, self.blocks, self.windows, self.batch_size, self.device)
        args, kwargs = captured.calls[0][0]
        self._block_returns_tuple = isinstance(self.blocks[0](captured.hidden[0], *args, **kwargs), (tuple, list))
        hidden, cached = captured.hidden, []
        for index, block in enumerate(self.blocks):
            cached.append(torch.cat(hidden))
            hidden = run_block(block, hidden, captured.calls[index])
        return cached

    @torch.no_grad()
    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, use_cache=False).logits

    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self._logits(batch)[:, :-1].float(), dim=-1)

    def _mask_block(self, block: int, level: tuple[float, tuple[int, int] | None]) -> None:
        """Write the block's pruned weights at ``level`` into its buffers (skipped if already there)."""
        if self._masked_level[block] == level:
            return
        buffers = self._masked[block]
        for name, dense in self._dense[block].items():
            buffers[name] = self.tables[block][name].pruned(dense, *level, out=buffers.get(name))
        self._masked_level[block] = level

    @contextmanager
    def _applied(self, profile: Profile) -> Iterator[int]:
        """Temporarily point pruned blocks at their masked buffers; yields the first pruned block
        (0 when none is pruned)."""
        pruned_blocks = [l for l, s in enumerate(profile.sparsities) if s > 0]
        try:
            for l in pruned_blocks:
                self._mask_block(l, (profile.sparsities[l], profile.pattern(l)))
                for name, layer in self._linears[l].items():
                    layer.weight.data = self._masked[l][name]
            yield pruned_blocks[0] if pruned_blocks else 0
        finally:
            for l in pruned_blocks:
                for name, layer in self._linears[l].items():
                    layer.weight.data = self._dense[l][name]

    @contextmanager
    def _start_at(self, first: int, windows: list[int]) -> Iterator[None]:
        """Skip dense blocks before ``first``: feed block ``first`` its cached dense input."""
        if first == 0:
            yield
            return
        cached = self._block_inputs[first][windows]
        originals = [self.blocks[i] for i in range(first)]

        def swap_input(_module, args, kwargs):
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        handle = self.blocks[first].register_forward_pre_hook(swap_input, with_kwargs=True)
        for i in range(first):
            self.blocks[i] = _Passthrough(self._block_returns_tuple)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def window_ids(self, tokens: int | None = None, draw: int = 0) -> list[int]:
        """The fitness windows a fidelity of ``tokens`` tokens uses: the ``draw``-th run of that many
        consecutive windows, wrapping around (draw 0 = the first ones; all windows when ``tokens`` is None)."""
        total = self.windows.shape[0]
        count = total if tokens is None else max(1, math.ceil(tokens / self.windows.shape[1]))
        if count > total:
            raise SparseAllocError(f"fidelity of {tokens} tokens exceeds the {self.max_tokens} cached fitness tokens")
        return [(draw * count + i) % total for i in range(count)]

    @torch.no_grad()
    def fitness(self, profile: Profile, tokens: int | None = None, metric: str = "kl", draw: int = 0) -> float:
        """Mean KL(dense ‖ pruned) per predicted token, or perplexity, on ``tokens`` tokens
        (the windows of :meth:`window_ids`)."""
        if metric not in METRICS:
            raise SparseAllocError(f"unknown fitness metric {metric!r}; choose one of {', '.join(METRICS)}")
        profile.check_fits(self.num_blocks)
        ids = self.window_ids(tokens, draw)
        total, count = 0.0, 0
        with self._applied(profile) as first:
            for start in range(0, len(ids), self.batch_size):
                windows = ids[start : start + self.batch_size]
                batch = self._windows[windows]
                with self._start_at(first, windows):
                    logits = self._logits(batch)
                total += self._kl_sum(windows, logits) if metric == "kl" else self._nll_sum(batch, logits)
                count += batch[:, 1:].numel()
        self.evaluations += 1
        return total / count if metric == "kl" else math.exp(total / count)

    def _token_chunks(self, logits: torch.Tensor) -> Iterator[tuple[int, slice, torch.Tensor]]:
        """(sample, token slice, fp32 log-probs) over the predicted positions, in cache-sized chunks."""
        predicted = logits.shape[1] - 1
        for sample in range(logits.shape[0]):
            for start in range(0, predicted, self._kl_chunk):
                tokens = slice(start, min(start + self._kl_chunk, predicted))
                yield sample, tokens, F.log_softmax(logits[sample, tokens].float(), dim=-1)

    def _kl_sum(self, windows: list[int], logits: torch.Tensor) -> float:
        """Σ over the batch's predicted tokens of KL(dense ‖ pruned) against the cached dense log-probs."""
        total = 0.0
        for sample, tokens, logprobs in self._token_chunks(logits):
            reference = self._dense_logprobs[windows[sample], tokens]
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
