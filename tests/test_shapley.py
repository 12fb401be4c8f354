"""Shapley estimators on synthetic games whose Shapley values are known in closed form."""

from itertools import combinations

import numpy as np
import pytest

from core.errors import SparseAllocError
from scoring.shapley import (
    estimate,
    exact_plan,
    exact_shapley,
    permutation_plan,
    permutation_shapley,
    sliding_window_cost,
    sliding_window_plan,
    sliding_window_shapley,
)


def _pairwise_game(n: int, reach: int, seed: int, base: float = 3.0):
    """v(C) = base + Σ_{i∈C} a_i + Σ_{i<j∈C, j−i≤reach} b_ij, and its Shapley a_i + ½ Σ_j b_ij."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = np.triu(rng.normal(size=(n, n)), 1)
    b[np.abs(np.subtract.outer(np.arange(n), np.arange(n))) > reach] = 0.0

    def value(coalition: frozenset) -> float:
        idx = sorted(coalition)
        return base + a[idx].sum() + b[np.ix_(idx, idx)].sum()

    return value, a + 0.5 * (b + b.T).sum(axis=1)


def _random_game(n: int, seed: int) -> dict:
    """A generic game: an independent random value per coalition."""
    rng = np.random.default_rng(seed)
    return {c: float(rng.normal()) for c in exact_plan(n)}


def _table(value, n: int) -> dict:
    return {c: value(c) for c in exact_plan(n)}


def test_exact_additive_game_gives_the_weights():
    a = np.array([0.5, -1.0, 2.0, 0.25, 3.0])
    values = {c: 7.0 + sum(a[i] for i in c) for c in exact_plan(5)}
    np.testing.assert_allclose(exact_shapley(5, values), a, atol=1e-12)


def test_exact_pairwise_game_equals_closed_form():
    value, truth = _pairwise_game(7, reach=6, seed=1)
    np.testing.assert_allclose(exact_shapley(7, _table(value, 7)), truth, atol=1e-12)


def test_exact_is_efficient_on_a_generic_game():
    values = _random_game(6, seed=2)
    phi = exact_shapley(6, values)
    assert phi.sum() == pytest.approx(values[frozenset(range(6))] - values[frozenset()], abs=1e-12)


def test_exact_plan_is_every_subset_once_and_refuses_large_n():
    plan = exact_plan(4)
    assert len(plan) == len(set(plan)) == 16
    assert plan[0] == frozenset() and plan[-1] == frozenset(range(4))
    with pytest.raises(SparseAllocError, match="sampling|sliding"):
        exact_plan(13)


def test_missing_value_is_a_clear_error():
    values = _random_game(3, seed=0)
    del values[frozenset({0, 2})]
    with pytest.raises(SparseAllocError, match="no value"):
        exact_shapley(3, values)


def test_permutation_plan_pairs_each_order_with_its_reverse():
    plan = permutation_plan(6, 8, seed=3)
    assert len(plan.permutations) == 8
    for first, second in zip(plan.permutations[::2], plan.permutations[1::2]):
        assert second == first[::-1] and sorted(first) == list(range(6))
    assert plan == permutation_plan(6, 8, seed=3)
    coalitions = plan.coalitions()
    assert len(coalitions) == len(set(coalitions))
    assert set(coalitions) == {frozenset(p[:k]) for p in plan.permutations for k in range(7)}
    with pytest.raises(SparseAllocError, match="even"):
        permutation_plan(6, 5, seed=3)


@pytest.mark.parametrize("antithetic", [True, False])
def test_each_permutation_estimate_is_efficient(antithetic):
    values = _random_game(7, seed=4)
    total = values[frozenset(range(7))] - values[frozenset()]
    for seed in range(5):
        phi, stderr = permutation_shapley(permutation_plan(7, 2, seed, antithetic), values)
        assert phi.sum() == pytest.approx(total, abs=1e-12)
        assert np.isnan(stderr).all() == antithetic  # a single antithetic pair has no spread to measure


def test_antithetic_pairs_are_exact_on_pairwise_games():
    # A reversed order puts before i exactly the blocks that came after it: the pair sees every b_ij once.
    value, truth = _pairwise_game(8, reach=7, seed=5)
    phi, stderr = permutation_shapley(permutation_plan(8, 6, seed=0), _table(value, 8))
    np.testing.assert_allclose(phi, truth, atol=1e-12)
    np.testing.assert_allclose(stderr, 0.0, atol=1e-12)


def test_sampling_error_shrinks_with_more_permutations():
    values = _random_game(8, seed=6)
    truth = exact_shapley(8, values)

    def mean_error(num: int) -> float:
        estimates = [permutation_shapley(permutation_plan(8, num, seed), values)[0] for seed in range(4)]
        return float(np.mean(np.abs(np.array(estimates) - truth)))

    assert mean_error(400) < 0.4 * mean_error(10)


@pytest.mark.parametrize("antithetic", [True, False])
def test_standard_errors_cover_the_truth(antithetic):
    values = _random_game(6, seed=7)
    truth = exact_shapley(6, values)
    covered = []
    for seed in range(20):
        phi, stderr = permutation_shapley(permutation_plan(6, 60, seed, antithetic), values)
        assert np.all(np.isfinite(stderr)) and np.all(stderr > 0)
        covered.extend(np.abs(phi - truth) <= 3 * stderr)
    assert np.mean(covered) >= 0.9


@pytest.mark.parametrize("antithetic", [True, False])
def test_standard_errors_match_the_spread_across_seeds(antithetic):
    values = _random_game(6, seed=10)
    runs = [permutation_shapley(permutation_plan(6, 40, seed, antithetic), values) for seed in range(60)]
    spread = np.std([phi for phi, _ in runs], axis=0, ddof=1)
    ratio = np.mean([stderr for _, stderr in runs], axis=0) / spread
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


@pytest.mark.parametrize(("reach", "window"), [(1, 3), (2, 5), (1, 4)])
def test_sliding_window_is_exact_for_local_interactions(reach, window):
    for seed in range(3):
        value, truth = _pairwise_game(10, reach, seed)
        values = {c: value(c) for c in sliding_window_plan(10, window)}
        np.testing.assert_allclose(sliding_window_shapley(10, window, values), truth, atol=1e-9)


def test_sliding_window_is_exact_with_a_stride():
    value, truth = _pairwise_game(11, reach=1, seed=8)
    values = {c: value(c) for c in sliding_window_plan(11, 5, stride=2)}
    np.testing.assert_allclose(sliding_window_shapley(11, 5, values, stride=2), truth, atol=1e-9)


def test_sliding_window_misses_long_range_interactions():
    n, a = 10, np.linspace(-1.0, 1.0, 10)

    def value(coalition: frozenset) -> float:  # blocks 0 and 9 interact; no window of 3 holds both
        return a[sorted(coalition)].sum() + 4.0 * (0 in coalition and 9 in coalition)

    truth = exact_shapley(n, _table(value, n))
    np.testing.assert_allclose(truth[[0, 9]], a[[0, 9]] + 2.0, atol=1e-12)
    windowed = sliding_window_shapley(n, 3, {c: value(c) for c in sliding_window_plan(n, 3)})
    np.testing.assert_allclose(windowed, a, atol=1e-12)
    assert np.abs(windowed - truth).max() == pytest.approx(2.0)


def test_sliding_window_plan_is_the_deduplicated_union_of_window_subsets():
    for n, window, stride in [(12, 4, 1), (9, 3, 2), (7, 7, 1), (5, 1, 1)]:
        plan = sliding_window_plan(n, window, stride)
        assert len(plan) == len(set(plan)) == sliding_window_cost(n, window, stride)
        starts = set(range(0, n - window + 1, stride)) | {n - window}
        union = {frozenset(c) for s in starts for k in range(window + 1) for c in combinations(range(s, s + window), k)}
        assert set(plan) == union


def test_sliding_window_cost_formula_and_saving():
    for n, window in [(12, 4), (10, 3), (8, 8), (6, 1)]:
        assert sliding_window_cost(n, window) == (n - window + 2) * 2 ** (window - 1)
    assert sliding_window_cost(12, 4) == 80 < 2**12


def test_sliding_window_rejects_bad_windows():
    with pytest.raises(SparseAllocError, match="window"):
        sliding_window_plan(5, 6)
    with pytest.raises(SparseAllocError, match="stride"):
        sliding_window_plan(5, 2, stride=0)
    with pytest.raises(SparseAllocError, match="stride"):
        sliding_window_plan(9, 2, stride=3)  # block 2 would lie in no window


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("exact", {}), ("permutation", {"num_permutations": 6, "seed": 0}), ("sliding", {"window": 3})],
)
def test_estimate_evaluates_each_coalition_once(method, kwargs):
    value, truth = _pairwise_game(6, reach=1, seed=9)
    calls = []

    def counted(coalition: frozenset) -> float:
        calls.append(coalition)
        return value(coalition)

    result = estimate(6, counted, method, **kwargs)
    assert result.evaluations == len(calls) == len(set(calls))
    np.testing.assert_allclose(result.values, truth, atol=1e-9)  # all three are exact on this game
    assert (result.stderr is None) == (method != "permutation")


def test_estimate_rejects_unknown_method():
    with pytest.raises(SparseAllocError, match="unknown"):
        estimate(3, lambda c: 0.0, "banzhaf")
