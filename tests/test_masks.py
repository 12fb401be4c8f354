import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.masks import layer_mask, nm_mask, row_mask
from pruning.pruners import InputNorms, magnitude_mask, wanda_mask


def _brute_force_wanda(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row: score_ij = |W_ij| * ||X_j||_2 / sqrt(tokens); remove the round(cols*s) lowest."""
    rows, cols = weight.shape
    tokens = inputs.shape[0]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = []
        for j in range(cols):
            norm = sum(float(inputs[t, j]) ** 2 for t in range(tokens)) ** 0.5 / tokens**0.5
            scores.append((abs(float(weight[i, j])) * norm, j))
        for _, j in sorted(scores)[: round(cols * sparsity)]:
            mask[i, j] = True
    return mask


def test_wanda_mask_equals_brute_force_reference():
    torch.manual_seed(0)
    weight = torch.randn(6, 16)
    inputs = torch.randn(40, 16) * torch.linspace(0.1, 5.0, 16)  # feature scales differ, as in LLMs
    norms = InputNorms(16, torch.device("cpu"))
    norms.add(inputs[:25].reshape(5, 5, 16))  # statistics accumulated over two batches
    norms.add(inputs[25:])
    for sparsity in (0.25, 0.5, 0.75):
        assert torch.equal(wanda_mask(weight, norms, sparsity), _brute_force_wanda(weight, inputs, sparsity))


def test_wanda_differs_from_magnitude_when_inputs_have_outliers():
    torch.manual_seed(1)
    weight = torch.randn(8, 32)
    norms = InputNorms(32, torch.device("cpu"))
    norms.add(torch.randn(100, 32) * torch.where(torch.arange(32) < 4, 50.0, 1.0))
    wanda = wanda_mask(weight, norms, 0.5)
    assert not wanda[:, :4].any(), "outlier input features must keep their weights"
    assert not torch.equal(wanda, magnitude_mask(weight, 0.5))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 1000))
def test_row_mask_has_exact_sparsity_in_every_row(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = row_mask(scores, sparsity)
    assert (mask.sum(1) == round(cols * sparsity)).all()
    # the removed weights are the lowest of their row
    for i in range(rows):
        if 0 < mask[i].sum() < cols:
            assert scores[i][mask[i]].max() <= scores[i][~mask[i]].min()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 10), groups=st.integers(1, 8), nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (2, 8)]))
def test_nm_mask_has_n_zeros_in_every_group(rows, groups, nm):
    n, m = nm
    scores = torch.rand(rows, groups * m)
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()


def test_layer_mask_removes_globally_smallest():
    scores = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    mask = layer_mask(scores, 0.3)
    assert mask.sum() == 6 and mask.flatten()[:6].all() and not mask.flatten()[6:].any()
