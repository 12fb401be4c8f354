"""Block offloading in the final pass and in perplexity: the same numbers as the in-memory paths,
with one block on the device at a time.

This machine has no GPU, so ``device`` is the CPU and the real ``onloaded`` has nothing to move.
``SimulatedDevice`` stands in for it: inside the ``with`` the block's tensors are replaced by copies
(its "device" copies), written back to the host tensors only when asked, and every block checks, as
it runs, that it is the one block onloaded right now.
"""

from contextlib import contextmanager

import pytest
import torch

from conftest import build_model, tiny_gemma3_config, tiny_llama_config, tiny_opt_config
from orchestrator.passes.prune import choose_offload
from pruning.offload import _slots  # the tensors onloaded moves, so the stand-in moves the same ones
from pruning.load import find_blocks, find_linears
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.perplexity import mean_nll, perplexity
from core.profile import Profile

CPU = torch.device("cpu")
PROFILE = Profile((0.5, 0.3, 0.6, 0.0))


def _gemma3_softcapped():
    config = tiny_gemma3_config()
    config.final_logit_softcapping = 30.0  # the head must be the model's own (logits / 30, tanh, × 30)
    return config


MODELS = {"llama": tiny_llama_config, "opt": lambda: tiny_opt_config(layers=4), "gemma3": _gemma3_softcapped}


class SimulatedDevice:
    """A stand-in for ``pruning.offload.onloaded`` that really swaps a block's tensors for copies."""

    def __init__(self, model) -> None:
        self.active = None
        self.onloads: list[tuple[int, bool]] = []  # (block index, write_back)
        self.index = {id(block): i for i, block in enumerate(find_blocks(model))}
        for block in find_blocks(model):
            block.register_forward_pre_hook(self._check_running)

    def _check_running(self, block, _args):
        assert self.active is block, f"block {self.index[id(block)]} ran without being onloaded"

    @contextmanager
    def __call__(self, block, device, write_back=False):
        assert self.active is None, "two blocks onloaded at once"
        self.active = block
        self.onloads.append((self.index[id(block)], write_back))
        slots = list(_slots(block))
        homes = [owner._parameters[n].data if p else owner._buffers[n] for owner, n, p in slots]
        for (owner, name, is_param), home in zip(slots, homes):
            if is_param:
                owner._parameters[name].data = home.clone()
            else:
                owner._buffers[name] = home.clone()
        try:
            yield block
        finally:
            for (owner, name, is_param), home in zip(slots, homes):
                current = owner._parameters[name].data if is_param else owner._buffers[name]
                if write_back:
                    home.copy_(current)
                if is_param:
                    owner._parameters[name].data = home
                else:
                    owner._buffers[name] = home
            self.active = None


def _windows(config, count=6, seqlen=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (count, seqlen), generator=generator)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_offloaded_pass_writes_exactly_the_in_memory_weights(arch, pruner, monkeypatch):
    config = MODELS[arch]()
    calibration = _windows(config)
    in_memory, offloaded, dense = build_model(config), build_model(config), build_model(config)
    prune_sequentially(in_memory, calibration, PROFILE, get_pruner(pruner), CPU, batch_size=4, progress=False)
    device = SimulatedDevice(offloaded)
    monkeypatch.setattr("pruning.sequential.onloaded", device)
    prune_sequentially(offloaded, calibration, PROFILE, get_pruner(pruner), CPU, batch_size=4, progress=False,
                       offload=True)

    expected, got = in_memory.state_dict(), offloaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after the offloaded {pruner} pass"
    # The pass did prune (so the equality above is not that of two dense models) ...
    pruned = find_linears(find_blocks(offloaded)[0])
    assert all((layer.weight == 0).float().mean() >= 0.49 for layer in pruned.values())
    # ... block by block, one at a time, writing back only what it pruned.
    blocks = range(4) if get_pruner(pruner).needs_inputs else range(3)  # magnitude skips the dense block
    assert device.onloads == [(i, PROFILE.sparsities[i] > 0) for i in blocks]
    dense_last = find_linears(find_blocks(dense)[3])
    for name, layer in find_linears(find_blocks(offloaded)[3]).items():
        assert torch.equal(layer.weight, dense_last[name].weight), "a block at sparsity 0 changed"


def test_offloaded_pass_with_the_real_onloaded_on_the_cpu():
    """On the CPU the real ``onloaded`` moves nothing; the pass still writes the in-memory weights."""
    config = tiny_llama_config()
    calibration = _windows(config)
    in_memory, offloaded = build_model(config), build_model(config)
    for model, offload in ((in_memory, False), (offloaded, True)):
        prune_sequentially(model, calibration, PROFILE, get_pruner("sparsegpt"), CPU, batch_size=4, progress=False,
                           offload=offload)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, offloaded.state_dict()[name])


@pytest.mark.parametrize("arch", list(MODELS))
def test_offloaded_perplexity_equals_the_in_memory_perplexity(arch, monkeypatch):
    config = MODELS[arch]()
    model = build_model(config)
    windows = _windows(config, count=5, seed=1)  # 5 windows in batches of 2: a short last batch
    expected_nll, expected_count = mean_nll(model, windows, CPU, batch_size=2, progress=False)
    expected = perplexity(model, windows, CPU, batch_size=2, progress=False)
    device = SimulatedDevice(model)
    monkeypatch.setattr("scoring.perplexity.onloaded", device)
    nll, count = mean_nll(model, windows, CPU, batch_size=2, progress=False, offload=True)
    assert count == expected_count == 5 * 23
    assert nll == pytest.approx(expected_nll, rel=1e-5)
    assert perplexity(model, windows, CPU, batch_size=2, progress=False, offload=True) == \
        pytest.approx(expected, rel=1e-5)
    assert [i for i, _ in device.onloads] == list(range(4)) * 2 and not any(w for _, w in device.onloads)
    assert all(isinstance(b, type(find_blocks(model)[0])) for b in find_blocks(model)), "blocks restored"


def test_offload_is_chosen_when_weights_and_activations_exceed_free_device_memory():
    assert choose_offload(None, 10, 5, None) is False  # CPU: never
    assert choose_offload(None, 10, 5, 16) is False
    assert choose_offload(None, 10, 5, 14) is True
    assert choose_offload(True, 10, 5, None) is True and choose_offload(False, 10, 5, 1) is False
