import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import SparseAllocError
from search_spaces.families import (
    atp,
    atp_beta_max,
    atp_space,
    free_keys,
    free_space,
    free_vector,
    nm_profile,
    owl,
    owl_space,
    sensitivity_map,
    sensitivity_space,
    uniform,
)
from core.profile import Profile

EXAMPLES = settings(max_examples=100, deadline=None)


def test_uniform():
    assert uniform(3, 0.5) == Profile((0.5, 0.5, 0.5))
    with pytest.raises(SparseAllocError, match=r"\[0, 1\)"):
        uniform(3, 1.0)
    with pytest.raises(SparseAllocError, match="at least one block"):
        uniform(0, 0.5)


@EXAMPLES
@given(st.integers(1, 80), st.floats(0.0, 0.999), st.floats(0.0, 1.0))
def test_atp_mean_and_monotone(blocks, target, fraction):
    profile = atp(blocks, target, fraction * atp_beta_max(blocks, target))
    assert abs(profile.mean() - target) <= 1e-9
    assert all(a <= b for a, b in zip(profile.sparsities, profile.sparsities[1:]))
    assert max(profile.sparsities) <= 0.99 or max(profile.sparsities) == target


@given(st.integers(1, 80), st.floats(0.0, 0.999))
@settings(max_examples=50, deadline=None)
def test_atp_beta_zero_is_uniform_and_range_is_enforced(blocks, target):
    assert atp(blocks, target, 0.0) == Profile.uniform(blocks, target)
    beta_max = atp_beta_max(blocks, target)
    with pytest.raises(SparseAllocError, match="must lie in"):
        atp(blocks, target, beta_max * 1.01 + 1e-6)
    with pytest.raises(SparseAllocError, match="must lie in"):
        atp(blocks, target, -0.01)


def test_atp_hand_examples():
    # L = 4, S = 0.3: beta_max = 0.6 / 3 = 0.2, so blocks run 0.0, 0.2, 0.4, 0.6.
    assert atp_beta_max(4, 0.3) == pytest.approx(0.2)
    assert atp(4, 0.3, 0.2).sparsities == pytest.approx((0.0, 0.2, 0.4, 0.6))
    # S = 0.6: 2(1 - S) would put the last block at 1.0, so the cap 0.99 applies: 2 * 0.39 / 3.
    assert atp_beta_max(4, 0.6) == pytest.approx(0.26)
    assert atp(4, 0.6, atp_beta_max(4, 0.6)).sparsities == pytest.approx((0.21, 0.47, 0.73, 0.99))
    assert atp_beta_max(1, 0.5) == 0.0
    assert atp_space(4, 0.3) == {"beta": ("uniform", 0.0, atp_beta_max(4, 0.3))}


@EXAMPLES
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    st.floats(0.4, 0.59),
    st.floats(0.0, 0.2),
)
def test_owl_properties(ratios, target, lam):
    profile = owl(ratios, target, lam)
    s = np.asarray(profile.sparsities)
    assert abs(s.mean() - target) <= 1e-9
    assert np.all(s >= target - 2 * lam - 1e-12) and np.all(s <= target + 2 * lam + 1e-12)
    if max(ratios) > min(ratios):
        assert s.max() - s.min() == pytest.approx(2 * lam, abs=1e-9)
    for i, di in enumerate(ratios):
        for j, dj in enumerate(ratios):
            if di > dj:
                assert s[i] <= s[j]
            elif di == dj:
                assert s[i] == pytest.approx(s[j], abs=1e-12)


def test_owl_hand_examples():
    # r = [0, 0.16, 0.08], mean 0.08: s = 0.5 - (r - 0.08).
    assert owl([0.1, 0.3, 0.2], 0.5).sparsities == pytest.approx((0.58, 0.42, 0.5), abs=1e-12)
    # One outlier-heavy block: the spread is 2 * lam but not centred on the target (OWL's own formula).
    assert owl([0.0, 0.0, 0.0, 1.0], 0.5, 0.08).sparsities == pytest.approx((0.54, 0.54, 0.54, 0.38), abs=1e-12)
    assert owl([0.2, 0.2, 0.2], 0.7) == Profile.uniform(3, 0.7)


def test_owl_projects_back_into_range():
    profile = owl([0.0, 0.5, 1.0, 0.2], 0.9, 0.2)
    s = profile.sparsities
    assert abs(profile.mean() - 0.9) <= 1e-9 and max(s) <= 0.99
    assert s[2] <= s[1] <= s[3] <= s[0]


