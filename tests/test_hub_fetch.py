"""``sparsealloc fetch --model ID``: Hugging Face models cached ahead of time and loaded offline.

No network here: ``huggingface_hub.model_info`` and ``snapshot_download`` are replaced by fakes
that serve a tiny LLaMA directory (tests/conftest.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import errors as hub_errors  # noqa: E402

from conftest import build_model, save_model_dir, tiny_llama_config  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from pruning import hub  # noqa: E402
from core.errors import SparseAllocError  # noqa: E402
from pruning.load import find_blocks, load_model, load_tokenizer, num_blocks_of  # noqa: E402

# Files the hub lists besides the tiny model's own: other weight formats and sub-folders that a
# fetch must leave behind.
EXTRA_REMOTE_FILES = ["pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "README.md",
                      "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx"]


@pytest.fixture(scope="module")
def remote_repo(tmp_path_factory) -> Path:
    """What the hub holds for org/name: a tiny LLaMA saved with safetensors."""
    return save_model_dir(build_model(tiny_llama_config()), tmp_path_factory.mktemp("remote"))


class FakeHub:
    """Stands in for huggingface_hub.model_info / snapshot_download and records the calls."""

    def __init__(self, remote: Path, files: list[str] | None = None):
        self.remote = remote
        real = sorted(p.name for p in remote.iterdir() if p.is_file())
        self.files = files if files is not None else real + EXTRA_REMOTE_FILES
        self.info_calls: list[dict] = []
        self.download_calls: list[dict] = []

    def model_info(self, repo_id, **kwargs):
        self.info_calls.append({"repo_id": repo_id, **kwargs})
        siblings = [SimpleNamespace(rfilename=name, size=1000) for name in self.files]
        return SimpleNamespace(id=repo_id, sha="0123abcd" * 5, siblings=siblings)

    def snapshot_download(self, repo_id, *, local_dir, allow_patterns=None, **kwargs):
        self.download_calls.append({"repo_id": repo_id, "local_dir": local_dir, "allow_patterns": allow_patterns,
                                    **kwargs})
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            if (self.remote / name).is_file():
                shutil.copy(self.remote / name, local_dir / name)
            else:  # a listed file the tiny model does not have: write a stub
                (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (local_dir / name).write_bytes(b"stub")
        return str(local_dir)


def _raise(*_args, **_kwargs):
    raise AssertionError("the hub was contacted, but the model should come from the cache")


def _http_error(cls, status: int, message: str):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(message, response=response)


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "models"
    monkeypatch.setenv("SPARSEALLOC_MODEL_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def _install(monkeypatch, fake: FakeHub) -> FakeHub:
    monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_fetch_then_load_without_network(remote_repo, model_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    fake = _install(monkeypatch, FakeHub(remote_repo))

    assert main(["fetch", "--model", "org/name"]) == 0
    target = model_cache / "org--name"
    assert str(target) in capsys.readouterr().out
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert (target / hub.MARKER).is_file()
    assert hub.cached_model_dir("org/name") == target

    # HF_TOKEN is passed through to both hub calls; the download is pinned to the listed commit.
    assert [c["token"] for c in fake.info_calls + fake.download_calls] == ["hf_secret_for_test"] * 2
    (download,) = fake.download_calls
    assert download["repo_id"] == "org/name" and Path(download["local_dir"]) == target
    assert download["revision"] == "0123abcd" * 5
    # Only config, tokenizer and safetensors: no .bin when safetensors exist, no other formats.
    patterns = download["allow_patterns"]
    assert "model.safetensors" in patterns and "config.json" in patterns and "tokenizer.json" in patterns
    assert not any(p.endswith((".bin", ".pth", ".msgpack", ".h5", ".onnx", ".md")) or "/" in p for p in patterns)
    assert not (target / "pytorch_model.bin").exists() and not (target / "original").exists()

    # From now on any hub call fails the test: load, tokenizer, block count and a second fetch
    # are all served by the cache.
    monkeypatch.setattr(huggingface_hub, "model_info", _raise)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise)
    model, tokenizer = load_model("org/name")
    assert len(find_blocks(model)) == 4
    assert tokenizer("w1 w2").input_ids
    assert num_blocks_of("org/name") == 4
    assert load_tokenizer("org/name").vocab_size == tokenizer.vocab_size
    assert main(["fetch", "--model", "org/name"]) == 0


def test_bin_weights_only_when_no_safetensors(remote_repo, model_cache, monkeypatch):
    files = ["config.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin", "tf_model.h5"]
    fake = _install(monkeypatch, FakeHub(remote_repo, files=files))
    hub.fetch_model("org/bin-only")
    (download,) = fake.download_calls
    assert sorted(download["allow_patterns"]) == ["config.json", "pytorch_model.bin", "tokenizer.json",
                                                  "tokenizer_config.json"]
    assert download["token"] is None  # no HF_TOKEN: huggingface_hub falls back to a stored login


def test_select_files():
    sharded = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin.index.json",
               "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "tokenizer.model",
               "special_tokens_map.json", "original/consolidated.00.pth", "LICENSE.md", "flax_model.msgpack"]
    assert hub.select_files(sharded) == sorted(
        ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model",
         "special_tokens_map.json"])
    with pytest.raises(SparseAllocError, match="config.json"):
        hub.select_files(["model.safetensors", "tokenizer.json"])
    with pytest.raises(SparseAllocError, match="neither safetensors nor"):
        hub.select_files(["config.json", "consolidated.00.pth", "model.gguf"])


def test_gated_model_without_token_says_set_hf_token(remote_repo, model_cache, monkeypatch, capsys):
    fake = _install(monkeypatch, FakeHub(remote_repo))

    def gated(*_args, **_kwargs):
        raise _http_error(hub_errors.GatedRepoError, 401, "401 Client Error. Cannot access gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    assert main(["fetch", "--model", "meta-llama/Llama-2-7b-hf"]) == 2
    err = capsys.readouterr().err
    assert "gated" in err and "export HF_TOKEN=" in err and "https://huggingface.co/meta-llama/Llama-2-7b-hf" in err
    assert fake.info_calls  # the listing worked; the download was refused
    assert hub.cached_model_dir("meta-llama/Llama-2-7b-hf") is None  # nothing half-fetched is used


def test_refused_token_and_other_hub_errors(remote_repo, model_cache, monkeypatch):
    _install(monkeypatch, FakeHub(remote_repo))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")

    def refuse(*_args, **_kwargs):
        raise _http_error(hub_errors.HfHubHTTPError, 403, "403 Forbidden")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(SparseAllocError, match="token in HF_TOKEN.*Accept the model's conditions"):
        hub.fetch_model("org/name")

    def not_found(*_args, **_kwargs):
        raise _http_error(hub_errors.RepositoryNotFoundError, 404, "404 Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    with pytest.raises(SparseAllocError, match="no model 'org/typo' on the Hugging Face hub"):
        hub.fetch_model("org/typo")

    def offline(*_args, **_kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    with pytest.raises(SparseAllocError, match="network access to huggingface.co"):
        hub.fetch_model("org/name")


def test_bad_ids_and_incomplete_downloads(remote_repo, model_cache, monkeypatch):
    fake = _install(monkeypatch, FakeHub(remote_repo))
    for bad in ("a/b/c", "org/../x", "org--name", "/abs/path"):
        with pytest.raises(SparseAllocError, match="not a Hugging Face model id"):
            hub.fetch_model(bad)
    assert not fake.info_calls

    def partial(repo_id, *, local_dir, allow_patterns=None, **_kwargs):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(remote_repo / "config.json", Path(local_dir) / "config.json")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", partial)
    with pytest.raises(SparseAllocError, match="incomplete.*run it again"):
        hub.fetch_model("org/name")
    assert hub.cached_model_dir("org/name") is None


def test_default_cache_follows_sparsealloc_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEALLOC_MODEL_CACHE", raising=False)
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(tmp_path / "c"))
    assert hub.model_dir_of("org/name") == tmp_path / "c" / "models" / "org--name"
    assert hub.cached_model_dir("org/name") is None


def test_refuses_before_downloading_when_the_disk_is_too_small(remote_repo, model_cache, monkeypatch):
    fake = _install(monkeypatch, FakeHub(remote_repo))
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda _path: SimpleNamespace(total=10**6, used=10**6 - 500,
                                                                                 free=500))
    with pytest.raises(SparseAllocError, match="GiB are free.*SPARSEALLOC_MODEL_CACHE"):
        hub.fetch_model("org/name")
    assert not fake.download_calls


def test_our_own_bugs_are_not_dressed_as_hub_errors(remote_repo, model_cache, monkeypatch):
    _install(monkeypatch, FakeHub(remote_repo))

    def bug(*_args, **_kwargs):
        raise TypeError("unexpected keyword")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", bug)
    with pytest.raises(TypeError):
        hub.fetch_model("org/name")
