"""Budgets: a driver's share of a search-wide budget, with what earlier drivers left handed on."""

import pytest
from hypothesis import given, strategies as st

from orchestrator.search.budget import Budget, driver_allowance
from core.errors import SparseAllocError

shares_lists = st.lists(st.floats(0.05, 1.0), min_size=1, max_size=6)


@given(shares_lists, st.floats(1.0, 1e5))
def test_drivers_that_spend_their_allowance_use_exactly_the_total(shares, total):
    shares = [s / sum(shares) for s in shares]
    spent = 0.0
    for i, share in enumerate(shares):
        allowance = driver_allowance(total, spent, share, sum(shares[i:]))
        assert allowance >= total * share * (1 - 1e-9)
        spent += allowance
    assert spent == pytest.approx(total, rel=1e-9)


@given(shares_lists, st.floats(1.0, 1e5), st.floats(0.0, 1.0))
def test_what_a_driver_leaves_goes_to_the_next_ones(shares, total, used_fraction):
    shares = [s / sum(shares) for s in shares]
    first = driver_allowance(total, 0.0, shares[0], 1.0)
    assert first == pytest.approx(total * shares[0])
    if len(shares) > 1:
        left = sum(shares[1:])
        second = driver_allowance(total, first * used_fraction, shares[1], left)
        assert second == pytest.approx(total * shares[1] + first * (1 - used_fraction) * shares[1] / left)


def test_an_overrun_never_shrinks_a_later_share_below_its_own():
    assert driver_allowance(100.0, 90.0, 0.5, 0.5) == 50.0  # the first half overran by 40
    assert driver_allowance(None, 0.0, 0.5, 1.0) is None


def test_bad_shares_and_budgets_are_refused():
    with pytest.raises(SparseAllocError, match="share"):
        driver_allowance(10.0, 0.0, 0.0, 1.0)
    with pytest.raises(SparseAllocError, match="share"):
        driver_allowance(10.0, 0.0, 0.6, 0.5)
    with pytest.raises(SparseAllocError, match="at least 1"):
        Budget(max_evals=0)
    with pytest.raises(SparseAllocError, match="positive"):
        Budget(max_seconds=0)


def test_budget_counts_evaluations():
    budget = Budget(max_evals=3)
    budget.charge(2)
    assert budget.remaining_evals() == 1 and not budget.exhausted()
    budget.charge()
    assert budget.exhausted() and budget.fraction_used() == 1.0


# --- forward tokens ---------------------------------------------------------------------------------

charges = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5000)), max_size=12)


@given(st.integers(1, 20_000), charges)
def test_token_budget_counts_the_tokens_charged(max_tokens, charged):
    budget = Budget(max_tokens=max_tokens)
    for evaluations, tokens in charged:
        budget.charge(evaluations, tokens)
    used = sum(t for _, t in charged)
    assert budget.used_tokens == used and budget.used_evals == sum(e for e, _ in charged)
    assert budget.remaining_tokens() == max(0, max_tokens - used)
    assert budget.exhausted() == (used >= max_tokens)
    assert budget.fraction_used() == pytest.approx(min(1.0, used / max_tokens))
    assert budget.remaining_evals() is None  # the evaluation count is not limited by a token budget


@given(st.integers(1, 200), st.integers(1, 20_000), st.integers(0, 100), st.integers(0, 20_000),
       st.integers(0, 4096), st.integers(0, 5), st.integers(0, 5000))
def test_room_is_the_most_evaluations_that_fit(max_evals, max_tokens, used_evals, used_tokens, each, keep_evals,
                                               keep_tokens):
    budget = Budget(max_evals=max_evals, max_tokens=max_tokens, used_evals=used_evals, used_tokens=used_tokens)
    k = budget.room(each, keep_evals, keep_tokens)
    assert k is not None and k >= 0
    if k > 0:  # k evaluations, then what is kept back, fit; one more does not
        assert budget.fits(k + keep_evals, k * each + keep_tokens)
    assert not budget.fits(k + 1 + keep_evals, (k + 1) * each + keep_tokens)


@given(st.integers(1, 64), st.sampled_from([256, 512, 1024, 2048]))
def test_a_1024_token_evaluation_costs_four_256_token_ones(count, tokens):
    budget = Budget(max_tokens=count * 1024)
    assert budget.room(1024) == count and budget.room(256) == 4 * count
    budget.charge(1, 1024)
    assert budget.room(256) == 4 * (count - 1)
    both = Budget(max_evals=3, max_tokens=10 * tokens)
    assert both.room(tokens) == 3 and both.room(4 * tokens) == 2  # whichever limit binds first


def test_a_charged_pool_charges_every_candidate_its_tokens_in_one_place():
    from types import SimpleNamespace

    from orchestrator.search.budget import Charged, eval_tokens

    batch = [SimpleNamespace(tokens=256, metric="kl"), SimpleNamespace(tokens=None, metric="kl"),
             SimpleNamespace(tokens=1024, metric="kl-seq")]
    budget = Budget()
    pool = SimpleNamespace(evaluate=lambda candidates: [1.0] * len(candidates), max_tokens=4096, num_blocks=3)
    charged = Charged(pool, budget, sequential_tokens=100)
    assert charged.evaluate(batch) == [1.0] * 3 and charged.num_blocks == 3  # the pool's answers and attributes
    assert budget.used_evals == 3 and budget.used_tokens == 256 + 4096 + 1024 + 100  # kl-seq's calibration too
    assert charged.cost(None) == 4096 and charged.cost(512, "kl-seq") == 612
    unknown = Budget()
    Charged(lambda candidates: [0.0] * len(candidates), unknown).evaluate(batch[:2])
    assert unknown.used_evals == 2 and unknown.used_tokens == 256  # all tokens, size unknown: not counted
    assert eval_tokens(256, 4096, Budget()) == 256 and eval_tokens(None, 4096, Budget()) == 4096
    assert eval_tokens(None, None, Budget(max_evals=3)) == 0
    with pytest.raises(SparseAllocError, match="token budget"):
        eval_tokens(None, None, Budget(max_tokens=1000))


def test_unlimited_budget_has_unlimited_room_and_token_budgets_are_validated():
    assert Budget().room(1024) is None and Budget().remaining_tokens() is None and Budget().fits(10**9, 10**12)
    assert Budget(max_tokens=100, used_tokens=90).room(0, keep_tokens=20) == 0  # the reserve does not fit
    with pytest.raises(SparseAllocError, match="token budget must be at least 1"):
        Budget(max_tokens=0)


def test_token_allowances_hand_on_what_earlier_drivers_left():
    first = driver_allowance(100_000, 0, 0.3, 1.0)
    assert first == pytest.approx(30_000)
    assert driver_allowance(100_000, 20_000, 0.4, 0.7) == pytest.approx(80_000 * 0.4 / 0.7)


def test_progress_line_shows_tokens():
    from orchestrator.search.progress import DriverProgress

    budget = Budget(max_tokens=40_000)
    bar = DriverProgress("t", budget, enabled=False)
    budget.charge(4, 10_000)
    bar.update(1.5)
    assert bar.by_tokens and bar.bar.n == 10_000 and bar.bar.total == 40_000
    assert "4 evals" in bar.postfix()
    both = Budget(max_evals=10, max_tokens=40_000)
    line = DriverProgress("t", both, enabled=False)
    both.charge(1, 20_000)  # tokens are furthest spent: the ETA follows them
    line.update(2.0)
    assert not line.by_tokens and line.bar.n == 1 and "20k/40k tokens" in line.postfix()
    assert both.fraction_used() == 0.5
