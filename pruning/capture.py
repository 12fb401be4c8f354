"""Capture what each decoder block receives, then run blocks one at a time on those inputs.

One cheap forward per mini-batch, with every block swapped for a pass-through, records block 0's
hidden states and *every* block's other arguments (rotary ``position_embeddings``,
``attention_mask`` — possibly None —, ``position_ids``, ``cache_position`` …). Each block is later
called with its own recorded arguments, so models whose blocks differ (Gemma 2/3 alternate
sliding-window and global attention with their own masks and rotary tables) are replayed
faithfully, across transformers versions and architectures (LLaMA family, OPT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


class _StopForward(Exception):
    """Raised once the last block's arguments are recorded."""


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call, returns the hidden states."""

    def __init__(self, index: int, calls: list, hidden: list, last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.hidden, self.last = index, calls, hidden, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if self.index == 0:
            self.hidden.append(hidden.detach())
        self.calls[self.index].append((rest, dict(kwargs)))
        if self.last:
            raise _StopForward
        return hidden


@dataclass
class BlockCalls:
    """Block 0's hidden states per mini-batch, and each block's other call arguments."""

    hidden: list[torch.Tensor]  # [batch] -> [b, seqlen, hidden]
    calls: list[list[tuple[tuple, dict]]]  # [block][batch] -> (extra positional args, kwargs)


def block_output(output) -> torch.Tensor:
    """A block's hidden-state output (blocks return a tensor, or a tuple on older transformers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(model, blocks: nn.ModuleList, token_windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> BlockCalls:
    """Record the inputs of the blocks for every mini-batch of ``token_windows`` ([n, seqlen])."""
    captured = BlockCalls(hidden=[], calls=[[] for _ in blocks])
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _Recorder(index, captured.calls, captured.hidden, last=index == len(blocks) - 1)
    try:
        for start in range(0, token_windows.shape[0], batch_size):
            try:
                model(input_ids=token_windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    return captured


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The block's outputs for every mini-batch (the next block's hidden states)."""
    return [block_output(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls)]


def run_block_observing(block: nn.Module, layers: dict[str, nn.Module], new_stats: Callable[[nn.Module], Any],
                        hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]]
                        ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Run the block while each layer's inputs feed ``stats[name].add``; returns (stats, outputs)."""
    stats = {name: new_stats(layer) for name, layer in layers.items()}
    handles = [
        layer.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, layer in layers.items()
    ]
    try:
        outputs = run_block(block, hidden, calls)
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


class _StandIn(nn.Module):
    """Stands in for a block while only the head runs: returns ``value`` when given, else its own input,
    in the form the real blocks return (a tensor, or a 1-tuple)."""

    def __init__(self, value: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, *args, **kwargs):
        hidden = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return (hidden,) if self.as_tuple else hidden


def head_logits(model, blocks: nn.ModuleList, final_hidden: torch.Tensor, input_ids: torch.Tensor,
                as_tuple: bool = False) -> torch.Tensor:
    """Logits of the model's head (final norm, LM head, any soft-capping) applied to ``final_hidden``,
    the last block's output for ``input_ids``: the model's own forward runs with block 0 replaced by a
    stand-in returning ``final_hidden`` and every other block by a pass-through (``as_tuple``: blocks
    return 1-tuples), so each architecture's head is applied as the model itself applies it."""
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _StandIn(final_hidden if index == 0 else None, as_tuple)
    try:
        return model(input_ids=input_ids, use_cache=False).logits
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
