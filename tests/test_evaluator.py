import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, tiny_llama_config
from pruning.load import find_blocks, find_linears
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.evaluator import CandidateEvaluator
from scoring.perplexity import perplexity
from core.errors import SparseAllocError
from core.profile import Profile

CPU = torch.device("cpu")


def _weight(evaluator, block, name):
    return find_linears(find_blocks(evaluator.model)[block])[name].weight.data


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
        dense = _weight(evaluator, 1, name)
        expected = dense.masked_fill(scores.mask(sparsity, nm), 0)
        assert torch.equal(scores.pruned(dense, sparsity, nm), expected), name
    up = _weight(evaluator, 1, "mlp.up_proj")
    assert torch.count_nonzero(up) == up.numel()


def test_rank_mask_removes_each_rows_lowest_scores():
    from pruning.masks import row_mask
    from pruning.masks import nm_mask
    from scoring.levels import RankTable

    scores = torch.rand(7, 48, generator=torch.Generator().manual_seed(3))
    table = RankTable.from_scores(scores)
    assert table.stored.dtype == torch.int16 and table.nbytes == 2 * scores.numel()
    for sparsity in (0.0, 0.1, 0.5, 0.93):
        assert torch.equal(table.mask(sparsity), row_mask(scores, sparsity)), sparsity
    for nm in ((1, 4), (2, 4), (3, 4), (4, 8)):
        assert torch.equal(table.mask(0.0, nm), nm_mask(scores, *nm)), nm


def test_pruned_into_buffer_leaves_the_dense_weight_untouched(setup):
    _, _, _, evaluator = setup
    scores, dense = evaluator.tables[0]["mlp.up_proj"], _weight(evaluator, 0, "mlp.up_proj")
    before = dense.clone()
    buffer = torch.empty_like(dense)
    assert scores.pruned(dense, 0.6, out=buffer) is buffer
    assert torch.equal(buffer, dense.masked_fill(scores.mask(0.6), 0))
    assert torch.equal(dense, before)


def test_scratch_buffers_reused_across_candidates_give_fresh_evaluator_results(setup):
    """Masks are written just in time into shared scratch buffers; a later candidate never sees an
    earlier one's masked weights."""
    model, calibration, windows, evaluator = setup
    sequence = [Profile((0.5, 0.3, 0.5, 0.7)), Profile((0.5, 0.6, 0.5, 0.0)),
                Profile((0.5, 0.5, 0.5, 0.5), nm=((2, 4), None, None, None)), Profile((0.5, 0.3, 0.5, 0.7))]
    values = [evaluator.fitness(profile) for profile in sequence]
    assert values[0] == values[3]
    assert len(set(values[:3])) == 3
    for profile, value in zip(sequence, values):
        fresh = CandidateEvaluator(build_model(tiny_llama_config()), calibration, windows, CPU, batch_size=2,
                                   progress=False)
        assert fresh.fitness(profile) == pytest.approx(value, rel=1e-6)


def test_kl_chunking_does_not_change_fitness(setup):
    _, _, _, evaluator = setup
    profile = Profile((0.6, 0.2, 0.0, 0.4))
    whole = evaluator.fitness(profile), evaluator.fitness(profile, metric="ppl")
    chunk, evaluator._kl_chunk = evaluator._kl_chunk, 5
    try:
        chunked = evaluator.fitness(profile), evaluator.fitness(profile, metric="ppl")
    finally:
        evaluator._kl_chunk = chunk
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_draws_score_their_own_random_minibatch(setup):
    """draw 0 at n windows = the first n; draw d > 0 = a random minibatch of n windows fixed by d, scored
    like an evaluator built on exactly those windows."""
    _, calibration, windows, evaluator = setup
    assert evaluator.window_ids(64) == [0, 1] and evaluator.window_ids(None, draw=7) == [0, 1, 2, 3, 4]
    draws = [tuple(evaluator.window_ids(64, draw=d)) for d in range(1, 9)]
    assert all(len(set(d)) == 2 for d in draws) and len(set(draws)) > 3, "different minibatches"
    assert evaluator.window_ids(64, draw=3) == evaluator.window_ids(64, draw=3)
    profile = Profile((0.0, 0.5, 0.2, 0.6))
    for draw in (1, 2):
        ids = evaluator.window_ids(64, draw)
        own = CandidateEvaluator(build_model(tiny_llama_config()), calibration, windows[ids], CPU, batch_size=2,
                                 progress=False)
        for metric in ("kl", "ppl"):
            assert evaluator.fitness(profile, 64, metric, draw) == pytest.approx(own.fitness(profile, metric=metric),
                                                                                 rel=1e-5)
    with pytest.raises(SparseAllocError, match="exceeds"):
        evaluator.window_ids(6 * 32)
