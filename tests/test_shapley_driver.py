"""The anytime Shapley driver on a fake pool whose fitness is a planted game (exact Shapley known).

The fake pool has what the driver uses (``evaluate``, ``num_blocks``, ``block_weights``) and behaves
like the real one on what matters here: answers for known keys come from its results table, new keys
are evaluated (and counted) and written to the table one by one as they arrive.
"""

from types import SimpleNamespace

import numpy as np
import pytest

import orchestrator.runtime.clock
from orchestrator.search.budget import Budget, Charged
from orchestrator.search.drivers.shapley import run_shapley
from core.errors import SparseAllocError
from scoring.shapley import exact_plan, exact_shapley, permutation_plan, permutation_shapley

N = 8
TARGET = 0.5


def planted_game(n: int = N, cubic: float = 0.05, pairwise: float = 0.0, seed: int = 0):
    """Damage of a per-block sparsity vector: block 0 fragile, the others mild, plus optional pairwise
    and cubic (three-way and beyond) interactions. On a coalition (pruned at TARGET, the rest dense)
    it is v(S) = Σ_S a_i + Σ_{i<j∈S} b_ij + cubic (Σ_S c_i)^3."""
    rng = np.random.default_rng(seed)
    a = np.concatenate([[4.0], rng.uniform(0.3, 1.0, n - 1)])
    b = pairwise * np.triu(rng.normal(size=(n, n)), 1)
    c = rng.uniform(0.5, 1.5, n)

    def damage(sparsities) -> float:
        x = np.asarray(sparsities, float) / TARGET
        return float(a @ x**2 + x @ b @ x + cubic * (c @ x) ** 3)

    def value(coalition: frozenset) -> float:
        return damage([TARGET if i in coalition else 0.0 for i in range(n)])

    return damage, value


def exact(value, n: int = N) -> np.ndarray:
    return exact_shapley(n, {s: value(s) for s in exact_plan(n)})


