from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import scoring.fisher as fisher
from conftest import build_model, tiny_llama_config, tiny_opt_config
from pruning.load import find_blocks, find_linears
from scoring.fisher import block_fisher_traces
from scoring.levels import outlier_ratio


def tiny_gemma3_text_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=123, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                            max_position_embeddings=256,
                            # strong enough to change the traces by ~4%: the head must be the model's own
                            final_logit_softcapping=1.0)


CONFIGS = {"llama": tiny_llama_config, "opt": tiny_opt_config, "gemma3": tiny_gemma3_text_config}


# --- reference: the old computation, one backward through the whole model per window --------------

def empirical_fisher_trace(loss_fn, samples, groups):
    """Per parameter group: mean over samples of Σ (∂loss/∂θ)², divided by the group's size."""
    params = [p for group in groups for p in group]
    sums = [0.0 for _ in groups]
    for sample in samples:
        grads = torch.autograd.grad(loss_fn(sample), params, allow_unused=True)
        offset = 0
        for index, group in enumerate(groups):
            sums[index] += sum(float(g.float().pow(2).sum()) for g in grads[offset : offset + len(group)] if g is not None)
            offset += len(group)
    return [total / len(samples) / sum(p.numel() for p in group) for total, group in zip(sums, groups)]


def full_backprop_traces(model, windows, device):
    groups = [[layer.weight for layer in find_linears(block).values()] for block in find_blocks(model)]
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for group in groups:
        for p in group:
            p.requires_grad_(True)

    def nll(window):
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    try:
        return empirical_fisher_trace(nll, list(windows), groups)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)


def test_reference_fisher_trace_equals_hand_computed_value_on_a_linear_model():
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    b = torch.tensor([0.1], requires_grad=True)
    samples = [(torch.tensor([1.0, 2.0, 0.0]), 1.0), (torch.tensor([0.0, 1.0, -1.0]), -2.0)]

    def loss(sample):
        x, y = sample
        return 0.5 * (x @ w + b[0] - y) ** 2

    # d loss / d w = r x, with residual r = w.x + b - y: r1 = 0.5-2+0.1-1 = -2.4, r2 = -1-2+0.1+2 = -0.9
    expected_w = ((2.4**2) * (1 + 4 + 0) + (0.9**2) * (0 + 1 + 1)) / 2 / 3
    expected_b = (2.4**2 + 0.9**2) / 2 / 1
    assert empirical_fisher_trace(loss, samples, [[w], [b]]) == pytest.approx([expected_w, expected_b])


# --- the block-by-block computation ----------------------------------------------------------------

def _windows(seed=0, n=3, seqlen=16):
    return torch.randint(3, 120, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_block_by_block_traces_equal_full_backprop(arch, offload):
    model = build_model(CONFIGS[arch]())
    windows = _windows(seqlen=24)  # longer than gemma's sliding window of 8
    expected = full_backprop_traces(model, windows, torch.device("cpu"))
    traces = block_fisher_traces(model, windows, torch.device("cpu"), progress=False, offload=offload)
    assert len(traces) == len(find_blocks(model)) and all(t > 0 for t in traces)
    assert traces == pytest.approx(expected, rel=1e-4)


def _requires_grad_probe(model):
    """Hooks recording, at every block call and at the LM head, how many blocks have weights requiring
    grad and how many weights require grad in the whole model."""
    blocks = find_blocks(model)
    seen = []

    def record(*_):
        blocks_needing = sum(any(p.requires_grad for p in block.parameters()) for block in blocks)
        weights_needing = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen.append((blocks_needing, weights_needing))

    handles = [block.register_forward_pre_hook(record) for block in blocks]
    handles.append(model.get_output_embeddings().register_forward_pre_hook(record))
    return seen, handles


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_at_most_one_block_requires_grad_at_a_time(arch):
    model = build_model(CONFIGS[arch]())
    blocks = find_blocks(model)
    per_block = max(sum(lin.weight.numel() for lin in find_linears(b).values()) for b in blocks)
    seen, handles = _requires_grad_probe(model)
    try:
        block_fisher_traces(model, _windows(n=2), torch.device("cpu"), progress=False)
        after = list(seen)
        seen.clear()
        full_backprop_traces(model, _windows(n=2), torch.device("cpu"))
        before = list(seen)
    finally:
        for handle in handles:
            handle.remove()
    assert max(b for b, _ in after) == 1 and max(w for _, w in after) == per_block
    # the old computation had every block's weights requiring grad
    assert max(b for b, _ in before) == len(blocks)


def test_offload_onloads_one_block_at_a_time(monkeypatch):
    model = build_model(tiny_llama_config())
    depth, deepest, calls = [0], [0], []
    real = fisher.onloaded

    @contextmanager
    def counting(block, device, write_back=False):
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        calls.append(block)
        try:
            with real(block, device, write_back) as moved:
                yield moved
        finally:
            depth[0] -= 1

    monkeypatch.setattr(fisher, "onloaded", counting)
    block_fisher_traces(model, _windows(n=2), torch.device("cpu"), progress=False, offload=True)
    assert deepest[0] == 1
    assert len(calls) == 2 * 2 * len(find_blocks(model))  # forward and recompute, per window


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_block_fisher_traces_leave_model_untouched(arch):
    model = build_model(CONFIGS[arch]())
    blocks = find_blocks(model)
    originals = list(blocks)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(False)  # a mixed set of flags, restored as it was
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    traces = block_fisher_traces(model, _windows(), torch.device("cpu"), progress=False)
    assert len(traces) == len(blocks) and all(t > 0 for t in traces)
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert list(find_blocks(model)) == originals and not model.training


def test_outlier_ratio_counts_scores_above_m_times_mean():
    block_a = [torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]])]
    block_b = [torch.ones(1, 10), torch.ones(2, 5)]
    # mean of block a = 10.9, 5 x mean = 54.5: one score of ten above it
    assert outlier_ratio(block_a, 5) == pytest.approx(0.1)
    assert outlier_ratio(block_b, 5) == 0.0
