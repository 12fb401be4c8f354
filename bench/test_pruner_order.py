"""Slow real-model check (run by `make bench`, not by `make test`): on the default model (SmolLM2-135M
from its PyPI wheel) at 60 % uniform sparsity, SparseGPT < Wanda < magnitude in test perplexity. About
90 s on 2 cores; the fast end-to-end real-model test stays in tests/test_real_model.py.

    .venv/bin/python -m pytest -q bench/test_pruner_order.py
"""

import torch


def test_pruners_rank_sparsegpt_wanda_magnitude_at_60():
    """A broken SparseGPT update (or Wanda's activation term) would break this order."""
    import copy

    from pruning.data import prepare_tokens
    from pruning.load import load_model
    from pruning.pruners import get_pruner
    from pruning.sequential import prune_sequentially
    from scoring.perplexity import perplexity
    from core.profile import Profile

    dense, tokenizer = load_model("default")
    data = prepare_tokens(tokenizer, "default", seqlen=128, calib_samples=16, eval_windows=8)  # SparseGPT needs the tokens
    cpu, ppl = torch.device("cpu"), {}
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        prune_sequentially(model, data.calibration, Profile.uniform(30, 0.6), get_pruner(pruner), cpu, progress=False)
        ppl[pruner] = perplexity(model, data.test, cpu, progress=False)
    assert ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"], ppl
