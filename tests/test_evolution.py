import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.budget import Budget
from orchestrator.evolution import EvolutionConfig, mutate, run_evolution
from pruning.errors import SparseAllocError
from search_spaces.families import sensitivity_map, uniform

EXAMPLES = settings(max_examples=200, deadline=None)

BLOCKS = 12
FRAGILE = (0, 5, 11)
COST = np.array([20.0 if l in FRAGILE else 1.0 for l in range(BLOCKS)])


def true_fitness(sparsities) -> float:
    s = np.asarray(sparsities)
    return float((COST * s**2).sum())


class Planted:
    """fitness = sum_l c_l s_l^2 + noise whose scale shrinks as 1/sqrt(tokens); records every call."""

    def __init__(self, noise: float = 0.5, seed: int = 123, sleep: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.sleep = sleep
        self.calls = []
        self.returned = []

    def __call__(self, batch):
        self.calls.append(list(batch))
        if self.sleep:
            time.sleep(self.sleep)
        out = [true_fitness(c.sparsities) + self.noise * self.rng.normal() * (2048 / c.tokens) ** 0.5
               for c in batch]
        self.returned.append(out)
        return out

    @property
    def scored(self) -> int:
        return sum(len(b) for b in self.calls)


# --- mutation -----------------------------------------------------------------------------------------


@EXAMPLES
@given(st.lists(st.integers(0, 9), min_size=1, max_size=30), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_mutation_keeps_sum_and_grid(idx, max_swaps, seed):
    parent = np.array(idx)
    before = parent.copy()
    child = mutate(parent, 10, np.random.default_rng(seed), max_swaps)
    assert np.array_equal(parent, before)  # input untouched
    assert child.sum() == parent.sum()  # mean exactly kept
    assert child.min() >= 0 and child.max() <= 9  # on the grid
    changed = int(np.abs(child - parent).sum())
    assert changed <= 2 * max_swaps and changed % 2 == 0


def test_mutation_moves_when_it_can_and_not_when_it_cannot():
    rng = np.random.default_rng(0)
    assert not np.array_equal(mutate(np.array([5, 5]), 10, rng, 1), [5, 5])
    # One level up and one down: from [0, 1] the only move is block 0 up, block 1 down.
    assert mutate(np.array([0, 1]), 10, rng, 1).tolist() == [1, 0]
    for stuck in ([0, 0, 0], [9, 9], [4]):
        assert mutate(np.array(stuck), 10, rng, 3).tolist() == stuck


def test_mutated_profile_keeps_mean_on_the_one_percent_grid():
    rng = np.random.default_rng(1)
    grid = np.round(np.arange(100) * 0.01, 10)
    idx = np.full(20, 50)
    for _ in range(300):
        idx = mutate(idx, 100, rng, 3)
        assert abs(grid[idx].mean() - 0.5) < 1e-12


# --- search -------------------------------------------------------------------------------------------


def run_planted(max_evals=3000, seed=0, noise=0.5, **overrides):
    evaluate = Planted(noise=noise)
    config = EvolutionConfig(target=0.5, seed=seed, **overrides)
    budget = Budget(max_evals=max_evals)
    result = run_evolution(evaluate, [uniform(BLOCKS, 0.5)], config, budget)
    return result, evaluate, budget


def test_planted_problem_is_solved():
    result, evaluate, _ = run_planted()
    base = true_fitness([0.5] * BLOCKS)
    found = true_fitness(result.best.sparsities)
    assert found < 0.6 * base, (found, base)
    s = np.asarray(result.best.sparsities)
    assert abs(s.mean() - 0.5) < 1e-9  # mean kept exactly
    assert np.allclose(s * 100, np.round(s * 100))  # on the 1 % grid
    fragile = s[list(FRAGILE)]
    assert fragile.max() < s.mean() - 0.1  # fragile blocks get clearly less sparsity
    hist = result.history
    assert all(b <= a for a, b in zip(hist, hist[1:]))  # elitist: never worse
    assert hist[-1] == result.fitness and len(hist) == result.generations
    # Multi-fidelity: every call is one stage at one fidelity, low (16 or fewer) then top (4 or fewer).
    for batch in evaluate.calls:
        assert len({c.tokens for c in batch}) == 1
        assert {c.driver for c in batch} == {"evolution"}
        stage = batch[0].params["stage"]
        assert batch[0].tokens == (2048, 16384)[stage]
        assert len(batch) <= (16, 4)[stage]
    stages = [b[0].params["stage"] for b in evaluate.calls]
    assert stages[:4] == [0, 1, 0, 1]


def test_evaluation_budget_is_honoured_exactly():
    for max_evals in (1, 7, 57, 203):
        result, evaluate, budget = run_planted(max_evals=max_evals)
        assert evaluate.scored == max_evals == result.evaluations == budget.used_evals
        assert np.isfinite(result.fitness)


def test_budget_already_spent_returns_the_seed():
    evaluate = Planted()
    budget = Budget(max_evals=5, used_evals=5)
    result = run_evolution(evaluate, [uniform(4, 0.5)], EvolutionConfig(target=0.5), budget)
    assert evaluate.calls == [] and result.evaluations == 0 and result.generations == 0
    assert result.best == uniform(4, 0.5) and result.fitness == float("inf")


def test_wall_clock_budget_stops_it():
    evaluate = Planted(sleep=0.05)
    budget = Budget(max_seconds=0.3)
    start = time.monotonic()
    result = run_evolution(evaluate, [uniform(BLOCKS, 0.5)], EvolutionConfig(target=0.5), budget)
    assert time.monotonic() - start < 1.0
    assert 1 <= len(evaluate.calls) <= 8
    assert result.evaluations == evaluate.scored


def test_clock_is_checked_before_every_stage():
    evaluate = Planted(sleep=0.15)
    result = run_evolution(evaluate, [uniform(BLOCKS, 0.5)], EvolutionConfig(target=0.5), Budget(max_seconds=0.1))
    assert len(evaluate.calls) == 1  # stage 0 ran past the limit, stage 1 never started
    assert result.generations == 0 and result.history == []
    # The best at the highest stage reached, with that stage's score.
    scores = evaluate.returned[0]
    assert result.fitness == min(scores)
    assert result.best.sparsities == evaluate.calls[0][int(np.argmin(scores))].sparsities


def test_max_generations_and_progress_callback():
    seen = []
    evaluate = Planted()
    config = EvolutionConfig(target=0.5, max_generations=5)
    result = run_evolution(evaluate, [uniform(BLOCKS, 0.5)], config, Budget(),
                           on_generation=lambda g, f, n: seen.append((g, f, n)))
    assert result.generations == 5 == len(seen) and len(evaluate.calls) == 10
    assert [g for g, _, _ in seen] == [0, 1, 2, 3, 4]
    assert [f for _, f, _ in seen] == result.history
    assert seen[-1][2] == result.evaluations == evaluate.scored


def test_deterministic_with_seed():
    a, ea, _ = run_planted(max_evals=400, seed=3)
    b, eb, _ = run_planted(max_evals=400, seed=3)
    c, _, _ = run_planted(max_evals=400, seed=4)
    assert a == b
    assert [[x.key for x in batch] for batch in ea.calls] == [[x.key for x in batch] for batch in eb.calls]
    assert a.best != c.best or a.history != c.history


def test_seeds_are_snapped_and_start_the_population():
    fisher = sensitivity_map([5, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1, 6], 0.5, 1.3)
    evaluate = Planted()
    run_evolution(evaluate, [fisher, uniform(BLOCKS, 0.5)], EvolutionConfig(target=0.5, max_generations=1),
                  Budget())
    first = evaluate.calls[0]
    assert len(first) == 16
    snapped = first[0].sparsities
    assert np.allclose(snapped, fisher.sparsities, atol=0.0101) and abs(np.mean(snapped) - 0.5) < 1e-9
    assert first[1].sparsities == (0.5,) * BLOCKS


def test_nm_mode_gives_valid_profiles():
    evaluate = Planted(noise=0.0)
    config = EvolutionConfig(target=0.5, nm_m=4, max_generations=30)
    result = run_evolution(evaluate, [uniform(BLOCKS, 0.5)], config, Budget())
    for batch in evaluate.calls:
        for cand in batch:
            profile = cand.profile  # validates nm against the sparsities
            assert profile.nm is not None and abs(np.mean(profile.sparsities) - 0.5) < 1e-12
            for s, pattern in zip(profile.sparsities, profile.nm):
                assert s in (0.0, 0.25, 0.5, 0.75)
                assert (pattern is None) == (s == 0.0)
                if pattern is not None:
                    assert pattern[1] == 4 and pattern[0] / 4 == s
    assert result.best.nm is not None
    assert true_fitness(result.best.sparsities) < true_fitness([0.5] * BLOCKS)
    assert max(result.best.sparsities[l] for l in FRAGILE) < 0.5


def test_weighted_mean_stays_within_one_level():
    weights = [1.0, 3.0, 2.0, 5.0, 1.0, 1.0, 4.0, 2.0, 1.0, 3.0, 1.0, 2.0]
    evaluate = Planted()
    config = EvolutionConfig(target=0.5, weights=weights, max_generations=60)
    result = run_evolution(evaluate, [uniform(BLOCKS, 0.5)], config, Budget())
    w = np.asarray(weights)
    for batch in evaluate.calls:
        for cand in batch:
            mean = float((w * np.asarray(cand.sparsities)).sum() / w.sum())
            assert abs(mean - 0.5) <= 0.01 + 1e-9
    assert true_fitness(result.best.sparsities) < true_fitness([0.5] * BLOCKS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(survivors=(4, 1), fidelities=(2048,)), "one entry per"),
        (dict(survivors=(), fidelities=()), "one entry per"),
        (dict(survivors=(4, 0)), "at least 1"),
        (dict(survivors=(20, 1)), "at most offspring"),
        (dict(survivors=(2, 4)), "non-increasing"),
        (dict(fidelities=(4096, 2048)), "strictly increasing"),
        (dict(fidelities=(0, 2048)), "positive"),
        (dict(offspring=0, survivors=(1,), fidelities=(1,)), "offspring"),
        (dict(max_swaps=0), "max_swaps"),
        (dict(max_generations=0), "max_generations"),
        (dict(target=1.2), "outside the level range"),
        (dict(target=0.9, nm_m=4), "outside the level range"),
        (dict(nm_m=4, levels=[0.0, 0.5]), "not both"),
        (dict(levels=[0.5]), "two distinct"),
        (dict(nm_m=1), "too small"),
        (dict(weights=[1.0, 2.0]), "weights"),
        (dict(weights=[1.0] * 11 + [-1.0]), "weights"),
    ],
)
def test_bad_config_raises(kwargs, message):
    kwargs = {"target": 0.5, **kwargs}
    with pytest.raises(SparseAllocError, match=message):
        run_evolution(Planted(), [uniform(BLOCKS, 0.5)], EvolutionConfig(**kwargs), Budget(max_evals=10))


