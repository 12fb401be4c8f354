import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import SparseAllocError
from core.profile import Profile, read_profile, weighted_mean, write_profile
from core.units import UnitLayout


def _layout(block_weights: list[int]) -> UnitLayout:
    """One linear per block with the given weight counts."""
    return UnitLayout.of([[("mlp.down_proj", count)] for count in block_weights])


@given(blocks=st.integers(1, 80), sparsity=st.floats(0, 0.999))
def test_uniform_profile_mean_is_target(blocks, sparsity):
    profile = Profile.uniform(blocks, sparsity)
    assert profile.mean() == pytest.approx(sparsity)
    profile.check_layout(_layout([1000] * blocks), sparsity)


def test_parameter_weighted_mean():
    assert weighted_mean([0.2, 0.8], [3, 1]) == pytest.approx(0.35)
    profile = Profile((0.2, 0.8))
    profile.check_layout(_layout([3, 1]), 0.35)
    with pytest.raises(SparseAllocError, match="not the target 0.5"):
        profile.check_layout(_layout([3, 1]), 0.5)
    with pytest.raises(SparseAllocError, match="3 decoder blocks"):
        profile.check_layout(_layout([3, 1, 1]))


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
