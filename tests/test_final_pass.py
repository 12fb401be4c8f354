import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.final_pass import PruneConfig, run_prune
from pruning.load import find_blocks, find_linears
from search_spaces.profile import Profile, write_profile


def _config(model_dir, data, out, **kwargs) -> PruneConfig:
    defaults = dict(seqlen=32, calib_samples=8, eval_windows=6, batch_size=4, progress=False, device="cpu")
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
