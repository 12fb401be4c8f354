"""The finalists' pick reports its margin: the paired per-window NLL gap to the runner-up and its noise."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, tiny_llama_config
from orchestrator.passes.finalists import pick_margin
from scoring.perplexity import mean_nll, paired_gap, perplexity, window_nlls

CPU = torch.device("cpu")


def test_paired_gap_is_the_mean_difference_and_its_standard_error():
    chosen, other = [1.0, 2.0, 3.0, 4.0], [1.5, 2.1, 3.6, 4.2]
    gap, se = paired_gap(chosen, other)
    diffs = [0.5, 0.1, 0.6, 0.2]
    mean = sum(diffs) / 4
    assert gap == pytest.approx(mean)
    assert se == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4))
    # The shared per-window difficulty cancels: a constant offset has no noise at all.
    assert paired_gap([5.0, 1.0, 9.0], [5.5, 1.5, 9.5]) == pytest.approx((0.5, 0.0))
    with pytest.raises(ValueError):
        paired_gap([1.0], [1.0, 2.0])


def test_window_nlls_average_to_the_token_mean_nll():
    model = build_model(tiny_llama_config())
    windows = torch.randint(3, 120, (5, 16))
    nlls = window_nlls(model, windows, CPU, batch_size=2, progress=False)
    assert len(nlls) == 5
    logits = model(input_ids=windows).logits[:, :-1]
    per_window = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                 reduction="none").view(5, 15).mean(dim=1)
    assert nlls == pytest.approx(per_window.tolist(), rel=1e-5)
    nll, count = mean_nll(model, windows, CPU, batch_size=2, progress=False)
    assert count == 5 * 15 and nll == pytest.approx(sum(nlls) / 5)
    assert perplexity(model, windows, CPU, batch_size=2, progress=False) == pytest.approx(math.exp(nll))


def _pass(ppl_windows):
    return {"validation_window_nll": ppl_windows,
            "validation_perplexity": math.exp(sum(ppl_windows) / len(ppl_windows))}


def test_pick_margin_says_whether_the_winner_is_clearly_ahead():
    winner = [5.0, 5.2, 4.9, 5.1, 5.3, 5.0, 4.8, 5.2]
    close = [w + d for w, d in zip(winner, [0.05, -0.04, 0.06, -0.03, 0.02, -0.05, 0.04, 0.01])]
    far = [w + 0.3 + d for w, d in zip(winner, [0.01, -0.01, 0.02, 0.0, -0.02, 0.01, 0.0, 0.01])]
    passes = {"a": _pass(winner), "b": _pass(close), "c": _pass(far)}
    margin = pick_margin(passes, ["a", "b", "c"], "a")
    assert margin["runner_up"] == "b" and margin["windows"] == 8 and not margin["clear"]
    assert margin["nll_gap"] == pytest.approx(0.0075) and margin["nll_gap_se"] > margin["nll_gap"] / 2
    margin = pick_margin({"a": passes["a"], "c": passes["c"]}, ["a", "c"], "a")
    assert margin["runner_up"] == "c" and margin["clear"] and margin["nll_gap"] == pytest.approx(0.3025)
    # No runner-up, or a pass stored without per-window NLLs: nothing to say.
    assert pick_margin({"a": passes["a"]}, ["a"], "a") == {}
    assert pick_margin({"a": passes["a"], "d": {"validation_perplexity": 1.0}}, ["a", "d"], "a") == {}