class FakePool:
    """Results table (key -> fitness) shared by runs that resume each other; counts new evaluations."""

    def __init__(self, damage, n: int = N, table: dict | None = None, clock: SimpleNamespace | None = None,
                 seconds_per_eval: float = 1.0, interrupt_after: int | None = None) -> None:
        self.damage, self.num_blocks, self.block_weights = damage, n, [1] * n
        self.table = {} if table is None else table
        self.clock, self.seconds_per_eval, self.interrupt_after = clock, seconds_per_eval, interrupt_after
        self.new_keys: list[str] = []  # evaluated, not answered from the table
        self.requested: list[frozenset] = []  # coalitions asked for, in order

    def evaluate(self, candidates):
        out = []
        for candidate in candidates:
            if "coalition" in candidate.params:
                self.requested.append(frozenset(candidate.params["coalition"]))
            if candidate.key not in self.table:
                if self.interrupt_after is not None and len(self.new_keys) >= self.interrupt_after:
                    raise KeyboardInterrupt
                self.table[candidate.key] = self.damage(candidate.sparsities)
                self.new_keys.append(candidate.key)
                if self.clock is not None:
                    self.clock.now += self.seconds_per_eval
            out.append(self.table[candidate.key])
        return out


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for the budget: the fake pool advances it per new evaluation."""
    fake = SimpleNamespace(now=0.0)
    fake.monotonic = lambda: fake.now
    monkeypatch.setattr(orchestrator.runtime.clock, "monotonic", fake.monotonic)
    return fake


def _protects_block_0(result) -> bool:
    s = result.best.sparsities
    return s[0] == min(s) and s[0] < TARGET - 0.05 and result.best.mean() == pytest.approx(TARGET)


# (a) a budget that ends mid-way still gives values with standard errors and a useful profile


def test_evaluation_budget_ending_mid_way_uses_the_completed_pairs():
    damage, value = planted_game()
    pool = FakePool(damage)
    budget = Budget(max_evals=40)  # first pair 16 coalitions, then at most 14 per pair, 3 kept for the strengths
    estimates = []
    result = run_shapley(Charged(pool, budget), TARGET, seed=1, progress=False,
                         on_estimate=lambda phi, stderr, done: estimates.append((done, phi, stderr)))
    details = result.details
    assert details["estimator"] == "permutation" and details["partial"] is True
    pairs = details["pairs"]
    assert pairs >= 2 and details["permutations"] == 2 * pairs
    assert budget.used_evals <= 40 and result.evaluations == budget.used_evals
    # The estimate is the mean over exactly the completed pairs of the seed's stream.
    table = {c: value(c) for c in exact_plan(N)}
    phi, stderr = permutation_shapley(permutation_plan(N, 2 * pairs, seed=1), table)
    np.testing.assert_allclose(details["values"], phi, atol=1e-9)
    np.testing.assert_allclose(details["stderr"], stderr, atol=1e-9)
    assert all(s is not None and s > 0 for s in details["stderr"])  # interactions beyond pairs: spread
    assert [done for done, _, _ in estimates][-1] == pairs  # an estimate after every batch
    assert np.argmax(details["values"]) == 0
    assert _protects_block_0(result) and len(set(result.best.sparsities)) > 1


def test_time_budget_ending_mid_way_keeps_room_for_the_strengths(clock):
    damage, _ = planted_game()
    pool = FakePool(damage, clock=clock, seconds_per_eval=1.0)
    budget = Budget(max_seconds=45.0, started=0.0)
    result = run_shapley(Charged(pool, budget), TARGET, seed=2, progress=False)
    assert result.details["partial"] is True and result.details["pairs"] == 2
    assert all(s > 0 for s in result.details["stderr"])
    assert budget.elapsed <= 45.0  # sampling stopped early enough to score the three strengths in time
    assert len(result.details["fitness_by_strength"]) == 3
    assert _protects_block_0(result)


def test_no_completed_pair_falls_back_to_uniform_and_says_so():
    damage, _ = planted_game()
    pool = FakePool(damage)
    result = run_shapley(Charged(pool, Budget(max_evals=10)), TARGET, progress=False)  # one pair needs 16 (+3)
    assert result.best.sparsities == (TARGET,) * N
    assert "budget" in result.details["note"] and result.details["values"] is None
    assert pool.requested == []


# (b) convergence to the exact Shapley values


def test_additive_game_gives_exact_values_with_zero_error():
    damage, value = planted_game(cubic=0.0)
    result = run_shapley(Charged(FakePool(damage), Budget(max_evals=60)), TARGET, progress=False)
    np.testing.assert_allclose(result.details["values"], exact(value), atol=1e-9)
    np.testing.assert_allclose(result.details["stderr"], 0.0, atol=1e-9)


def test_antithetic_pairs_are_exact_on_a_pairwise_game():
    # A reversed order puts before each block exactly the blocks that came after it: with pairwise
    # interactions every pair's mean marginal is the Shapley value (single orders are not).
    damage, value = planted_game(cubic=0.0, pairwise=0.5, seed=3)
    result = run_shapley(Charged(FakePool(damage), Budget(max_evals=50)), TARGET, seed=4, progress=False)
    assert result.details["pairs"] >= 2
    np.testing.assert_allclose(result.details["values"], exact(value), atol=1e-9)
    np.testing.assert_allclose(result.details["stderr"], 0.0, atol=1e-9)


def test_values_converge_to_the_exact_shapley_values():
    damage, value = planted_game(cubic=0.2, pairwise=0.3, seed=5)
    truth = exact(value)
    small = run_shapley(Charged(FakePool(damage), Budget(max_evals=35)), TARGET, seed=6, progress=False).details
    large = run_shapley(Charged(FakePool(damage), Budget(max_evals=10_000)), TARGET, seed=6, progress=False).details
    assert large["pairs"] == 64 and large["partial"] is False  # the cap, not the budget, ended it
    error = lambda d: np.abs(np.array(d["values"]) - truth).max()  # noqa: E731
    assert error(large) < 0.5 * error(small)
    assert np.all(np.abs(np.array(large["values"]) - truth) <= 4 * np.array(large["stderr"]))
    assert np.max(large["stderr"]) < np.max(small["stderr"])


# (c) the sliding window, cut short, still gives a profile


def test_sliding_window_partial_plan_gives_a_profile():
    damage, value = planted_game(cubic=0.0, pairwise=0.5, seed=7)
    pool = FakePool(damage)
    budget = Budget(max_evals=20)  # windows of 3: 8 coalitions, then 4 per window; 6 windows in all
    result = run_shapley(Charged(pool, budget), TARGET, estimator="sliding", window=3, progress=False)
    details = result.details
    assert details["estimator"] == "sliding" and details["partial"] is True and details["stderr"] is None
    assert 1 <= details["windows"] < details["windows_total"] == 6
    incomplete = details["incomplete"]
    assert incomplete and incomplete == list(range(N - len(incomplete), N))  # windows go left to right
    values = np.array(details["values"])
    covered = [b for b in range(N) if b not in incomplete]
    np.testing.assert_allclose(values[incomplete], values[covered].mean())
    assert budget.used_evals <= 20
    assert _protects_block_0(result) and len(set(result.best.sparsities)) > 1


def test_sliding_window_complete_plan_is_exact_for_neighbour_interactions():
    damage, value = planted_game(cubic=0.0, pairwise=0.0, seed=8)
    result = run_shapley(Charged(FakePool(damage), Budget(max_evals=100)), TARGET, estimator="sliding", window=3,
                         progress=False)
    assert result.details["partial"] is False and result.details["incomplete"] == []
    np.testing.assert_allclose(result.details["values"], exact(value), atol=1e-9)


def test_unknown_estimator_is_a_clear_error():
    damage, _ = planted_game()
    with pytest.raises(SparseAllocError, match="estimator"):
        run_shapley(Charged(FakePool(damage), Budget(max_evals=10)), TARGET, estimator="exact", progress=False)


# (d) determinism


def test_same_seed_same_coalitions_each_evaluated_once():
    damage, _ = planted_game()
    runs = []
    for seed in (11, 11, 12):
        pool = FakePool(damage)
        budget = Budget(max_evals=70)
        result = run_shapley(Charged(pool, budget), TARGET, seed=seed, progress=False)
        runs.append((pool.requested, result))
        assert len(pool.requested) == len(set(pool.requested)) == result.details["evaluations"]  # deduplicated
        assert budget.used_evals == result.evaluations == len(pool.new_keys)
        pairs = result.details["pairs"]
        assert set(pool.requested) == set(permutation_plan(N, 2 * pairs, seed).coalitions())
    (first, a), (second, b), (other, _) = runs
    assert first == second and a.details["values"] == b.details["values"] and a.best == b.best
    assert other != first


# (e) resume


def test_resumed_run_replays_the_permutations_from_the_table():
    damage, _ = planted_game()
    table: dict = {}
    with pytest.raises(KeyboardInterrupt):  # in the middle of the second batch (a pair half evaluated)
        run_shapley(Charged(FakePool(damage, table=table, interrupt_after=23), Budget(max_evals=70)), TARGET, seed=9,
                    progress=False)
    stored = set(table)
    assert len(stored) == 23

    resumed_pool = FakePool(damage, table=table)
    resumed_budget = Budget(max_evals=70)
    resumed = run_shapley(Charged(resumed_pool, resumed_budget), TARGET, seed=9, progress=False)
    assert not set(resumed_pool.new_keys) & stored  # nothing finished was evaluated again

    fresh_pool = FakePool(damage)
    fresh_budget = Budget(max_evals=70)
    fresh = run_shapley(Charged(fresh_pool, fresh_budget), TARGET, seed=9, progress=False)
    assert len(resumed_pool.new_keys) == len(fresh_pool.new_keys) - len(stored)
    assert resumed_pool.requested == fresh_pool.requested and set(table) == set(fresh_pool.table)
    assert resumed.details["values"] == fresh.details["values"] and resumed.best == fresh.best
    assert resumed_budget.used_evals == fresh_budget.used_evals  # answers from the table are charged too


# the search's --estimator reaches the driver


@pytest.mark.parametrize("argv", [[], ["--estimator", "sliding"]])
def test_search_estimator_flag_reaches_the_shapley_driver(argv, monkeypatch, tmp_path):
    import orchestrator.search.run
    from conftest import settings_of
    from orchestrator.cli import main
    from orchestrator.search.drivers.context import DriverContext
    from orchestrator.search.registry import DRIVERS

    configs = []

    def captured(config):
        configs.append(config)
        raise SparseAllocError("stop here")

    monkeypatch.setattr(orchestrator.search.run, "run_search", captured)
    assert main(["search", "--out", str(tmp_path), "--budget-evals", "50", "--method", "shapley", "--no-progress", *argv]) == 2
    (config,) = configs
    expected = argv[-1] if argv else "permutation"
    assert config.estimator == expected and settings_of(config).identity()["estimator"] == expected
    damage, _ = planted_game()
    context = DriverContext(Charged(FakePool(damage), Budget(max_evals=50)), settings_of(config), None, 4096, tmp_path)
    result = DRIVERS["shapley"].function()(context)
    assert result.details["estimator"] == expected


# (f) token budgets


def _tokens_received(pool: "FakePool", full: int) -> int:
    return sum(tokens if tokens is not None else full for tokens in pool.tokens)


class TokenPool(FakePool):
    """The fake pool, also recording every candidate's fidelity; ``max_tokens`` as the real pool has."""

    def __init__(self, damage, max_tokens: int = 1024, **kwargs) -> None:
        super().__init__(damage, **kwargs)
        self.max_tokens = max_tokens
        self.tokens: list[int | None] = []

    def evaluate(self, candidates):
        self.tokens += [c.tokens for c in candidates]
        return super().evaluate(candidates)


