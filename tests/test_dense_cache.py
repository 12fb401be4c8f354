"""The dense perplexity cache: keyed by model, test windows, dtype and device type; robust to corrupt files."""

import json
import os
from dataclasses import replace

import pytest
import torch

from scoring import dense_cache
from scoring.dense_cache import cache_dir, cached_dense_perplexity, dense_inputs, model_identity


class Counter:
    def __init__(self, value: float = 12.5):
        self.calls, self.value = 0, value

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def _model(path, weights: bytes = b"w" * 64):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


@pytest.fixture
def windows():
    return torch.arange(64).view(4, 16)


def test_second_call_reads_the_cache(tmp_path, windows):
    model = _model(tmp_path / "m")
    compute = Counter()
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute) == (12.5, False)
    assert cached_dense_perplexity(str(model), windows.clone(), torch.float32, torch.device("cpu"), compute) \
        == (12.5, True)
    assert compute.calls == 1
    files = list(cache_dir().glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["perplexity"] == 12.5
    assert str(tmp_path) in str(files[0])  # conftest isolates $SPARSEALLOC_CACHE per test


def test_other_windows_dtype_device_or_model_recompute(tmp_path, windows):
    model, other = _model(tmp_path / "m"), _model(tmp_path / "other")
    compute = Counter()
    cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)
    changed = windows.clone()
    changed[3, 15] += 1
    variants = [(str(model), changed, torch.float32, "cpu"),  # one token differs
                (str(model), windows[:3], torch.float32, "cpu"),  # fewer windows
                (str(model), windows.to(torch.int32), torch.float32, "cpu"),  # same values, other tensor dtype
                (str(model), windows, torch.bfloat16, "cpu"),
                (str(model), windows, "fp16", "cpu"),
                (str(model), windows, torch.float32, "meta"),  # another device type
                (str(other), windows, torch.float32, "cpu")]
    for spec, test, dtype, device in variants:
        assert cached_dense_perplexity(spec, test, dtype, device, compute)[1] is False
    assert compute.calls == 1 + len(variants)
    for spec, test, dtype, device in variants:  # each is cached on its own now
        assert cached_dense_perplexity(spec, test, dtype, device, compute)[1] is True
    assert compute.calls == 1 + len(variants)


def test_rewritten_weights_recompute(tmp_path, windows):
    model = _model(tmp_path / "m")
    compute = Counter()
    cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)
    weights = model / "model.safetensors"
    weights.write_bytes(b"v" * 64)  # same name and size, new contents
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)[1] is False
    (model / "model-extra.safetensors").write_bytes(b"x")  # another weight file
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)[1] is False
    (model / "README.md").write_text("notes")  # not a weight file: still cached
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)[1] is True
    (model / "config.json").write_text('{"model_type": "llama", "rope_theta": 5}')  # another architecture
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)[1] is False
    assert compute.calls == 4


def test_default_model_is_identified_by_its_recorded_sha256(tmp_path, monkeypatch):
    from pruning import assets
    from pruning.cache import cache_root

    default = _model(cache_root() / "models" / assets.DEFAULT_MODEL_NAME)
    (default / "model.safetensors.sha256").write_text("ab" * 32)
    monkeypatch.setattr(assets, "packaged_model_dir", lambda name: default)
    identity = model_identity("default")
    assert identity["default"] == assets.DEFAULT_MODEL_NAME and "path" not in identity
    weights = {entry["name"]: entry for entry in identity["files"]}["model.safetensors"]
    assert weights["sha256"] == "ab" * 32 and "mtime_ns" not in weights
    for name in ("model.safetensors", "config.json"):  # a re-conversion: same contents, new times
        os.utime(default / name, ns=(1, 1))
    assert model_identity("default") == identity
    assert model_identity(str(default)) == identity  # the resolved path is the same model


def test_a_hub_id_without_a_local_copy_is_never_cached(windows):
    compute = Counter()
    assert dense_inputs("some-org/not-fetched", windows, torch.float32, "cpu") is None
    for _ in range(2):
        assert cached_dense_perplexity("some-org/not-fetched", windows, torch.float32, "cpu", compute)[1] is False
    assert compute.calls == 2 and not cache_dir().exists()