def test_bad_seeds_and_evaluator_raise():
    config = EvolutionConfig(target=0.5)
    with pytest.raises(SparseAllocError, match="at least one seed"):
        run_evolution(Planted(), [], config, Budget())
    with pytest.raises(SparseAllocError, match="different block counts"):
        run_evolution(Planted(), [uniform(3, 0.5), uniform(4, 0.5)], config, Budget())
    with pytest.raises(SparseAllocError, match="returned 1 fitnesses"):
        run_evolution(lambda batch: [0.0], [uniform(4, 0.5)], config, Budget())


def test_nan_fitness_never_wins():
    def evaluate(batch):
        return [float("nan") if c.sparsities[0] > 0.5 else float(np.square(c.sparsities).sum()) for c in batch]

    result = run_evolution(evaluate, [uniform(4, 0.5)], EvolutionConfig(target=0.5, max_generations=20), Budget())
    assert np.isfinite(result.fitness) and all(np.isfinite(result.history))
    assert result.best.sparsities[0] <= 0.5


@pytest.mark.parametrize("fresh", [True, False])
def test_lower_stages_draw_fresh_tokens_each_generation(fresh):
    """Stage 0 of generation g asks for the g-th slice of the fitness windows; the top stage always
    asks for the same tokens, so parents and children compare on one set."""
    evaluate = Planted()
    config = EvolutionConfig(target=0.5, max_generations=4, fidelities=(512, 2048, 8192), survivors=(4, 2, 1),
                             fresh_tokens=fresh)
    run_evolution(evaluate, [uniform(BLOCKS, 0.5)], config, Budget())
    by_stage = {}
    for batch in evaluate.calls:
        for c in batch:
            by_stage.setdefault(c.params["stage"], set()).add((c.params["generation"], c.draw))
    assert by_stage[2] == {(g, 0) for g in range(4)}
    for stage in (0, 1):
        assert by_stage[stage] == {(g, g if fresh else 0) for g in range(4)}