@pytest.mark.parametrize("estimator, largest_unit", [("permutation", 2 * N), ("sliding", 2**3)])
@pytest.mark.parametrize("tokens", [256, None])
@pytest.mark.parametrize("max_tokens", [5_000, 19_000, 30_000, 47_000, 80_000])
def test_token_budget_is_honoured(estimator, largest_unit, tokens, max_tokens):
    damage, _ = planted_game()
    pool = TokenPool(damage, max_tokens=1024)
    budget = Budget(max_tokens=max_tokens)
    result = run_shapley(Charged(pool, budget), TARGET, estimator=estimator, tokens=tokens, seed=3, progress=False)
    cost = tokens or 1024  # None: all the pool's fitness tokens
    received = _tokens_received(pool, 1024)
    assert received == budget.used_tokens == cost * result.evaluations == cost * budget.used_evals
    assert received <= max_tokens  # a batch goes out only when it and the strengths' reserve fit
    if result.details["partial"] and "note" not in result.details:
        assert received > max_tokens - largest_unit * cost  # less than one unit was left unspent


@pytest.mark.parametrize("estimator", ["permutation", "sliding"])
def test_tokens_buy_the_same_coalitions_as_evaluations(estimator):
    """K evaluations' worth of tokens is K evaluations; at four times the fidelity, K / 4."""
    damage, _ = planted_game()

    def requested(budget, tokens):
        pool = TokenPool(damage, max_tokens=4096)
        run_shapley(Charged(pool, budget), TARGET, estimator=estimator, tokens=tokens, seed=5, progress=False)
        return pool.requested, budget

    by_evals, _ = requested(Budget(max_evals=45), 256)
    by_tokens, budget = requested(Budget(max_tokens=45 * 256), 256)
    assert by_tokens == by_evals and budget.used_tokens == 256 * budget.used_evals
    quarter, quarter_budget = requested(Budget(max_tokens=44 * 256), 1024)
    assert quarter == requested(Budget(max_evals=11), 1024)[0]
    assert quarter_budget.used_evals <= 11 < budget.used_evals


