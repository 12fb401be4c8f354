import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, tiny_llama_config
from pruning.load import find_blocks, find_linears
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.evaluator import CandidateEvaluator
from scoring.perplexity import perplexity
from search_spaces.profile import Profile

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(tiny_llama_config())
    calibration = torch.randint(3, 120, (6, 32))
    fitness_windows = torch.randint(3, 120, (5, 32))
    evaluator = CandidateEvaluator(model, calibration, fitness_windows, CPU, batch_size=2, progress=False)
    return model, calibration, fitness_windows, evaluator


def _masked_copy(evaluator, profile):
    model = build_model(tiny_llama_config())
    for l, sparsity in enumerate(profile.sparsities):
        for name, layer in find_linears(find_blocks(model)[l]).items():
            if sparsity > 0:
                layer.weight.data[evaluator.tables[l][name].mask(sparsity)] = 0
    return model


@pytest.mark.parametrize("block", [0, 2])
def test_score_table_mask_equals_wandas_own_mask(setup, block):
    """With dense blocks before it, Wanda's sequential mask for a block is the table's mask."""
    _, calibration, _, evaluator = setup
    model = build_model(tiny_llama_config())
    sparsities = [0.0] * 4
    sparsities[block] = 0.6
    prune_sequentially(model, calibration, Profile(tuple(sparsities)), get_pruner("wanda"), CPU, batch_size=2,
                       progress=False)
    for name, layer in find_linears(find_blocks(model)[block]).items():
        assert torch.equal(layer.weight == 0, evaluator.tables[block][name].mask(0.6)), name


def test_dense_profile_has_zero_kl_and_pruning_hurts_more_with_sparsity(setup):
    _, _, _, evaluator = setup
    assert evaluator.fitness(Profile.uniform(4, 0.0)) == pytest.approx(0.0, abs=1e-3)
    low, high = evaluator.fitness(Profile.uniform(4, 0.3)), evaluator.fitness(Profile.uniform(4, 0.8))
    assert 0 < low < high


def test_cached_start_equals_full_forward(setup):
    model, _, windows, evaluator = setup
    dense_model = build_model(tiny_llama_config())
    pruned = _masked_copy(evaluator, Profile((0.0, 0.0, 0.5, 0.5)))
    with torch.no_grad():
        p = F.log_softmax(dense_model(windows).logits[:, :-1], -1)
        q = F.log_softmax(pruned(windows).logits[:, :-1], -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert evaluator.coalition_fitness(frozenset({2, 3}), 0.5) == pytest.approx(expected, rel=2e-3)
    # weights restored after the evaluation
    for layer_a, layer_b in zip(find_linears(find_blocks(model)[2]).values(),
                                find_linears(find_blocks(dense_model)[2]).values()):
        assert torch.equal(layer_a.weight, layer_b.weight)


def test_perplexity_metric_and_fidelity(setup):
    _, _, windows, evaluator = setup
    profile = Profile((0.5, 0.0, 0.3, 0.0))
    assert evaluator.fitness(profile, metric="ppl") == pytest.approx(
        perplexity(_masked_copy(evaluator, profile), windows, CPU, progress=False), rel=1e-4)
    first_two = perplexity(_masked_copy(evaluator, profile), windows[:2], CPU, progress=False)
    assert evaluator.fitness(profile, tokens=64, metric="ppl") == pytest.approx(first_two, rel=1e-4)


@pytest.mark.parametrize("sparsity,nm", [(0.0, None), (0.3, None), (0.7, None), (0.5, (2, 4))])
def test_pruned_copy_equals_weight_with_mask_applied(setup, sparsity, nm):
    _, _, _, evaluator = setup
    for name, scores in evaluator.tables[1].items():
        dense = evaluator._dense[1][name]
        expected = dense.masked_fill(scores.mask(sparsity, nm), 0)
        assert torch.equal(scores.pruned(dense, sparsity, nm), expected), name
    assert torch.count_nonzero(evaluator._dense[1]["mlp.up_proj"]) == evaluator._dense[1]["mlp.up_proj"].numel()
