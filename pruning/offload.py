"""Where a model's weights live: blocks resident on a device, or at home on the host and moved to the
device one at a time (block offloading, for models whose weights do not fit the device).

The non-block parts (embeddings, rotary tables, final norm, LM head) always sit on the first device.
``onloaded(block, device)`` moves one block's tensors to the device for the duration of a ``with``
and points them back at their host tensors afterwards (optionally writing the device values back,
as the final pass does after pruning), so the host copy is never duplicated and the device copy is
freed as soon as the block is done.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from pruning.load import find_blocks


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def non_block_bytes(model) -> int:
    """Bytes of everything outside the decoder blocks (embeddings, final norm, LM head; tied counted once)."""
    blocks = find_blocks(model)
    inside = {id(t) for block in blocks for t in (*block.parameters(), *block.buffers())}
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in inside and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def move_non_blocks(model, device: torch.device) -> None:
    """Move every part of ``model`` except its decoder blocks to ``device`` (blocks stay where they are)."""
    blocks = find_blocks(model)
    saved = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = nn.Identity()
    try:
        model.to(device)
    finally:
        for index, block in enumerate(saved):
            blocks[index] = block


def _slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) for every parameter and buffer under ``module``."""
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, True
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, False


@contextmanager
def onloaded(block: nn.Module, device: torch.device, write_back: bool = False) -> Iterator[nn.Module]:
    """``block`` with its tensors on ``device`` inside the ``with``; afterwards they point at their host
    tensors again (with the device values copied into them first when ``write_back``)."""
    slots = list(_slots(block))
    homes = [getattr(owner, name).data if is_param else owner._buffers[name] for owner, name, is_param in slots]
    if all(t.device == device for t in homes):
        yield block
        return
    try:
        for (owner, name, is_param), home in zip(slots, homes):
            moved = home.to(device, non_blocking=True)
            if is_param:
                owner._parameters[name].data = moved
            else:
                owner._buffers[name] = moved
        yield block
    finally:
        for (owner, name, is_param), home in zip(slots, homes):
            current = owner._parameters[name].data if is_param else owner._buffers[name]
            if write_back and current is not home:
                home.copy_(current)
            if is_param:
                owner._parameters[name].data = home
            else:
                owner._buffers[name] = home


def pin_blocks(model) -> None:
    """Page-lock the host copies of the blocks' tensors (faster, asynchronous copies to CUDA)."""
    if not torch.cuda.is_available():
        return
    for block in find_blocks(model):
        for owner, name, is_param in _slots(block):
            if is_param:
                owner._parameters[name].data = owner._parameters[name].data.pin_memory()
            else:
                owner._buffers[name] = owner._buffers[name].pin_memory()


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def split_blocks(weights: list[int], parts: int) -> list[int]:
    """Device index per block: contiguous runs with roughly equal weight counts over ``parts`` devices."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    total = sum(weights) or 1
    assignment, running = [], 0
    for count in weights:
        assignment.append(min(parts - 1, int(parts * (running + count / 2) / total)))
        running += count
    return assignment
