import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import SparseAllocError
from core.profile import Profile, read_profile, weighted_mean, write_profile


@given(blocks=st.integers(1, 80), sparsity=st.floats(0, 0.999))
def test_uniform_profile_mean_is_target(blocks, sparsity):
    profile = Profile.uniform(blocks, sparsity)
    assert profile.mean() == pytest.approx(sparsity)
    profile.check_fits(blocks, [1000] * blocks, sparsity)


def test_parameter_weighted_mean():
    assert weighted_mean([0.2, 0.8], [3, 1]) == pytest.approx(0.35)
    profile = Profile((0.2, 0.8))
    profile.check_fits(2, [3, 1], 0.35)
    with pytest.raises(SparseAllocError):
        profile.check_fits(2, [3, 1], 0.5)


def test_json_round_trip(tmp_path):
    profile = Profile((0.5, 0.75, 0.2), ((2, 4), (3, 4), None))
    write_profile(tmp_path / "p.json", profile, target=0.48333)
    loaded, target = read_profile(tmp_path / "p.json")
    assert loaded == profile and target == 0.48333


def test_bad_profile_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SparseAllocError, match="not valid JSON"):
        read_profile(tmp_path / "bad.json")
    with pytest.raises(SparseAllocError, match="does not exist"):
        read_profile(tmp_path / "none.json")
    (tmp_path / "nolist.json").write_text("{}")
    with pytest.raises(SparseAllocError, match="sparsities"):
        read_profile(tmp_path / "nolist.json")