@pytest.mark.parametrize("content", ["", "{not json", '{"perplexity": "nan-ish"}', '{"perplexity": NaN}',
                                     '{"perplexity": -1.0}', '[1, 2]', '{"perplexity": 3.0, "inputs": {"x": 1}}'])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, windows, content):
    model = _model(tmp_path / "m")
    compute = Counter()
    cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)
    path = dense_cache.cache_path(dense_inputs(str(model), windows, torch.float32, "cpu"))
    path.write_text(content)
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute) == (12.5, False)
    assert json.loads(path.read_text())["perplexity"] == 12.5
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute) == (12.5, True)
    assert compute.calls == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_an_unwritable_cache_still_gives_the_value(tmp_path, windows, monkeypatch):
    model = _model(tmp_path / "m")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(blocker))
    compute = Counter()
    for _ in range(2):
        assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute) == (12.5, False)
    assert compute.calls == 2


def test_disabled_cache_neither_reads_nor_writes(tmp_path, windows):
    model = _model(tmp_path / "m")
    compute = Counter()
    cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute)
    assert cached_dense_perplexity(str(model), windows, torch.float32, "cpu", compute, enabled=False)[1] is False
    assert compute.calls == 2


def test_run_prune_twice_reuses_the_dense_perplexity(llama_dir, corpus_file, tmp_path):
    from orchestrator.passes.prune import PruneConfig, run_prune

    def config(out, **kwargs):
        return PruneConfig(out=out, model=str(llama_dir), data=str(corpus_file), sparsity=0.5, seqlen=32,
                           calib_samples=4, eval_windows=4, progress=False, device="cpu", **kwargs)

    first = run_prune(config(tmp_path / "a"))
    second = run_prune(config(tmp_path / "b", pruner="magnitude"))
    assert first["dense_perplexity_cached"] is False and second["dense_perplexity_cached"] is True
    assert second["dense_perplexity"] == first["dense_perplexity"]
    assert "dense_eval_s" in second["timings"]
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["dense_perplexity_cached"] is True and saved["dense_perplexity"] == first["dense_perplexity"]
    # other test windows (a longer window) are not served from the cache; --no-dense-cache recomputes
    assert run_prune(replace(config(tmp_path / "c"), seqlen=24))["dense_perplexity_cached"] is False
    uncached = run_prune(config(tmp_path / "d", dense_cache=False))
    assert uncached["dense_perplexity_cached"] is False
    assert uncached["dense_perplexity"] == pytest.approx(first["dense_perplexity"], rel=1e-6)


def test_prune_command_prints_cached(llama_dir, corpus_file, tmp_path, capsys):
    from orchestrator.cli import main

    common = ["prune", "--model", str(llama_dir), "--data", str(corpus_file), "--sparsity", "0.5", "--seqlen", "32",
              "--calib-samples", "4", "--eval-windows", "2", "--device", "cpu", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "(cached)" not in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "c"), "--no-dense-cache"]) == 0
    assert "(cached)" not in capsys.readouterr().out


def test_the_search_dense_task_skips_loading_the_model_when_cached(llama_dir, monkeypatch):
    from types import SimpleNamespace

    from orchestrator.passes import tasks
    from orchestrator.passes.tasks import PassJob, dense_perplexity_task

    monkeypatch.setattr(tasks.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    loads = []
    real_load = tasks._load
    monkeypatch.setattr(tasks, "_load", lambda *args: loads.append(1) or real_load(*args))
    job = PassJob(model=str(llama_dir), pruner="wanda", device="cpu", dtype="auto", offload=None, batch_size=2,
                  threads=1, out="unused", inputs={"test": "x"})
    test = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    first = dense_perplexity_task(job, 4, test)
    second = dense_perplexity_task(job, 4, test)
    assert first["cached"] is False and second["cached"] is True and len(loads) == 1
    assert second["test_perplexity"] == first["test_perplexity"] and first["test_perplexity"] > 1
    assert first["offload"] is False and second["offload"] is None  # not loaded, so not placed
    assert second["dtype"] == "fp32" and second["device"] == "cpu" and second["inputs"] == {"test": "x"}
    assert dense_perplexity_task(job, 4, test[:2])["cached"] is False and len(loads) == 2
