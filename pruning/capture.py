"""Capture what decoder block 0 receives, then run blocks one at a time on those inputs.

Every positional and keyword argument block 0 gets from the model (rotary
``position_embeddings``, ``attention_mask`` — possibly None —, ``position_ids``,
``cache_position`` …) is kept per mini-batch and passed on unchanged to each later block, so
this works across transformers versions and architectures (LLaMA family, OPT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    """Raised inside block 0's pre-hook once its inputs are stored."""


@dataclass
class BlockInputs:
    """One mini-batch's hidden states and the other arguments every block receives."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(model, blocks: nn.ModuleList, token_windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[BlockInputs]:
    """Inputs of block 0 for every mini-batch of ``token_windows`` ([n, seqlen])."""
    captured: list[BlockInputs] = []

    def hook(_module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockInputs(hidden.detach(), rest, dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, token_windows.shape[0], batch_size):
            batch = token_windows[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInputs]) -> list[BlockInputs]:
    """The block's outputs for every mini-batch, as the next block's inputs."""
    return [
        BlockInputs(_block_output(block(item.hidden, *item.args, **item.kwargs)), item.args, item.kwargs)
        for item in inputs
    ]