def test_owl_rejects_bad_input():
    with pytest.raises(SparseAllocError, match="lambda"):
        owl([0.1, 0.2], 0.5, -0.1)
    with pytest.raises(SparseAllocError, match="outlier ratio"):
        owl([], 0.5)


@EXAMPLES
@given(
    st.lists(st.floats(-100.0, 100.0), min_size=1, max_size=40),
    st.floats(0.05, 0.95),
    st.floats(0.0, 3.0),
    st.booleans(),
)
def test_sensitivity_map_properties(sensitivities, target, strength, weighted):
    weights = [1.0 + (i % 3) for i in range(len(sensitivities))] if weighted else None
    profile = sensitivity_map(sensitivities, target, strength, weights)
    s = profile.sparsities
    assert abs(profile.mean(weights) - target) <= 1e-9
    assert all(0.0 <= x <= 0.99 for x in s)
    if not weighted:
        for i, a in enumerate(sensitivities):
            for j, b in enumerate(sensitivities):
                if a > b:
                    assert s[i] <= s[j] + 1e-12


@given(st.lists(st.floats(-100.0, 100.0), min_size=1, max_size=40), st.floats(0.0, 0.99))
@settings(max_examples=50, deadline=None)
def test_sensitivity_map_strength_zero_is_uniform(sensitivities, target):
    assert sensitivity_map(sensitivities, target, 0.0).sparsities == pytest.approx([target] * len(sensitivities))


def test_sensitivity_map_hand_example():
    # z = [-sqrt(1.5), 0, sqrt(1.5)]; s = 0.5 - z * 0.5 / 2.
    half = np.sqrt(1.5) / 4
    assert sensitivity_map([1.0, 2.0, 3.0], 0.5, 1.0).sparsities == pytest.approx((0.5 + half, 0.5, 0.5 - half))
    assert sensitivity_map([2.0, 2.0], 0.4, 3.0).sparsities == pytest.approx((0.4, 0.4), abs=1e-12)
    with pytest.raises(SparseAllocError, match="strength"):
        sensitivity_map([1.0, 2.0], 0.5, -1.0)


@EXAMPLES
@given(st.lists(st.floats(-2.0, 2.0), min_size=1, max_size=40), st.floats(0.0, 0.99), st.booleans())
def test_free_vector_is_valid(values, target, weighted):
    weights = [float(1 + i) for i in range(len(values))] if weighted else None
    profile = free_vector(values, target, weights)
    assert len(profile) == len(values)
    assert abs(profile.mean(weights) - target) <= 1e-9
    assert all(0.0 <= x <= 0.99 for x in profile.sparsities)


def test_free_space_keys():
    assert free_space(3) == {key: ("uniform", 0.0, 0.99) for key in ("s_00", "s_01", "s_02")}
    assert free_space(2, 0.1, 0.8)["s_01"] == ("uniform", 0.1, 0.8)
    keys = free_keys(101)
    assert keys[0] == "s_000" and keys[-1] == "s_100" and keys == sorted(keys)


@EXAMPLES
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    st.sampled_from([2, 4, 8]),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_nm_profile(values, m, fraction, weighted):
    target = fraction * (m - 1) / m
    weights = [float(1 + i % 4) for i in range(len(values))] if weighted else None
    profile = nm_profile(values, target, m, weights)
    assert profile.nm is not None
    for s, pattern in zip(profile.sparsities, profile.nm):
        if s == 0:
            assert pattern is None
        else:
            assert pattern[1] == m and pattern[0] / m == s
    assert abs(profile.mean(weights) - target) <= 1 / m


def test_nm_profile_hand_example():
    profile = nm_profile([0.1, 0.6, 0.9, 0.3], 0.5)
    assert profile.sparsities == (0.25, 0.75, 0.75, 0.25)
    assert profile.nm == ((1, 4), (3, 4), (3, 4), (1, 4))
    assert nm_profile([0.05, 0.05], 0.0).nm == (None, None)


def test_spaces_are_plain_descriptions():
    spaces = [atp_space(8, 0.5), owl_space((3, 10)), sensitivity_space(), free_space(4)]
    for space in spaces:
        for kind, low, high in space.values():
            assert kind in {"uniform", "loguniform", "int"} and low <= high
    assert owl_space(range(3, 11)) == {"lam": ("uniform", 0.0, 0.2), "M": ("int", 3, 10)}
    assert sensitivity_space() == {"strength": ("uniform", 0.0, 3.0)}
    code = "import sys, search_spaces.families; assert not {'ray', 'optuna', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
