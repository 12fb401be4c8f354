"""Fast candidate evaluator: a Profile → fitness in one forward pass, no recalibration.

Built once per model: score tables (masks for any sparsity by slicing a precomputed order),
the dense next-token log-probabilities on the fitness windows, and the dense inputs of every
block on those windows, so a candidate whose first k blocks are dense starts at block k.
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
        self._batches = [fitness_windows[i : i + batch_size].to(device)
                         for i in range(0, fitness_windows.shape[0], batch_size)]
        self._block_inputs = self._cache_block_inputs()
        self._dense_logprobs = [self._logprobs(batch) for batch in self._batches]
        self.evaluations = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def max_tokens(self) -> int:
        return self.windows.numel()

    @torch.no_grad()
    def _cache_block_inputs(self) -> list[list[torch.Tensor]]:
        """Dense hidden states entering each block, per mini-batch of the fitness windows."""
        captured = capture_block_inputs(self.model, self.blocks, self.windows, self.batch_size, self.device)
        args, kwargs = captured.calls[0][0]
        self._block_returns_tuple = isinstance(self.blocks[0](captured.hidden[0], *args, **kwargs), (tuple, list))
        hidden, cached = captured.hidden, []
        for index, block in enumerate(self.blocks):
            cached.append(hidden)
            hidden = run_block(block, hidden, captured.calls[index])
        return cached

    @torch.no_grad()
    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)

    @contextmanager
    def _applied(self, profile: Profile) -> Iterator[int]:
        """Temporarily mask the weights; yields the first pruned block (0 when none is pruned)."""
        pruned_blocks = [l for l, s in enumerate(profile.sparsities) if s > 0]
        try:
            for l in pruned_blocks:
                for name, layer in self._linears[l].items():
                    layer.weight.data = self.tables[l][name].pruned(self._dense[l][name], profile.sparsities[l],
                                                                    profile.pattern(l))
            yield pruned_blocks[0] if pruned_blocks else 0
        finally:
            for l in pruned_blocks:
                for name, layer in self._linears[l].items():
                    layer.weight.data = self._dense[l][name]

    @contextmanager
    def _start_at(self, first: int, batch_index: int, size: int) -> Iterator[None]:
        """Skip dense blocks before ``first``: feed block ``first`` its cached dense input."""
        if first == 0:
            yield
            return
        cached = self._block_inputs[first][batch_index][:size]
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

    @torch.no_grad()
    def fitness(self, profile: Profile, tokens: int | None = None, metric: str = "kl") -> float:
        """Mean KL(dense ‖ pruned) per predicted token, or perplexity, on the first ``tokens`` tokens."""
        if metric not in METRICS:
            raise SparseAllocError(f"unknown fitness metric {metric!r}; choose one of {', '.join(METRICS)}")
        profile.check_fits(self.num_blocks)
        windows = self.windows.shape[0] if tokens is None else max(1, math.ceil(tokens / self.windows.shape[1]))
        if windows > self.windows.shape[0]:
            raise SparseAllocError(f"fidelity of {tokens} tokens exceeds the {self.max_tokens} cached fitness tokens")
        total, count = 0.0, 0
        with self._applied(profile) as first:
            for index, batch in enumerate(self._batches):
                batch = batch[: windows - index * self.batch_size]
                if batch.shape[0] <= 0:
                    break
                with self._start_at(first, index, batch.shape[0]):
                    logprobs = self._logprobs(batch)
                if metric == "kl":
                    dense = self._dense_logprobs[index][: batch.shape[0]]
                    total += float((dense.exp() * (dense - logprobs)).sum())
                else:
                    total += float(-logprobs.gather(-1, batch[:, 1:].unsqueeze(-1)).sum())
                count += batch[:, 1:].numel()
        self.evaluations += 1
        return total / count if metric == "kl" else math.exp(total / count)

    def coalition_fitness(self, coalition: frozenset[int], sparsity: float, tokens: int | None = None,
                          metric: str = "kl") -> float:
        """Fitness when exactly the blocks in ``coalition`` are pruned at ``sparsity`` (others dense)."""
        values = [sparsity if l in coalition else 0.0 for l in range(self.num_blocks)]
        return self.fitness(Profile(tuple(values)), tokens, metric)
