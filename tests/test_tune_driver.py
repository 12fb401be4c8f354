"""The Optuna ask/tell driver against a stand-in pool (no Ray): rounds, samplers, budgets, replay.

The real pool (least-loaded dispatch, results table, interrupted runs) is exercised by the
``test_tune_*`` tests in test_orchestrator.py.
"""

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.search.drivers import tune as tune_driver
from orchestrator.search.budget import Budget, Charged
from orchestrator.search.drivers.tune import make_sampler, run_tune
from core.errors import SparseAllocError
from search_spaces import families

TARGET = 0.6
SPACE, BUILD = families.atp_space(4, TARGET), (lambda c: families.atp(4, TARGET, c["beta"]))


class FakePool:
    """What run_tune sees of EvaluatorPool: ``actors`` and ``evaluate``, with a results table
    (a dict here) that answers known keys, as the real pool does."""

    def __init__(self, actors: int = 2, seconds: float = 0.0, max_calls: int = 1000, interrupt_after: int | None = None,
                 table: dict | None = None) -> None:
        self.actors = [f"actor-{i}" for i in range(actors)]
        self.seconds, self.max_calls, self.interrupt_after = seconds, max_calls, interrupt_after
        self.table = {} if table is None else table
        self.batches: list[list] = []  # every evaluate call's candidates
        self.evaluated: list[str] = []  # keys actually scored (not answered from the table)

    @staticmethod
    def fitness(candidate) -> float:
        s = candidate.sparsities
        return s[0] + 0.1 * sum((x - TARGET) ** 2 for x in s)  # block 0 fragile

    def evaluate(self, candidates):
        self.batches.append(list(candidates))
        if len(self.batches) > self.max_calls:
            raise AssertionError("the driver kept going past its budget")
        time.sleep(self.seconds)
        for candidate in candidates:
            if candidate.key not in self.table:
                if self.interrupt_after is not None and len(self.evaluated) >= self.interrupt_after:
                    raise KeyboardInterrupt
                self.table[candidate.key] = self.fitness(candidate)
                self.evaluated.append(candidate.key)
        return [self.table[c.key] for c in candidates]


def asked(pool: FakePool) -> list[dict]:
    return [c.params for batch in pool.batches for c in batch]


def test_each_round_is_one_pool_batch_of_two_trials_per_actor(tmp_path):
    pool, budget = FakePool(actors=2), Budget(max_evals=10)
    result = run_tune(Charged(pool, budget), "tune-atp", SPACE, BUILD, progress=False)
    assert [len(b) for b in pool.batches] == [4, 4, 2]  # the last round trimmed to the budget
    assert result.evaluations == 10 and budget.used_evals == 10 and result.details["trials"] == 10
    assert all(c.driver == "tune-atp" and set(c.params) == {"beta"} for b in pool.batches for c in b)
    scored = [(pool.table[c.key], c.params) for b in pool.batches for c in b]
    assert result.fitness == min(f for f, _ in scored)
    assert result.best == BUILD(result.details["best_config"])
    three = FakePool(actors=3)
    run_tune(Charged(three, Budget(max_evals=6)), "tune-atp", SPACE, BUILD, progress=False)
    assert [len(b) for b in three.batches] == [6]
    one = FakePool(actors=2)
    run_tune(Charged(one, Budget(max_evals=3)), "tune-atp", SPACE, BUILD, progress=False, max_concurrent=1)
    assert [len(b) for b in one.batches] == [1, 1, 1]


