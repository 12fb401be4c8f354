import pytest
import torch

from conftest import build_model, tiny_llama_config
from pruning.score_table import LinearScores
from scoring.fisher import block_fisher_traces, empirical_fisher_trace
from scoring.outliers import outlier_ratios


def test_fisher_trace_equals_hand_computed_value_on_a_linear_model():
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    b = torch.tensor([0.1], requires_grad=True)
    samples = [(torch.tensor([1.0, 2.0, 0.0]), 1.0), (torch.tensor([0.0, 1.0, -1.0]), -2.0)]

    def loss(sample):
        x, y = sample
        return 0.5 * (x @ w + b[0] - y) ** 2

    # d loss / d w = r x, with residual r = w.x + b - y: r1 = 0.5-2+0.1-1 = -2.4, r2 = -1-2+0.1+2 = -0.9
    expected_w = ((2.4**2) * (1 + 4 + 0) + (0.9**2) * (0 + 1 + 1)) / 2 / 3
    expected_b = (2.4**2 + 0.9**2) / 2 / 1
    traces = empirical_fisher_trace(loss, samples, [[w], [b]])
    assert traces == pytest.approx([expected_w, expected_b])


def test_block_fisher_traces_are_positive_and_leave_model_untouched():
    model = build_model(tiny_llama_config())
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    traces = block_fisher_traces(model, torch.randint(3, 120, (3, 16)), torch.device("cpu"), progress=False)
    assert len(traces) == 4 and all(t > 0 for t in traces)
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_outlier_ratio_counts_scores_above_m_times_mean():
    block_a = {"x": LinearScores.from_scores(torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]]))}
    block_b = {"x": LinearScores.from_scores(torch.ones(1, 10)), "y": LinearScores.from_scores(torch.ones(2, 5))}
    # mean of block a = 10.9, 5 x mean = 54.5: one score of ten above it
    assert outlier_ratios([block_a, block_b], multiplier=5) == [pytest.approx(0.1), 0.0]