def test_no_unit_fits_the_tokens_and_uniform_is_scored_only_if_it_fits():
    damage, _ = planted_game()
    pool = TokenPool(damage)
    budget = Budget(max_tokens=2 * 1024)  # one pair needs 16 coalitions, 3 strengths: 19 x 1024
    result = run_shapley(Charged(pool, budget), TARGET, progress=False)  # tokens None: the pool's 1024
    assert "budget" in result.details["note"] and pool.tokens == [None] and budget.used_tokens == 1024
    broke = TokenPool(damage)
    result = run_shapley(Charged(broke, Budget(max_tokens=1000)), TARGET, tokens=None, progress=False)
    assert broke.tokens == [] and result.fitness == float("inf")  # not even the uniform profile fits


def test_token_budget_needs_to_know_all_tokens():
    damage, _ = planted_game()
    with pytest.raises(SparseAllocError, match="token budget"):
        run_shapley(Charged(FakePool(damage), Budget(max_tokens=10_000)), TARGET, tokens=None, progress=False)


def test_resumed_run_charges_the_tokens_answered_from_the_table():
    damage, _ = planted_game()
    table: dict = {}
    with pytest.raises(KeyboardInterrupt):
        run_shapley(Charged(TokenPool(damage, table=table, interrupt_after=23), Budget(max_tokens=70 * 256)), TARGET,
                    tokens=256, seed=9, progress=False)
    resumed_budget, fresh_budget = Budget(max_tokens=70 * 256), Budget(max_tokens=70 * 256)
    resumed_pool, fresh_pool = TokenPool(damage, table=table), TokenPool(damage)
    run_shapley(Charged(resumed_pool, resumed_budget), TARGET, tokens=256, seed=9, progress=False)
    run_shapley(Charged(fresh_pool, fresh_budget), TARGET, tokens=256, seed=9, progress=False)
    assert resumed_pool.requested == fresh_pool.requested
    assert resumed_budget.used_tokens == fresh_budget.used_tokens <= 70 * 256


