"""Resident and streamed evaluators, populations with shared prefixes, memory budgets, devices."""

import random

import pytest
import torch

from conftest import build_model, tiny_llama_config, tiny_opt_config
from core.errors import SparseAllocError
from pruning.load import block_param_counts
from scoring.evaluator import CandidateEvaluator
from search_spaces import families
from core.profile import Profile
from test_capture import _gemma3_config

CPU = torch.device("cpu")
CONFIGS = {"llama": tiny_llama_config, "opt": tiny_opt_config, "gemma3": _gemma3_config}


def _evaluator(config_fn, **kwargs):
    torch.manual_seed(0)
    config = config_fn()
    vocab = config.vocab_size
    calibration = torch.randint(3, vocab, (4, 24), generator=torch.Generator().manual_seed(1))
    windows = torch.randint(3, vocab, (5, 24), generator=torch.Generator().manual_seed(2))
    return CandidateEvaluator(build_model(config), calibration, windows, kwargs.pop("device", CPU), batch_size=2,
                              progress=False, **kwargs)


def _profiles(n: int, weights: list[int]) -> list[Profile]:
    rng = random.Random(0)
    free = families.free_vector([rng.uniform(0.2, 0.8) for _ in range(n)], 0.5, weights, 0.0, 0.95)
    return [
        families.uniform(n, 0.5),
        families.atp(n, 0.5, families.atp_beta_max(n, 0.5) / 2),
        free,
        Profile.uniform_nm(n, (2, 4)),
        Profile(tuple([0.0] * (n - 1) + [0.6])),  # dense prefix: starts from the cached inputs
        Profile(free.sparsities[:1] + (0.3,) * (n - 1)),  # shares block 0 with `free`
        Profile(tuple(0.5 for _ in range(n)), nm=tuple([(2, 4)] + [None] * (n - 1))),  # shares with uniform after 0
    ]


@pytest.mark.parametrize("family", CONFIGS)
def test_streamed_and_resident_give_the_same_fitness(family):
    resident = _evaluator(CONFIGS[family], mode="resident")
    streamed = _evaluator(CONFIGS[family], mode="streamed")
    profiles = _profiles(resident.num_blocks, resident.block_weights)
    alone = [resident.fitness(p) for p in profiles]
    assert len(set(alone)) == len(alone), "the profiles are distinct and so are their fitnesses"
    together = streamed.fitness_many(profiles)  # one population: shared prefixes share hidden states
    assert together == pytest.approx(alone, rel=1e-5)
    assert [streamed.fitness(p) for p in profiles] == pytest.approx(alone, rel=1e-5)
    ppl = resident.fitness_many(profiles, tokens=48, metric="ppl", draw=1)
    assert streamed.fitness_many(profiles, tokens=48, metric="ppl", draw=1) == pytest.approx(ppl, rel=1e-5)


def test_population_equals_one_at_a_time_and_repeats_are_free():
    evaluator = _evaluator(tiny_llama_config)
    profiles = _profiles(evaluator.num_blocks, evaluator.block_weights)
    alone = [evaluator.fitness(p) for p in profiles]
    assert evaluator.fitness_many(profiles + profiles[:2]) == pytest.approx(alone + alone[:2], rel=1e-6)


def test_reference_from_hidden_states_equals_the_logprob_cache():
    cached = _evaluator(tiny_llama_config, reference="logprobs")
    recomputed = _evaluator(tiny_llama_config, reference="hidden")
    assert recomputed._dense_logprobs is None and cached._dense_logprobs is not None
    profiles = _profiles(cached.num_blocks, cached.block_weights)
    assert recomputed.fitness_many(profiles) == pytest.approx(cached.fitness_many(profiles), rel=1e-6)


