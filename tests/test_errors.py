"""Each bad input a user can give raises SparseAllocError with a message that says what to fix."""

import json

import pytest

from conftest import build_model, save_model_dir
from orchestrator.passes import model_io
from orchestrator.cli import main
from orchestrator.passes.prune import PruneConfig, run_prune
from core.errors import SparseAllocError
from core.profile import Profile, parse_nm


def _run(model_dir, data, out, **kwargs):
    config = dict(seqlen=32, calib_samples=4, eval_windows=2, progress=False, device="cpu", pruner="wanda")
    return run_prune(PruneConfig(out=out, model=str(model_dir), data=str(data), **{**config, **kwargs}))


def _profile_file(tmp_path, sparsities, target=None):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"sparsities": sparsities, "target": target}))
    return path


def test_profile_length_must_match_blocks(llama_dir, corpus_file, tmp_path):
    with pytest.raises(SparseAllocError, match="4 decoder blocks"):
        _run(llama_dir, corpus_file, tmp_path / "o", profile=_profile_file(tmp_path, [0.5, 0.5, 0.5]))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval(llama_dir, corpus_file, tmp_path, ratio):
    with pytest.raises(SparseAllocError, match=r"\[0, 1\)"):
        _run(llama_dir, corpus_file, tmp_path / "o", sparsity=ratio)
    with pytest.raises(SparseAllocError, match=r"\[0, 1\)"):
        _run(llama_dir, corpus_file, tmp_path / "o", profile=_profile_file(tmp_path, [0.5, 0.5, 0.5, ratio]))


def test_profile_mean_must_be_target(llama_dir, corpus_file, tmp_path):
    path = _profile_file(tmp_path, [0.4, 0.5, 0.6, 0.7])
    with pytest.raises(SparseAllocError, match="not the target"):
        _run(llama_dir, corpus_file, tmp_path / "o", profile=path, sparsity=0.5)
    with pytest.raises(SparseAllocError, match="not the target"):
        _run(llama_dir, corpus_file, tmp_path / "o", profile=_profile_file(tmp_path, [0.4, 0.5, 0.6, 0.7], 0.5))


def test_unknown_model_path(corpus_file, tmp_path):
    with pytest.raises(SparseAllocError, match="does not exist"):
        _run(tmp_path / "no-such-model", corpus_file, tmp_path / "o", sparsity=0.5)
    with pytest.raises(SparseAllocError, match="not a Hugging Face model directory"):
        _run(tmp_path, corpus_file, tmp_path / "o", sparsity=0.5)


def test_unsupported_architecture_names_the_supported_ones(corpus_file, tmp_path):
    from transformers import GPT2Config

    model_dir = save_model_dir(build_model(GPT2Config(vocab_size=123, n_embd=32, n_layer=2, n_head=2)), tmp_path / "gpt2")
    with pytest.raises(SparseAllocError, match="not supported; supported: llama"):
        _run(model_dir, corpus_file, tmp_path / "o", sparsity=0.5)


def test_empty_dataset(llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SparseAllocError, match="empty"):
        _run(llama_dir, empty, tmp_path / "o", sparsity=0.5)


def test_missing_data_file(llama_dir, tmp_path):
    with pytest.raises(SparseAllocError, match="does not exist"):
        _run(llama_dir, tmp_path / "nothing.jsonl", tmp_path / "o", sparsity=0.5)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4"])
def test_bad_nm(text):
    with pytest.raises(SparseAllocError, match="N:M"):
        parse_nm(text)


def test_nm_and_profile_disagreement():
    with pytest.raises(SparseAllocError, match="means sparsity"):
        Profile((0.5, 0.3), ((2, 4), (2, 4)))


def test_non_empty_out_needs_overwrite(llama_dir, corpus_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SparseAllocError, match="--overwrite"):
        _run(llama_dir, corpus_file, out, sparsity=0.5)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_out_never_holds_a_half_result(llama_dir, corpus_file, tmp_path, monkeypatch, failure):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("previous run")

    def fail(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(model_io, "write_profile", fail)
    with pytest.raises(type(failure)):
        _run(llama_dir, corpus_file, out, sparsity=0.5, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_cli_prints_the_error_without_traceback(llama_dir, corpus_file, tmp_path, capsys):
    code = main(["prune", "--model", str(llama_dir), "--data", str(corpus_file), "--sparsity", "1.2",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "Traceback" not in err