# (g) a token budget too small for a complete estimate at the top fidelity moves the coalitions lower


@pytest.mark.parametrize("estimator, needed", [("sliding", (N - 3 + 2) * 2**2), ("permutation", 2 * N)])
def test_coalitions_move_to_the_largest_fidelity_whose_complete_estimate_fits(estimator, needed):
    from orchestrator.search.drivers.shapley import coalition_tokens

    damage, _ = planted_game()
    fidelities = (128, 256, 1024)

    def tokens_for(max_tokens: int | None) -> int:
        return coalition_tokens(Charged(TokenPool(damage), Budget(max_tokens=max_tokens)), fidelities, estimator)

    reserve = 3  # the strengths' evaluations
    assert tokens_for(None) == tokens_for((needed + reserve) * 1024) == 1024
    assert tokens_for((needed + reserve) * 1024 - 1) == tokens_for((needed + reserve) * 256) == 256
    assert tokens_for((needed + reserve) * 256 - 1) == 128 == tokens_for(10)  # nothing fits: the smallest


def test_sliding_estimate_is_complete_on_a_budget_too_small_for_it_at_the_top_fidelity():
    """The demo's case: at the top fidelity the budget ended before one window; one fidelity lower every
    window is done, so the profile comes from a full estimate, not the uniform fallback."""
    from orchestrator.search.drivers.shapley import coalition_tokens

    damage, _ = planted_game()
    budget = Budget(max_tokens=((N - 1) * 4 + 3) * 256)  # the whole plan at 256 tokens, a third of it at 1024
    pool = Charged(TokenPool(damage), budget)
    top = run_shapley(Charged(TokenPool(damage), Budget(max_tokens=budget.max_tokens)), TARGET, estimator="sliding",
                      tokens=1024, progress=False)
    assert top.details["partial"]
    tokens = coalition_tokens(pool, (256, 1024), "sliding")
    result = run_shapley(pool, TARGET, estimator="sliding", tokens=tokens, progress=False)
    assert tokens == 256 and not result.details["partial"] and result.details["incomplete"] == []
    assert _protects_block_0(result) and set(pool.tokens) == {256}
