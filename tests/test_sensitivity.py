import numpy as np
import pytest
import torch

from conftest import build_model, tiny_llama_config
from pruning.load import find_blocks, find_linears
from scoring.evaluator import CandidateEvaluator
from scoring.sensitivity import Sensitivity, plot_sensitivity, shapley_plan, shapley_sensitivity


@pytest.fixture(scope="module")
def fragile_evaluator():
    """A tiny model whose block 2 is made fragile: its weights are large, so pruning it hurts most."""
    torch.manual_seed(0)
    model = build_model(tiny_llama_config())
    for layer in find_linears(find_blocks(model)[2]).values():
        layer.weight.data *= 6.0
    return CandidateEvaluator(model, torch.randint(3, 120, (4, 32)), torch.randint(3, 120, (4, 32)),
                              torch.device("cpu"), batch_size=2, progress=False)


def test_exact_shapley_on_model_is_efficient_and_finds_fragile_block(fragile_evaluator):
    result = shapley_sensitivity(fragile_evaluator, 0.6, estimator="exact", progress=False)
    assert result.evaluations == 16
    full = fragile_evaluator.coalition_fitness(frozenset(range(4)), 0.6)
    assert sum(result.values) == pytest.approx(full, rel=1e-6)  # efficiency: v(all) - v(empty), v(empty) = 0
    assert int(np.argmax(result.values)) == 2


def test_sliding_and_permutation_agree_on_the_fragile_block(fragile_evaluator):
    sliding = shapley_sensitivity(fragile_evaluator, 0.6, estimator="sliding", window=2, progress=False)
    sampled = shapley_sensitivity(fragile_evaluator, 0.6, estimator="permutation", permutations=4, progress=False)
    assert int(np.argmax(sliding.values)) == int(np.argmax(sampled.values)) == 2
    assert sampled.stderr is not None and len(sampled.stderr) == 4
    assert sliding.evaluations == len(shapley_plan(4, "sliding", window=2))


def test_plot_is_written(tmp_path):
    path = tmp_path / "s.png"
    plot_sensitivity(Sensitivity("fisher", [1.0, 3.0, 2.0]), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
