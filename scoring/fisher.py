"""Trace of the empirical Fisher information per decoder block (MSP's sensitivity).

trace_l = (1/N) Σ_n ‖∇_{θ_l} log-likelihood_n‖² / |θ_l|: the mean over calibration samples of
the squared gradient of a sample's mean token log-likelihood w.r.t. block l's linear weights,
normalised by their count.

Computed block by block, so that at most one block's weight gradients (and, with ``offload``, one
block's weights) are on the device at a time. Per window:

1. forward, block by block, from the captured block-0 input (``pruning.capture``), without a graph;
   each block's input hidden state is kept (detached) on the host;
2. the head (final norm, LM head, any logit softcapping …) is run by the model's own forward with the
   blocks swapped for stand-ins: block 0 returns the final hidden state (a leaf that requires grad),
   the others pass their input through; the loss is the window's mean token NLL, and its gradient
   w.r.t. the final hidden state starts the backward;
3. backward from the top: for block l = L-1 … 0, the block's forward is recomputed from its stored
   input with only its linear weights (and the input) requiring grad, ``autograd.grad`` gives the
   weights' gradients (Σ g² added to block l's total) and the input's gradient (passed down).

Memory on the device: one block's weights (offloaded) or all of them (resident), one block's
activations with their graph, one block's weight gradients, the head's logits. On the host: one
window's L block inputs ([seqlen, hidden] each).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pruning.capture import block_output, capture_block_inputs, head_logits
from pruning.load import find_blocks, find_linears
from pruning.offload import onloaded, to_device

HOST = torch.device("cpu")


def _head_loss(model, blocks: nn.ModuleList, ids: torch.Tensor, final_hidden: torch.Tensor,
               as_tuple: bool) -> torch.Tensor:
    """Mean token NLL of ``ids`` when the last block's output is ``final_hidden`` (the model's own head)."""
    logits = head_logits(model, blocks, final_hidden, ids, as_tuple)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _window_squared_gradients(model, blocks: nn.ModuleList, weights: list[list[nn.Parameter]], window: torch.Tensor,
                              device: torch.device, offload: bool, totals: torch.Tensor) -> None:
    """Add Σ (∂loss/∂θ_l)² of one window's loss to ``totals[l]`` for every block l."""
    ids = window.unsqueeze(0).to(device)
    captured = capture_block_inputs(model, blocks, ids, batch_size=1, device=device)
    calls = [block_calls[0] for block_calls in captured.calls]

    def placed(block: nn.Module):
        return onloaded(block, device) if offload else nullcontext(block)

    # 1. forward without a graph, keeping every block's input on the host
    inputs: list[torch.Tensor | None] = []
    hidden, as_tuple = captured.hidden[0], False
    del captured
    with torch.no_grad():
        for block, (args, kwargs) in zip(blocks, calls):
            inputs.append(hidden.detach().to(HOST))
            with placed(block):
                output = block(hidden, *args, **kwargs)
            as_tuple = isinstance(output, (tuple, list))
            hidden = block_output(output)
            del output

    # 2. the head: gradient of the loss w.r.t. the last block's output
    leaf = hidden.detach().requires_grad_(True)
    del hidden
    with torch.enable_grad():
        loss = _head_loss(model, blocks, ids, leaf, as_tuple)
        (grad,) = torch.autograd.grad(loss, [leaf])
    del loss, leaf

    # 3. backward block by block, recomputing each block's forward from its stored input
    for index in reversed(range(len(blocks))):
        block, (args, kwargs), params = blocks[index], calls[index], weights[index]
        need_input = index > 0
        with placed(block):
            x = to_device(inputs[index], device).detach().requires_grad_(need_input)
            inputs[index] = None
            for p in params:
                p.requires_grad_(True)
            try:
                with torch.enable_grad():
                    output = block_output(block(x, *args, **kwargs))
                    grads = torch.autograd.grad(output, ([x] if need_input else []) + params, grad_outputs=grad,
                                                allow_unused=True)
            finally:
                for p in params:
                    p.requires_grad_(False)
            del output, x
            if need_input:
                grad, grads = grads[0], grads[1:]
            totals[index] += sum(g.float().pow(2).sum() for g in grads if g is not None)
            del grads


def block_fisher_traces(model, windows: torch.Tensor, device: torch.device, progress: bool = True,
                        offload: bool = False) -> list[float]:
    """Fisher trace per decoder block over the calibration ``windows`` ([n, seqlen], one sample per window).

    ``offload``: the blocks live on the host and each is moved to ``device`` only while it runs
    (``pruning.offload.onloaded``); the non-block parts must already be on ``device``
    (``move_non_blocks``). The model is left as it was: weights, ``requires_grad`` flags, train/eval mode.
    """
    blocks = find_blocks(model)
    weights = [[layer.weight for layer in find_linears(block).values()] for block in blocks]
    sizes = [sum(p.numel() for p in params) for params in weights]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    accumulate = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    totals = torch.zeros(len(blocks), dtype=accumulate, device=device)
    count = 0
    model.eval()  # the recomputed forward must match the first one (no dropout)
    for p, _ in requires:
        p.requires_grad_(False)
    try:
        for window in tqdm(windows, desc="fisher trace", unit="window", disable=not progress):
            _window_squared_gradients(model, blocks, weights, window, device, offload, totals)
            count += 1
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        model.train(training)
    return [total / max(count, 1) / size for total, size in zip(totals.tolist(), sizes)]
