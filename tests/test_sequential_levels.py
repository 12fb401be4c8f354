"""Rank tables refreshed from an incumbent's sequential activations reproduce the final Wanda pass."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, build_model, tiny_llama_config, tiny_opt_config
from core.profile import Profile
from pruning.load import find_blocks, find_linears
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.levels import build_rank_tables, sequential_rank_tables

CPU = torch.device("cpu")
BATCH = 4
UNSTRUCTURED = Profile((0.3, 0.6, 0.5, 0.7))
MIXED_NM = Profile((0.5, 0.6, 0.5, 0.7), ((2, 4), None, (2, 4), None))
CONFIGS = {"llama": tiny_llama_config, "opt": lambda: tiny_opt_config(layers=4)}


def _calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def _final_pass_zeros(model, calibration: torch.Tensor, profile: Profile) -> list[dict[str, torch.Tensor]]:
    """Zero pattern of every linear after the real sequential Wanda pass (on a copy of ``model``)."""
    pruned = copy.deepcopy(model)
    prune_sequentially(pruned, calibration, profile, get_pruner("wanda"), CPU, batch_size=BATCH, progress=False)
    return [{name: layer.weight == 0 for name, layer in find_linears(block).items()} for block in find_blocks(pruned)]


def _differing_blocks(tables, zeros, profile: Profile) -> list[int]:
    """Blocks where some linear's table mask at the profile's level is not the final pass's zeros."""
    return [l for l, block in enumerate(zeros)
            if any(not torch.equal(tables.tables[l][name].mask(profile.sparsities[l], profile.pattern(l)), z)
                   for name, z in block.items())]


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("profile", [UNSTRUCTURED, MIXED_NM], ids=["unstructured", "mixed-2:4"])
def test_incumbent_tables_reproduce_final_pass(family, profile):
    model = build_model(CONFIGS[family]())
    calibration = _calibration()
    zeros = _final_pass_zeros(model, calibration, profile)
    assert all(not (layer.weight == 0).any() for block in find_blocks(model) for layer in find_linears(block).values())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    refreshed = sequential_rank_tables(model, calibration, profile, CPU, batch_size=BATCH, progress=False)

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model's weights changed"
    assert _differing_blocks(refreshed, zeros, profile) == []

    dense = build_rank_tables(model, calibration, lambda _l: CPU, lambda _l: CPU, "wanda", BATCH, progress=False)
    differing = _differing_blocks(dense, zeros, profile)
    print(f"{family} {profile.to_json()}: dense tables differ on blocks {differing}")
    assert 0 not in differing  # block 0 sees the same (dense) inputs either way
    assert differing, "dense-activation tables should miss the final pass's masks past block 0"
    # Block 0's refreshed tables are the dense ones (same inputs, same weights).
    assert all(torch.equal(refreshed.tables[0][n].stored, dense.tables[0][n].stored) for n in dense.tables[0])


def test_incumbent_needs_one_level_per_block():
    from core.errors import SparseAllocError

    model = build_model(tiny_llama_config())
    with pytest.raises(SparseAllocError):
        sequential_rank_tables(model, _calibration(), Profile((0.5, 0.5)), CPU, progress=False)
    with pytest.raises(SparseAllocError):
        build_rank_tables(model, _calibration(), lambda _l: CPU, lambda _l: CPU, "magnitude", progress=False,
                          incumbent=UNSTRUCTURED)


def test_refreshed_evaluator_scores_the_model_the_final_pass_ships():
    """After ``refresh_ranks(incumbent)`` the evaluator's perplexity of the incumbent is the real
    pruned model's on the same windows; with the dense-activation tables it is not."""
    from scoring.evaluator import CandidateEvaluator
    from scoring.perplexity import perplexity

    model = build_model(tiny_llama_config())
    calibration = _calibration()
    fitness = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    pruned = copy.deepcopy(model)
    prune_sequentially(pruned, calibration, UNSTRUCTURED, get_pruner("wanda"), CPU, batch_size=BATCH,
                       progress=False)
    shipped = perplexity(pruned, fitness, CPU, BATCH, progress=False)

    evaluator = CandidateEvaluator(model, calibration, fitness, CPU, batch_size=BATCH, progress=False)
    dense_tables = evaluator.fitness(UNSTRUCTURED, metric="ppl")
    evaluator.refresh_ranks(calibration, UNSTRUCTURED)
    refreshed = evaluator.fitness(UNSTRUCTURED, metric="ppl")
    assert refreshed == pytest.approx(shipped, rel=1e-5)
    assert abs(dense_tables - shipped) > 1e-4 * shipped


def test_kl_seq_scores_each_profile_with_its_own_sequential_masks():
    """``kl-seq`` = KL after refreshing the tables for that very profile (on ``sequential_windows``
    calibration windows), profile by profile in one batch; the dense tables are back afterwards."""
    from scoring.evaluator import CandidateEvaluator

    model = build_model(tiny_llama_config())
    calibration = _calibration()
    fitness = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    windows = 2
    evaluator = CandidateEvaluator(model, calibration, fitness, CPU, batch_size=BATCH, progress=False,
                                   sequential_windows=windows)
    other = Profile(tuple(0.3 + 0.1 * (l % 3) for l in range(len(UNSTRUCTURED))))
    dense = evaluator.fitness_many([UNSTRUCTURED, other], metric="kl")
    sequential = evaluator.fitness_many([UNSTRUCTURED, other], metric="kl-seq")
    assert evaluator.fitness_many([UNSTRUCTURED, other], metric="kl") == dense  # dense tables restored
    expected = []
    for profile in (UNSTRUCTURED, other):
        evaluator.refresh_ranks(calibration[:windows], profile)
        expected.append(evaluator.fitness(profile, metric="kl"))
    assert sequential == pytest.approx(expected, rel=1e-6)
    assert all(abs(s - d) > 1e-6 for s, d in zip(sequential, dense))

    # A failure part-way through a batch leaves the dense tables in place.
    evaluator = CandidateEvaluator(model, calibration, fitness, CPU, batch_size=BATCH, progress=False,
                                   sequential_windows=windows)
    real_refresh, calls = evaluator.refresh_ranks, []

    def failing(calibration_windows, profile):
        calls.append(profile)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        real_refresh(calibration_windows, profile)

    evaluator.refresh_ranks = failing
    with pytest.raises(RuntimeError):
        evaluator.fitness_many([UNSTRUCTURED, other], metric="kl-seq")
    assert evaluator.fitness_many([UNSTRUCTURED, other], metric="kl") == dense
