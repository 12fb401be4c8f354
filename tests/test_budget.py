"""Budgets: a driver's share of a search-wide budget, with what earlier drivers left handed on."""

import pytest
from hypothesis import given, strategies as st

from orchestrator.budget import Budget, driver_allowance
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
