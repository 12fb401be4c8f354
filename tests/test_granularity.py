"""Profiles finer than blocks (--granularity group | linear): units, JSON, the final pass, the evaluator,
evolution and the Tune families at the chosen unit, and a search end to end."""

import json

import numpy as np
import pytest
import torch

from conftest import build_model, save_model_dir, settings_of, tiny_gemma3_config, tiny_llama_config, tiny_opt_config
from core.errors import SparseAllocError
from core.profile import Profile, read_profile, write_profile
from orchestrator.search.budget import Budget, Charged
from orchestrator.search.config import SearchConfig
from orchestrator.search.drivers.evolution import EvolutionConfig, run_evolution
from pruning.load import find_blocks, find_linears, unit_layout
from pruning.masks import prune_count
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring.evaluator import CandidateEvaluator
from search_spaces.algebra import project
from search_spaces.families import atp, group_shift

CPU = torch.device("cpu")


@pytest.mark.parametrize("config, linears, attention", [
    (tiny_llama_config, 7, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
    (tiny_opt_config, 6, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}),
    (tiny_gemma3_config, 7, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
])
def test_units_split_blocks_into_attention_and_mlp_and_single_linears(config, linears, attention):
    model = build_model(config())
    layout = unit_layout(model)
    blocks = len(find_blocks(model))
    assert layout.count("block") == blocks and layout.count("group") == 2 * blocks
    assert layout.count("linear") == linears * blocks
    first, second = layout.units("group")[:2]
    assert set(first.names) == attention and first.label == "0.attention"
    assert second.label == "0.mlp" and not set(second.names) & attention
    for granularity in ("block", "group", "linear"):  # every granularity weighs the same weights
        assert sum(layout.weights(granularity)) == sum(p.numel() for b in find_blocks(model)
                                                       for p in (lin.weight for lin in find_linears(b).values()))


def test_unit_profiles_round_trip_and_keep_their_mean(tmp_path):
    layout = unit_layout(build_model(tiny_llama_config()))
    weights = layout.weights("linear")
    values = project(np.random.default_rng(0).uniform(0.3, 0.9, len(weights)).tolist(), 0.6, weights)
    profile = Profile(tuple(values), granularity="linear")
    write_profile(tmp_path / "p.json", profile, profile.mean(weights))
    back, target = read_profile(tmp_path / "p.json")
    assert back == profile and back.mean(weights) == pytest.approx(0.6, abs=1e-9) and target == pytest.approx(0.6)
    back.check_layout(layout, 0.6)
    # A per-block profile's JSON is as before (no granularity key), and an old file still reads as blocks.
    block = Profile((0.5, 0.6, 0.7, 0.6))
    assert "granularity" not in block.to_json()
    assert Profile.from_json({"sparsities": [0.5, 0.6, 0.7, 0.6]}) == block
    with pytest.raises(SparseAllocError, match="units at granularity group"):
        Profile((0.6,) * 5, granularity="group").check_layout(layout)
    with pytest.raises(SparseAllocError, match="unknown granularity"):
        Profile((0.6,), granularity="head")
    # A lifted block profile has each block's level on every unit and the same mean.
    lifted = block.at(layout, "linear")
    assert len(lifted) == 28 and lifted.sparsities[:7] == (0.5,) * 7
    assert lifted.mean(weights) == pytest.approx(block.mean(layout.weights("block")))


def _linear_profile(layout, seed=0, target=0.6):
    weights = layout.weights("linear")
    values = project(np.random.default_rng(seed).uniform(0.2, 0.9, len(weights)).tolist(), target, weights)
    return Profile(tuple(values), granularity="linear")


@pytest.mark.parametrize("pruner", ["wanda", "magnitude"])
def test_linear_final_pass_prunes_each_linear_at_its_own_level(pruner):
    model = build_model(tiny_llama_config())
    layout = unit_layout(model)
    profile = _linear_profile(layout)
    calibration = torch.randint(3, 120, (4, 32))
    prune_sequentially(model, calibration, profile, get_pruner(pruner), CPU, batch_size=2, progress=False)
    units = iter(zip(layout.units("linear"), profile.sparsities))
    for block in find_blocks(model):
        for name, layer in find_linears(block).items():
            unit, sparsity = next(units)
            assert unit.names == (name,)
            zeros = int((layer.weight == 0).sum())
            rows, columns = layer.weight.shape
            expected = rows * prune_count(columns, sparsity) if pruner == "wanda" else prune_count(rows * columns,
                                                                                                sparsity)
            assert zeros == expected, (unit.label, zeros, expected)


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_uniform_linear_profile_prunes_bit_for_bit_as_the_uniform_block_profile(pruner):
    calibration = torch.randint(3, 120, (4, 32))
    models = []
    for granularity in ("block", "linear"):
        model = build_model(tiny_llama_config())
        profile = Profile.uniform(4, 0.6).at(unit_layout(model), granularity)
        assert profile.granularity == granularity
        prune_sequentially(model, calibration, profile, get_pruner(pruner), CPU, batch_size=2, progress=False)
        models.append(model.state_dict())
    assert all(torch.equal(models[0][key], models[1][key]) for key in models[0])


@pytest.fixture(scope="module")
def evaluator():
    torch.manual_seed(0)
    return CandidateEvaluator(build_model(tiny_llama_config()), torch.randint(3, 120, (6, 32)),
                              torch.randint(3, 120, (5, 32)), CPU, batch_size=2, progress=False)


def test_evaluator_scores_each_linear_at_its_own_level(evaluator):
    layout = evaluator.layout
    block = atp(4, 0.6, 0.1)
    # The same levels at any granularity give the same fitness (one population, shared where they agree).
    fitnesses = evaluator.fitness_many([block, block.at(layout, "group"), block.at(layout, "linear")])
    assert fitnesses[0] == pytest.approx(fitnesses[1], abs=1e-7) == pytest.approx(fitnesses[2], abs=1e-7)
    # Pruning only the MLP of a block differs from pruning only its attention.
    groups = layout.groups("group")
    attention_only = Profile(tuple(0.8 if g == "attention" else 0.0 for g in groups), granularity="group")
    mlp_only = Profile(tuple(0.8 if g == "mlp" else 0.0 for g in groups), granularity="group")
    kl_attention, kl_mlp = evaluator.fitness_many([attention_only, mlp_only])
    assert kl_attention > 0 and kl_mlp > 0 and abs(kl_attention - kl_mlp) > 1e-4
    # And matches the KL of the model with exactly those linears masked by the tables.
    model = build_model(tiny_llama_config())
    calibration_free = CandidateEvaluator(model, torch.randint(3, 120, (6, 32)), evaluator.windows, CPU,
                                          batch_size=2, progress=False)
    assert calibration_free.fitness(Profile.uniform(4, 0.0).at(layout, "linear")) == pytest.approx(0.0, abs=1e-4)


def test_evolution_at_linear_granularity_never_leaves_the_target_mean():
    layout = unit_layout(build_model(tiny_llama_config()))
    weights = layout.weights("linear")
    w = np.asarray(weights, dtype=float)
    assert len(set(weights)) > 1  # units of unequal size
    cost = np.random.default_rng(1).uniform(0.5, 2.0, len(weights))

    seen = []

    def evaluate(candidates):
        seen.extend(candidates)
        return [float((cost * np.asarray(c.sparsities) ** 2).sum()) for c in candidates]

    seeds = [atp(4, 0.6, 0.05).at(layout, "linear"), Profile.uniform(4, 0.6).at(layout, "linear")]
    config = EvolutionConfig(target=0.6, weights=weights, granularity="linear", max_generations=30,
                             fidelities=(64, 128), survivors=(4, 2))
    result = run_evolution(Charged(evaluate, Budget()), seeds, config)
    assert len(seen) > 100
    for candidate in seen:
        assert candidate.granularity == "linear" and len(candidate.sparsities) == len(weights)
        assert float((w * np.asarray(candidate.sparsities)).sum() / w.sum()) == pytest.approx(0.6, abs=1e-9)
        assert 0.0 <= min(candidate.sparsities) and max(candidate.sparsities) <= 0.99 + 1e-12
    result.best.check_layout(layout, 0.6)
    start = evaluate([seeds[1]])[0]
    assert evaluate([result.best])[0] < start  # it moved sparsity to where it costs less


def test_group_shift_moves_attention_against_the_mlp_and_keeps_every_block_mean():
    layout = unit_layout(build_model(tiny_llama_config()))
    for granularity in ("group", "linear"):
        base = atp(4, 0.6, 0.05).at(layout, granularity)
        weights = layout.weights(granularity)
        shifted = group_shift(base, layout.groups(granularity), layout.block_of(granularity), weights, 0.6, 0.1)
        assert shifted.granularity == granularity
        assert layout.block_means(shifted.sparsities, granularity) == pytest.approx(
            layout.block_means(base.sparsities, granularity), abs=1e-12)
        levels = shifted.levels(layout)
        for block in levels:
            assert block["self_attn.q_proj"][0] - block["mlp.up_proj"][0] == pytest.approx(0.1)


def test_search_at_group_granularity_end_to_end(corpus_file, tmp_path, shared_ray):
    """``search --granularity group``: evolution and tune-free propose per-group profiles; the winner's final
    pass prunes each group's linears at its level; the per-layer list is written beside the model."""
    from orchestrator.cli import main

    model_dir = save_model_dir(build_model(tiny_llama_config()), tmp_path / "model")
    out = tmp_path / "run"
    assert main(["search", "--method", "evolution", "--granularity", "group", "--sparsity", "0.6",
                 "--budget-evals", "24", "--model", str(model_dir), "--data", str(corpus_file), "--seqlen", "32",
                 "--calib-samples", "4", "--fitness-windows", "4", "--fitness-seqlen", "32", "--fidelities", "64",
                 "128", "--eval-windows", "8", "--selection-windows", "8", "--actors", "1", "--out", str(out),
                 "--no-progress"]) == 0
    best, target = read_profile(out / "best-evolution.json")
    block_means = json.loads((out / "best-evolution.json").read_text())["block_means"]
    assert block_means == pytest.approx(unit_layout(build_model(tiny_llama_config())).block_means(best.sparsities,
                                                                                                   "group"))
    assert "Per-block profiles" in (out / "report.md").read_text()
    layout = unit_layout(build_model(tiny_llama_config()))
    assert best.granularity == "group" and len(best) == 8 and target == pytest.approx(0.6, abs=1e-9)
    best.check_layout(layout, 0.6)
    assert len({s for s in best.sparsities}) > 1
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    per_linear = metrics["achieved_sparsity"]["per_linear"]
    for unit, sparsity in zip(layout.units("group"), best.sparsities):
        for name in unit.names:
            assert per_linear[f"{unit.block}.{name}"] == pytest.approx(sparsity, abs=0.02)
    # The pick says how far the winner is ahead of the runner-up on the selection windows.
    margin = json.loads((out / "summary.json").read_text())["selection"]["margin"]
    assert margin["runner_up"] != json.loads((out / "summary.json").read_text())["winner"]
    assert margin["windows"] == 8 and margin["nll_gap"] >= 0 and margin["nll_gap_se"] >= 0
    layers = json.loads((out / "model" / "layer-sparsities.json").read_text())
    assert layers["model.layers.0.self_attn.q_proj"] == pytest.approx(best.sparsities[0])
    assert layers["model.layers.3.mlp.down_proj"] == pytest.approx(best.sparsities[7])


def test_tune_free_at_group_granularity_searches_one_key_per_group(tmp_path, monkeypatch):
    """tune-free at group granularity: a key per attention/MLP group, lifted to the linears at linear."""
    from orchestrator.search.drivers import tune
    from orchestrator.search.drivers.context import DriverContext

    layout = unit_layout(build_model(tiny_llama_config()))
    captured = {}

    def fake_tune(context, driver, space, build, sampler="tpe"):
        captured.update(space=space, profile=build({key: 0.6 + 0.1 * (i % 2) for i, key in enumerate(space)}))

    class Pool:
        num_blocks, block_weights, max_tokens = 4, layout.weights("block"), 128

    Pool.layout = layout
    monkeypatch.setattr(tune, "_tune", fake_tune)
    for granularity, units in (("group", 8), ("linear", 28)):
        config = SearchConfig(out=tmp_path, sparsity=0.6, granularity=granularity, progress=False)
        context = DriverContext(Pool(), settings_of(config), torch.zeros(2, 8, dtype=torch.long), 128, tmp_path)
        tune.run_free(context)
        assert len(captured["space"]) == 8
        profile = captured["profile"]
        assert profile.granularity == granularity and len(profile) == units
        profile.check_layout(layout, 0.6)


def test_prune_takes_a_linear_profile_file(llama_dir, corpus_file, tmp_path):
    """``prune --profile`` with a per-linear profile: each linear pruned at its level, the per-layer list saved."""
    from orchestrator.cli import main

    layout = unit_layout(build_model(tiny_llama_config()))
    profile = _linear_profile(layout, seed=3, target=0.5)
    write_profile(tmp_path / "linear.json", profile, 0.5)
    out = tmp_path / "pruned"
    assert main(["prune", "--pruner", "wanda", "--profile", str(tmp_path / "linear.json"), "--out", str(out),
                 "--model", str(llama_dir), "--data", str(corpus_file), "--seqlen", "32", "--calib-samples", "4",
                 "--eval-windows", "2", "--no-progress"]) == 0
    per_linear = json.loads((out / "metrics.json").read_text())["achieved_sparsity"]["per_linear"]
    for unit, sparsity in zip(layout.units("linear"), profile.sparsities):
        assert per_linear[f"{unit.block}.{unit.names[0]}"] == pytest.approx(sparsity, abs=0.04)
    assert read_profile(out / "profile.json")[0] == profile
    assert len(json.loads((out / "profile.json").read_text())["block_means"]) == 4
    from orchestrator.report import write_report

    assert any(path.suffix == ".md" for path in write_report(out))  # the prune report plots the block means
    layers = json.loads((out / "layer-sparsities.json").read_text())
    assert len(layers) == 28 and layers["model.layers.1.self_attn.k_proj"] == pytest.approx(profile.sparsities[8])


def test_sweep_cell_searches_at_the_spec_granularity(corpus_file, tmp_path, shared_ray):
    import yaml

    from orchestrator.sweep.run import run_sweep

    model_dir = save_model_dir(build_model(tiny_llama_config()), tmp_path / "model")
    spec = {"models": [str(model_dir)], "sparsities": [0.6], "pruners": ["wanda"], "methods": ["evolution"],
            "budget": {"evals": 10}, "data": str(corpus_file), "seqlen": 32, "calib_samples": 4, "eval_windows": 4,
            "fitness_windows": 4, "fitness_seqlen": 32, "fidelities": [64, 128], "selection_windows": 2,
            "actors": 1, "granularity": "linear"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_sweep(tmp_path / "spec.yaml", tmp_path / "sweep", progress=False)
    cell = next((tmp_path / "sweep" / "cells").iterdir())
    proposal = json.loads((cell / "proposal.json").read_text())
    profile = Profile.from_json(proposal["candidates"][0]["profile"])
    assert profile.granularity == "linear" and len(profile) == 28
    profile.check_layout(unit_layout(build_model(tiny_llama_config())), 0.6)


def test_tune_atp_at_group_granularity_adds_an_attention_shift(tmp_path, monkeypatch):
    """A block family searched at a finer granularity: lifted to the units, plus attn_shift, each block's mean
    kept (so the block means are ATP's)."""
    from orchestrator.search.drivers import tune
    from orchestrator.search.drivers.context import DriverContext

    layout = unit_layout(build_model(tiny_llama_config()))
    captured = {}

    class Pool:
        num_blocks, block_weights, max_tokens = 4, layout.weights("block"), 128

    Pool.layout = layout
    monkeypatch.setattr(tune, "run_tune", lambda pool, driver, space, build, *a, **k: captured.update(space=space,
                                                                                                     build=build))
    config = SearchConfig(out=tmp_path, sparsity=0.6, granularity="group", progress=False)
    context = DriverContext(Pool(), settings_of(config), torch.zeros(2, 8, dtype=torch.long), 4096, tmp_path)
    tune.run_atp(context)
    assert set(captured["space"]) == {"beta", tune.SHIFT_KEY}
    profile = captured["build"]({"beta": 0.05, tune.SHIFT_KEY: 0.1})
    assert profile.granularity == "group" and len(profile) == 8
    profile.check_layout(layout, 0.6)
    assert layout.block_means(profile.sparsities, "group") == pytest.approx(list(atp(4, 0.6, 0.05).sparsities))
    assert profile.sparsities[0] - profile.sparsities[1] == pytest.approx(0.1)  # block 0: attention, then MLP
