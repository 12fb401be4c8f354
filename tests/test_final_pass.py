import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.passes.prune import PruneConfig, run_prune
from pruning.load import find_blocks, find_linears
from core.profile import Profile, write_profile


def _config(model_dir, data, out, **kwargs) -> PruneConfig:
    defaults = dict(seqlen=32, calib_samples=8, eval_windows=6, batch_size=4, progress=False, device="cpu",
                    dense_cache=False)  # every test computes its own dense perplexity
    return PruneConfig(out=out, model=str(model_dir), data=str(data), **{**defaults, **kwargs})


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_uniform_pass_saves_model_profile_and_metrics(llama_dir, corpus_file, tmp_path, pruner):
    out = tmp_path / "out"
    metrics = run_prune(_config(llama_dir, corpus_file, out, pruner=pruner, sparsity=0.5))
    assert metrics["achieved_sparsity"]["per_block"] == [0.5] * 4
    assert all(v == 0.5 for v in metrics["achieved_sparsity"]["per_linear"].values())
    assert math.isfinite(metrics["pruned_perplexity"]) and metrics["dense_perplexity"] > 1

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.randint(3, 100, (2, 20))
    with torch.no_grad():
        assert not torch.allclose(reloaded(ids).logits, dense(ids).logits)
    # embeddings and lm_head stay dense
    assert torch.equal(reloaded.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(reloaded.lm_head.weight, dense.lm_head.weight)

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("seqlen", "seed", "calibration", "test", "data"):
        assert key in saved["protocol"]
    assert saved["protocol"]["calibration"]["samples"] == 8
    assert json.loads((out / "profile.json").read_text())["sparsities"] == [0.5] * 4
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_saved_model_logits_equal_in_memory_pruned_model(llama_dir, corpus_file, tmp_path):
    from pruning.load import load_model
    from pruning.pruners import get_pruner
    from pruning.sequential import prune_sequentially
    from pruning.data import prepare_tokens

    out = tmp_path / "out"
    run_prune(_config(llama_dir, corpus_file, out, pruner="wanda", sparsity=0.6, seed=3))
    model, tokenizer = load_model(str(llama_dir))
    data = prepare_tokens(tokenizer, str(corpus_file), seqlen=32, calib_samples=8, eval_windows=6, seed=3)
    prune_sequentially(model, data.calibration, Profile.uniform(4, 0.6), get_pruner("wanda"),
                       torch.device("cpu"), batch_size=4, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = data.test[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_per_block_profile_with_mixed_nm(llama_dir, corpus_file, tmp_path):
    profile = Profile((0.5, 0.3, 0.5, 0.0), ((2, 4), None, (4, 8), None))
    path = tmp_path / "profile.json"
    write_profile(path, profile)
    out = tmp_path / "out"
    metrics = run_prune(_config(llama_dir, corpus_file, out, pruner="sparsegpt", profile=path))
    assert metrics["target_sparsity"] == pytest.approx(0.325)
    model = AutoModelForCausalLM.from_pretrained(out)
    blocks = find_blocks(model)
    dense_blocks = find_blocks(AutoModelForCausalLM.from_pretrained(llama_dir))
    for layer in find_linears(blocks[0]).values():
        groups = (layer.weight == 0).reshape(layer.out_features, -1, 4).sum(-1)
        assert (groups >= 2).all()
    for layer in find_linears(blocks[2]).values():
        assert ((layer.weight == 0).reshape(layer.out_features, -1, 8).sum(-1) >= 4).all()
    assert metrics["achieved_sparsity"]["per_block"][1] == pytest.approx(0.3, abs=0.01)
    for name, layer in find_linears(blocks[3]).items():
        assert torch.equal(layer.weight, find_linears(dense_blocks[3])[name].weight), "sparsity 0 block changed"


def test_opt_model_prunes_with_every_pruner(opt_dir, corpus_file, tmp_path):
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        metrics = run_prune(_config(opt_dir, corpus_file, tmp_path / pruner, pruner=pruner, nm="2:4"))
        assert metrics["achieved_sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
        assert math.isfinite(metrics["pruned_perplexity"])


def test_sequential_calibration_sees_pruned_outputs_of_earlier_blocks(llama_dir, corpus_file):
    """Block 1's Wanda mask depends on whether block 0 was pruned first (sequential protocol)."""
    from pruning.data import prepare_tokens
    from pruning.load import load_model
    from pruning.pruners import get_pruner
    from pruning.sequential import prune_sequentially

    masks = []
    for first in (0.0, 0.9):
        model, tokenizer = load_model(str(llama_dir))
        data = prepare_tokens(tokenizer, str(corpus_file), seqlen=32, calib_samples=8, eval_windows=2)
        prune_sequentially(model, data.calibration, Profile((first, 0.5, 0.0, 0.0)), get_pruner("wanda"),
                           torch.device("cpu"), progress=False)
        masks.append(find_blocks(model)[1].mlp.down_proj.weight == 0)
    assert not torch.equal(masks[0], masks[1])


def _weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.state_dict()


def test_offloaded_prune_saves_the_same_model_and_records_device_dtype_offload(llama_dir, corpus_file, tmp_path):
    runs = {}
    for offload in (False, True):
        runs[offload] = run_prune(_config(llama_dir, corpus_file, tmp_path / str(offload), pruner="sparsegpt",
                                          sparsity=0.5, offload=offload))
        saved = json.loads((tmp_path / str(offload) / "metrics.json").read_text())
        assert saved["offload"] is offload and saved["device"] == "cpu" and saved["device_name"]
        assert saved["dtype"] == "fp32"
    for key in ("dense_perplexity", "pruned_perplexity"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-5)
    expected, got = _weights(tmp_path / "False"), _weights(tmp_path / "True")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_offload_auto_follows_the_free_device_memory(llama_dir, corpus_file, tmp_path, monkeypatch):
    from orchestrator.passes import prune as final_pass

    assert run_prune(_config(llama_dir, corpus_file, tmp_path / "cpu", sparsity=0.5))["offload"] is False
    monkeypatch.setattr(final_pass, "device_free_bytes", lambda device: 1000)  # a device smaller than the model
    assert run_prune(_config(llama_dir, corpus_file, tmp_path / "small", sparsity=0.5))["offload"] is True


def test_offload_flag_of_the_prune_command(llama_dir, corpus_file, tmp_path):
    from orchestrator.cli import main

    common = ["prune", "--model", str(llama_dir), "--data", str(corpus_file), "--sparsity", "0.5", "--seqlen", "32",
              "--calib-samples", "4", "--eval-windows", "2", "--device", "cpu", "--no-progress"]
    for flag, expected in (("on", True), ("off", False), ("auto", False)):
        assert main([*common, "--offload", flag, "--out", str(tmp_path / flag)]) == 0
        assert json.loads((tmp_path / flag / "metrics.json").read_text())["offload"] is expected


def test_prune_honours_the_dtype(llama_dir, corpus_file, tmp_path):
    metrics = run_prune(_config(llama_dir, corpus_file, tmp_path / "bf16", sparsity=0.5, dtype="bf16"))
    assert metrics["dtype"] == "bf16" and math.isfinite(metrics["pruned_perplexity"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_offloaded_gemma3_prune_matches_the_in_memory_one(corpus_file, tmp_path):
    from conftest import build_model, save_model_dir, tiny_gemma3_config

    model_dir = save_model_dir(build_model(tiny_gemma3_config()), tmp_path / "gemma3")
    runs = {offload: run_prune(_config(model_dir, corpus_file, tmp_path / str(offload), pruner="wanda",
                                       sparsity=0.5, offload=offload)) for offload in (False, True)}
    assert runs[True]["pruned_perplexity"] == pytest.approx(runs[False]["pruned_perplexity"], rel=1e-5)
    expected, got = _weights(tmp_path / "False"), _weights(tmp_path / "True")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


# --- the search's final passes as Ray tasks -------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    import ray

    from orchestrator.runtime.cluster import start_local

    start_local(num_cpus=2)
    yield ray
    ray.shutdown()


def _search_settings(model_dir, out, **kwargs):
    from conftest import settings_of
    from orchestrator.search.config import SearchConfig

    return settings_of(SearchConfig(out=out, model=str(model_dir), sparsity=0.6, pruner="wanda", batch_size=4,
                                    progress=False, budget_evals=10, **kwargs))


def _driver_results(profiles: dict):
    from orchestrator.runtime.candidates import DriverResult

    return {name: DriverResult(name, Profile(tuple(p)), fitness, evaluations=1)
            for name, (fitness, p) in profiles.items()}


def _tokens(tokenizer, corpus_file):
    from pruning.data import prepare_tokens

    return prepare_tokens(tokenizer, str(corpus_file), seqlen=32, calib_samples=4, eval_windows=6, seed=0)


def test_final_passes_run_as_tasks_save_the_winner_and_are_not_redone(local_ray, llama_dir, corpus_file,
                                                                       tmp_path):
    from orchestrator.search.run import final_stage
    from orchestrator.search.settings import Tokens
    from pruning.load import load_model
    from pruning.pruners import get_pruner
    from pruning.sequential import prune_sequentially

    model, tokenizer = load_model(str(llama_dir))
    data = _tokens(tokenizer, corpus_file)
    tokens = Tokens(data.calibration, data.test, data.validation[:2], data.validation[2:4], data.protocol)
    results = _driver_results({"shapley": (1.0, [0.5, 0.7, 0.6, 0.6]), "evolution": (0.5, [0.6, 0.6, 0.6, 0.6]),
                               "tune-atp": (3.0, [0.45, 0.55, 0.65, 0.75])})
    run = tmp_path / "run"
    summary = final_stage(_search_settings(llama_dir, run, finalists=2), tokens, results, run)

    passes = summary["final_passes"]
    assert summary["selection"]["finalists"] == ["evolution", "shapley", "tune-atp"]  # by KL, then the baseline
    assert list(passes) == list(results)  # every driver's row, in the drivers' order
    assert summary["winner"] == min(passes, key=lambda name: passes[name]["validation_perplexity"])
    assert summary["device"] == "cpu" and summary["dtype"] == "fp32"
    node = local_ray.get_runtime_context().get_node_id()
    assert all(p["node"] == node and p["offload"] is False and not p["reused"] for p in passes.values())
    assert summary["winner_vs_atp"] == pytest.approx(
        summary["winner_test_perplexity"] / summary["atp_test_perplexity"] - 1)
    for key in ("winner", "winner_test_perplexity", "dense_test_perplexity", "selection", "drivers",
                "final_passes", "atp_test_perplexity", "winner_vs_atp", "device", "dtype"):
        assert key in summary

    # Each finalist's model is the in-memory sequential pass with its profile; the winner's is RUN/model.
    winner = summary["winner"]
    prune_sequentially(model, data.calibration, results[winner].best, get_pruner("wanda"), torch.device("cpu"),
                       batch_size=4, progress=False)
    saved = _weights(run / "model")
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())
    assert (run / "model" / "model.safetensors").read_bytes() == \
        (run / "finalists" / winner / "model.safetensors").read_bytes()
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    assert metrics["pruned_perplexity"] == summary["winner_test_perplexity"]
    assert metrics["dense_perplexity"] == summary["dense_test_perplexity"] and metrics["offload"] is False
    assert json.loads((run / "model" / "profile.json").read_text())["sparsities"] == \
        pytest.approx(list(results[winner].best.sparsities))

    # Resume: finished finalists are reused; a finalist whose profile changed is pruned again.
    stamps = {name: (run / "finalists" / name / "model.safetensors").stat().st_mtime_ns for name in passes}
    results["shapley"] = _driver_results({"shapley": (1.0, [0.7, 0.5, 0.6, 0.6])})["shapley"]
    again = final_stage(_search_settings(llama_dir, run, finalists=2), tokens, results, run)
    assert {name: p["reused"] for name, p in again["final_passes"].items()} == \
        {"evolution": True, "shapley": False, "tune-atp": True}
    for name in ("evolution", "tune-atp"):
        assert (run / "finalists" / name / "model.safetensors").stat().st_mtime_ns == stamps[name]
        assert again["final_passes"][name]["validation_perplexity"] == passes[name]["validation_perplexity"]
    assert (run / "finalists" / "shapley" / "model.safetensors").stat().st_mtime_ns != stamps["shapley"]
    assert again["dense_test_perplexity"] == summary["dense_test_perplexity"]


def test_the_winner_is_read_from_another_node_in_chunks(local_ray, tmp_path):
    from orchestrator.runtime.transfer import fetch_directory

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 5 + b"tail")
    (src / "sub" / "config.json").write_text('{"a": 1}')
    (src / "empty").write_bytes(b"")
    (src / "metrics.json").write_text("{}")
    node = local_ray.get_runtime_context().get_node_id()
    fetch_directory(node, src, tmp_path / "dst", chunk_bytes=100, skip=("metrics.json",))
    copied = sorted(p.relative_to(tmp_path / "dst") for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert [str(p) for p in copied] == ["empty", "model.safetensors", "sub/config.json"]
    for path in copied:
        assert (tmp_path / "dst" / path).read_bytes() == (src / path).read_bytes()