def test_a_cache_of_the_leading_windows_gives_the_same_kl_with_fewer_head_passes(monkeypatch):
    import scoring.evaluator as evaluator_module

    vocab = tiny_llama_config().vocab_size
    monkeypatch.setattr(evaluator_module, "LOGPROB_CACHE_LIMIT", 2 * 23 * vocab * 4)  # 2 of the 5 windows
    mixed = _evaluator(tiny_llama_config)
    recomputed = _evaluator(tiny_llama_config, reference="hidden")
    assert (mixed.reference, mixed.cached_windows, tuple(mixed._dense_logprobs.shape[:2])) == ("mixed", 2, (2, 23))
    profiles = _profiles(mixed.num_blocks, mixed.block_weights)
    for tokens, draw in ((None, 0), (48, 0), (48, 1), (72, 0)):
        assert mixed.fitness_many(profiles, tokens, draw=draw) == pytest.approx(
            recomputed.fitness_many(profiles, tokens, draw=draw), rel=1e-6)

    heads = []
    for evaluator in (mixed, recomputed):
        calls = [0]
        original = evaluator._logits

        def counted(*args, _original=original, _calls=calls):
            _calls[0] += 1
            return _original(*args)

        evaluator._logits = counted
        evaluator.fitness(profiles[0], tokens=72)  # windows 0, 1 (cached) and 2 (recomputed)
        heads.append(calls[0])
    assert heads == [3 + 1, 3 + 3]  # the pruned model's head per window, plus each uncached reference


def test_streamed_budget_below_the_weights_is_respected():
    model = build_model(tiny_llama_config())
    from pruning.offload import non_block_bytes, tensor_bytes

    blocks = sum(tensor_bytes(b) for b in model.model.layers)
    probe = _evaluator(tiny_llama_config, mode="streamed")
    budget = non_block_bytes(model) + int(1.5 * max(probe._block_cost))  # room for one block, not two
    assert budget < non_block_bytes(model) + blocks, "the budget is below the model's weights"
    evaluator = _evaluator(tiny_llama_config, mode="streamed", memory_budget=budget)
    assert evaluator._lookahead == 1
    evaluator.fitness_many(_profiles(evaluator.num_blocks, evaluator.block_weights))
    assert 0 < evaluator.peak_block_bytes <= budget - non_block_bytes(model)
    assert evaluator.peak_block_bytes == max(evaluator._block_cost)
    assert probe._lookahead == 2 and probe.fitness(Profile.uniform(4, 0.5)) > 0
    assert probe.peak_block_bytes == max(a + b for a, b in zip(probe._block_cost, probe._block_cost[1:]))
    assert evaluator.block_bytes_on_device == 0, "every block was released"


def test_streamed_budget_too_small_for_one_block_names_the_size():
    with pytest.raises(SparseAllocError, match=r"one block needs .* GiB.*give at least"):
        _evaluator(tiny_llama_config, mode="streamed", memory_budget=1000)


def test_resident_refuses_a_model_over_its_budget():
    with pytest.raises(SparseAllocError, match="--evaluator streamed"):
        _evaluator(tiny_llama_config, mode="resident", memory_budget=100_000)


def test_blocks_split_over_several_devices_give_the_same_fitness():
    one = _evaluator(tiny_llama_config)
    two = _evaluator(tiny_llama_config, device=[CPU, torch.device("cpu", 0)])
    assert [d.index for d in two._block_device] == [None, None, 0, 0]
    profiles = _profiles(one.num_blocks, one.block_weights)
    assert two.fitness_many(profiles) == pytest.approx(one.fitness_many(profiles), rel=1e-6)


def test_owl_ratios_counted_while_building():
    from scoring.levels import outlier_ratio

    evaluator = _evaluator(tiny_llama_config, owl_multipliers=(3, 5))
    assert len(evaluator.outlier_ratios(5)) == evaluator.num_blocks
    assert all(a >= b for a, b in zip(evaluator.outlier_ratios(3), evaluator.outlier_ratios(5)))
    scores = [torch.tensor([1.0] * 9 + [100.0])]
    assert outlier_ratio(scores, 5) == pytest.approx(0.1)
    with pytest.raises(SparseAllocError, match="counted for M"):
        evaluator.outlier_ratios(7)
