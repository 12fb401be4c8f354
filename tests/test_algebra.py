import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import SparseAllocError
from search_spaces.algebra import level_grid, nm_levels, project, round_to_levels
from core.profile import weighted_mean


@st.composite
def problems(draw, max_size=12):
    """(values, weights or None, target, lo, hi) with target feasible."""
    values = draw(st.lists(st.floats(-1.0, 2.0), min_size=1, max_size=max_size))
    weights = draw(st.none() | st.lists(st.floats(0.1, 10.0), min_size=len(values), max_size=len(values)))
    lo, hi = sorted(draw(st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.99))))
    target = draw(st.floats(lo, hi))
    return values, weights, target, lo, hi


def _assert_feasible(x, weights, target, lo, hi):
    assert all(lo <= xi <= hi for xi in x)
    assert abs(weighted_mean(x, weights) - target) <= 1e-9


@settings(max_examples=150, deadline=None)
@given(problems())
def test_project_is_feasible_and_idempotent(problem):
    values, weights, target, lo, hi = problem
    x = project(values, target, weights, lo, hi)
    assert len(x) == len(values)
    _assert_feasible(x, weights, target, lo, hi)
    again = project(x, target, weights, lo, hi)
    assert np.allclose(again, x, rtol=0, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_project_no_feasible_neighbour_is_closer(problem, seed):
    values, weights, target, lo, hi = problem
    v = np.asarray(values)
    w = np.ones(len(v)) if weights is None else np.asarray(weights)
    x = np.asarray(project(values, target, weights, lo, hi))
    best = float(((x - v) ** 2).sum())
    rng = np.random.default_rng(seed)
    directions = [rng.normal(size=len(v)) for _ in range(20)]
    directions += [np.eye(len(v))[i] / w[i] - np.eye(len(v))[j] / w[j] for i in range(len(v)) for j in range(len(v)) if i != j]
    for d in directions:
        d = d - (w @ d) / (w @ w) * w  # keep the weighted mean fixed
        room = [((hi - xi) / di if di > 0 else (lo - xi) / di) for xi, di in zip(x, d) if abs(di) > 1e-15]
        step = min([1e-2, *room])
        if step <= 0:
            continue
        y = x + step * d  # feasible by construction (up to rounding)
        assert float(((y - v) ** 2).sum()) >= best - 1e-12


@settings(max_examples=40, deadline=None)
@given(problems(max_size=5))
def test_project_matches_a_generic_solver(problem):
    optimize = pytest.importorskip("scipy.optimize")
    values, weights, target, lo, hi = problem
    v = np.asarray(values)
    w = np.ones(len(v)) if weights is None else np.asarray(weights)
    ours = np.asarray(project(values, target, weights, lo, hi))
    result = optimize.minimize(
        lambda x: ((x - v) ** 2).sum(), np.full(len(v), target), jac=lambda x: 2 * (x - v), method="SLSQP",
        bounds=[(lo, hi)] * len(v), constraints=[{"type": "eq", "fun": lambda x: w @ x / w.sum() - target}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert ((ours - v) ** 2).sum() <= ((result.x - v) ** 2).sum() + 1e-8
    assert np.allclose(ours, result.x, atol=1e-4)


def test_project_hand_examples():
    assert project([0.1, 0.9, 0.5], 0.5) == pytest.approx([0.1, 0.9, 0.5], abs=1e-12)
    assert project([1.0, 1.0, 1.0], 0.5) == pytest.approx([0.5, 0.5, 0.5], abs=1e-12)
    # Third entry clips at hi; the other two share the remaining mass equally.
    assert project([0.0, 0.0, 3.0], 0.5) == pytest.approx([0.255, 0.255, 0.99], abs=1e-12)
    # x = clip(v - mu * w): with weights (1, 2, 3) and mu = 1.24 the last one clips at 0.
    assert project([2.0, 3.0, -1.0], 0.3, [1, 2, 3]) == pytest.approx([0.76, 0.52, 0.0], abs=1e-12)
    assert project([0.2, 0.4], 0.99) == [0.99, 0.99]
    assert project([0.2, 0.4], 0.0) == [0.0, 0.0]


def test_project_rejects_bad_input():
    with pytest.raises(SparseAllocError, match="infeasible"):
        project([0.5, 0.5], 0.995)
    with pytest.raises(SparseAllocError, match="infeasible"):
        project([0.5, 0.5], 0.1, lo=0.2)
    with pytest.raises(SparseAllocError, match="one weight per block"):
        project([0.5, 0.5], 0.5, [1.0])
    with pytest.raises(SparseAllocError, match="positive"):
        project([0.5, 0.5], 0.5, [1.0, 0.0])
    with pytest.raises(SparseAllocError, match="non-empty"):
        project([], 0.5)
    with pytest.raises(SparseAllocError, match="finite"):
        project([0.5, float("nan")], 0.5)


@st.composite
def rounding_problems(draw):
    menu = draw(st.sampled_from(["grid", "nm", "random"]))
    if menu == "grid":
        levels = level_grid()
    elif menu == "nm":
        levels = [0.0, *nm_levels(draw(st.sampled_from([2, 4, 8])))]
    else:
        levels = sorted({k / 1000 for k in draw(st.lists(st.integers(0, 990), min_size=1, max_size=8))})
    values = draw(st.lists(st.floats(-0.2, 1.2), min_size=1, max_size=40))
    weights = draw(st.none() | st.lists(st.floats(0.1, 10.0), min_size=len(values), max_size=len(values)))
    target = draw(st.floats(levels[0], levels[-1]))
    return values, levels, target, weights


@settings(max_examples=150, deadline=None)
@given(rounding_problems())
def test_round_to_levels_lands_on_grid_near_target(problem):
    values, levels, target, weights = problem
    rounded = round_to_levels(values, levels, target, weights)
    assert len(rounded) == len(values)
    assert set(rounded) <= set(levels)
    max_gap = max(np.diff(levels), default=0.0)
    assert abs(weighted_mean(rounded, weights) - target) <= max_gap / 2 + 1e-9
    assert round_to_levels(values, levels, target, weights) == rounded


def test_round_to_levels_hand_example():
    # Nearest rounding gives mean 0.25; the two lowest-index entries (equal errors) move up one level.
    assert round_to_levels([0.3, 0.3, 0.3, 0.3], [0.0, 0.25, 0.5, 0.75], 0.375) == [0.5, 0.5, 0.25, 0.25]
    # Already on the grid at the target: unchanged.
    assert round_to_levels([0.25, 0.75], [0.0, 0.25, 0.5, 0.75], 0.5) == [0.25, 0.75]
    # A heavy block moves less often than light ones would.
    assert round_to_levels([0.5, 0.5], [0.0, 0.5, 1.0], 0.6, [1, 9]) == [1.0, 0.5]


def test_round_to_levels_rejects_bad_input():
    with pytest.raises(SparseAllocError, match="outside the level range"):
        round_to_levels([0.5], [0.25, 0.5, 0.75], 0.8)
    with pytest.raises(SparseAllocError, match="non-empty"):
        round_to_levels([0.5], [], 0.5)


def test_level_menus():
    grid = level_grid()
    assert len(grid) == 100 and grid[0] == 0.0 and grid[-1] == 0.99 and grid[37] == 0.37
    assert level_grid(0.25, 0.0, 0.9) == [0.0, 0.25, 0.5, 0.75]
    assert nm_levels(4) == [0.25, 0.5, 0.75]
    assert nm_levels(2) == [0.5]
    with pytest.raises(SparseAllocError):
        nm_levels(1)
    with pytest.raises(SparseAllocError):
        level_grid(0.0)