def test_tpe_with_trials_in_flight_uses_constant_liar(tmp_path, monkeypatch):
    concurrent = make_sampler("tpe", 0, in_flight=4)
    assert concurrent._constant_liar and concurrent._multivariate
    assert not make_sampler("tpe", 0)._constant_liar
    made = []
    original = tune_driver.make_sampler
    monkeypatch.setattr(tune_driver, "make_sampler", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    run_tune(Charged(FakePool(actors=2), Budget(max_evals=4)), "tune-atp", SPACE, BUILD, progress=False)
    assert len(made) == 1 and made[0]._constant_liar and made[0]._multivariate


def test_same_seed_asks_the_same_trials(tmp_path):
    def asks(seed, sampler="tpe", space=SPACE, build=BUILD):
        pool = FakePool(actors=2)
        run_tune(Charged(pool, Budget(max_evals=24)), "t", space, build, seed=seed, progress=False, sampler=sampler)
        return asked(pool)

    first = asks(0)  # 24 trials: past TPE's 10 random start-up trials
    assert first == asks(0) and first != asks(1)
    assert len({c["beta"] for c in first}) == 24  # the liar keeps one round's trials apart
    keys = families.free_keys(4)
    space = families.free_space(4, 0.35, 0.85)
    build = lambda c: families.free_vector([c[k] for k in keys], TARGET, None, 0.35, 0.85)  # noqa: E731
    assert asks(3, "cmaes", space, build) == asks(3, "cmaes", space, build)


def test_interrupted_run_replays_its_asks_and_evaluates_nothing_twice(tmp_path):
    table: dict = {}
    interrupted = FakePool(actors=2, interrupt_after=6, table=table)
    with pytest.raises(KeyboardInterrupt):
        run_tune(Charged(interrupted, Budget(max_evals=16)), "tune-atp", SPACE, BUILD, seed=2, progress=False)
    assert len(table) == 6
    resumed = FakePool(actors=2, table=table)
    budget = Budget(max_evals=16)
    result = run_tune(Charged(resumed, budget), "tune-atp", SPACE, BUILD, seed=2, progress=False)
    assert not set(resumed.evaluated) & set(interrupted.evaluated)
    assert len(resumed.evaluated) == 10 and len(table) == 16
    assert result.evaluations == 16 and budget.used_evals == 16  # the stored answers are charged too
    fresh = FakePool(actors=2)
    uninterrupted = run_tune(Charged(fresh, Budget(max_evals=16)), "tune-atp", SPACE, BUILD, seed=2, progress=False)
    assert asked(resumed) == asked(fresh)
    assert (result.best, result.fitness) == (uninterrupted.best, uninterrupted.fitness)


def test_seconds_budget_stops_the_search(tmp_path):
    pool, budget = FakePool(actors=2, seconds=0.05, max_calls=40), Budget(max_seconds=0.3)
    result = run_tune(Charged(pool, budget), "tune-atp", SPACE, BUILD, progress=False)
    assert budget.exhausted() and 1 <= len(pool.batches) <= 8
    assert result.evaluations == sum(len(b) for b in pool.batches) == budget.used_evals
    with pytest.raises(SparseAllocError, match="no budget left"):
        run_tune(Charged(pool, budget), "tune-atp", SPACE, BUILD, progress=False)


def test_without_a_budget_runs_the_default_number_of_trials(tmp_path):
    pool = FakePool(actors=2)
    result = run_tune(Charged(pool, Budget()), "tune-atp", SPACE, BUILD, progress=False)
    assert result.evaluations == tune_driver.DEFAULT_TRIALS == sum(len(b) for b in pool.batches)


def test_non_finite_fitness_counts_as_worst(tmp_path):
    half = families.atp_beta_max(4, TARGET) / 2
    pool = FakePool(actors=1)
    pool.fitness = lambda c: math.nan if c.params["beta"] < half else 1.0 - c.params["beta"]
    result = run_tune(Charged(pool, Budget(max_evals=8)), "tune-atp", SPACE, BUILD, progress=False)
    values = list(pool.table.values())
    assert any(math.isnan(v) for v in values) and any(not math.isnan(v) for v in values)
    assert result.fitness == min(v for v in values if not math.isnan(v))


def test_int_and_log_spaces(tmp_path):
    space = {"M": ("int", 3, 5), "lam": ("loguniform", 0.01, 0.2)}
    pool = FakePool(actors=1)
    run_tune(Charged(pool, Budget(max_evals=12)), "tune-owl", space, lambda c: families.atp(4, TARGET, c["lam"]),
             progress=False)
    values = asked(pool)
    assert {c["M"] for c in values} <= {3, 4, 5} and all(isinstance(c["M"], int) for c in values)
    assert all(0.01 <= c["lam"] <= 0.2 for c in values)
    with pytest.raises(SparseAllocError, match="unknown search-space kind"):
        run_tune(Charged(pool, Budget(max_evals=1)), "t", {"x": ("choice", 0, 1)}, BUILD, progress=False)


# --- token budgets ------------------------------------------------------------------------------------


def tokens_received(pool: FakePool, full: int) -> int:
    return sum(c.tokens if c.tokens is not None else full for b in pool.batches for c in b)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40_000), st.sampled_from([256, 1024, None]), st.integers(1, 3))
def test_token_budget_is_honoured(tmp_path_factory, max_tokens, tokens, actors):
    pool = FakePool(actors=actors)
    pool.max_tokens = 2048  # what a None-token trial scores: all the pool's fitness tokens
    cost = tokens or 2048
    budget = Budget(max_tokens=max_tokens)
    if max_tokens < cost:  # not one trial fits
        with pytest.raises(SparseAllocError, match="no budget left"):
            run_tune(Charged(pool, budget), "tune-atp", SPACE, BUILD, tokens, progress=False)
        assert pool.batches == []
        return
    result = run_tune(Charged(pool, budget), "tune-atp", SPACE, BUILD, tokens,
                      progress=False)
    received = tokens_received(pool, 2048)
    assert received == budget.used_tokens == cost * result.evaluations
    assert max_tokens - cost < received <= max_tokens  # every trial that fits, never one more
    assert result.evaluations == max_tokens // cost
    assert all(len(b) <= 2 * actors for b in pool.batches)


def test_a_1024_token_trial_costs_four_256_token_ones(tmp_path):
    small, large = FakePool(actors=2), FakePool(actors=2)
    run_tune(Charged(small, Budget(max_tokens=16 * 256)), "tune-atp", SPACE, BUILD, 256, progress=False)
    run_tune(Charged(large, Budget(max_tokens=16 * 256)), "tune-atp", SPACE, BUILD, 1024, progress=False)
    assert [len(b) for b in small.batches] == [4, 4, 4, 4] and [len(b) for b in large.batches] == [4]
    both = FakePool(actors=2)  # whichever of evaluations and tokens runs out first ends it
    run_tune(Charged(both, Budget(max_evals=10, max_tokens=6 * 1024)), "tune-atp", SPACE, BUILD, 1024,
             progress=False)
    assert [len(b) for b in both.batches] == [4, 2]


def test_resumed_run_charges_the_tokens_the_table_answers(tmp_path):
    table: dict = {}
    with pytest.raises(KeyboardInterrupt):
        run_tune(Charged(FakePool(actors=2, interrupt_after=6, table=table), Budget(max_tokens=16 * 512)), "tune-atp", SPACE, BUILD, 512, seed=2, progress=False)
    resumed, budget = FakePool(actors=2, table=table), Budget(max_tokens=16 * 512)
    result = run_tune(Charged(resumed, budget), "tune-atp", SPACE, BUILD, 512, seed=2, progress=False)
    assert len(resumed.evaluated) == 10 and result.evaluations == 16 and budget.used_tokens == 16 * 512


def test_token_budget_needs_to_know_all_tokens(tmp_path):
    with pytest.raises(SparseAllocError, match="token budget"):
        run_tune(Charged(FakePool(), Budget(max_tokens=10_000)), "tune-atp", SPACE, BUILD, None, progress=False)
