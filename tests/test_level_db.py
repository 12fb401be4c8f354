"""The SparseGPT level database reproduces the final SparseGPT pass and serves the evaluator."""

from __future__ import annotations

import copy
import json
from collections import namedtuple

import pytest
import torch

from conftest import VOCAB, build_model, tiny_llama_config, tiny_opt_config
from core.errors import SparseAllocError
from core.profile import Profile
from pruning.load import find_blocks, find_linears
from pruning.pruners import get_pruner
from pruning.sequential import prune_sequentially
from scoring import level_db as level_db_module
from scoring.level_db import LevelDatabase, build_level_database, database_bytes
from scoring.level_sources import DatabaseLevels

CPU = torch.device("cpu")
BATCH = 4
LEVELS = (0.0, 0.3, 0.5, 0.7)
IDENTITY = {"model": "tiny", "calibration": "seed 1"}


def _calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def _weights(model) -> list[dict[str, torch.Tensor]]:
    return [{name: layer.weight.detach().clone() for name, layer in find_linears(block).items()}
            for block in find_blocks(model)]


@pytest.mark.parametrize("config", [tiny_llama_config, lambda: tiny_opt_config(layers=3)], ids=["llama", "opt"])
def test_database_reproduces_the_final_pass_for_uniform_profiles(config, tmp_path):
    model = build_model(config())
    calibration = _calibration()
    before = _weights(model)
    db = build_level_database(model, calibration, LEVELS, tmp_path / "db", CPU, IDENTITY, BATCH, progress=False)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(before, _weights(model)) for n in a)  # model untouched
    assert db.levels == list(LEVELS) and db.num_blocks == len(find_blocks(model))
    for level in (0.3, 0.7):
        pruned = copy.deepcopy(model)
        uniform = Profile((level,) * db.num_blocks)
        prune_sequentially(pruned, calibration, uniform, get_pruner("sparsegpt"), CPU, batch_size=BATCH,
                           progress=False)
        for block, weights in enumerate(_weights(pruned)):
            for name, weight in weights.items():
                assert torch.equal(db.weight(block, name, level), weight), (level, block, name)
    stored = sum(p.stat().st_size for p in (tmp_path / "db").glob("block-*.safetensors"))
    assert db.bytes == database_bytes(model, LEVELS) <= stored <= db.bytes + 4096 * db.num_blocks
    assert not (tmp_path / "db.partial").exists()


def test_evaluator_on_the_database_scores_the_sparsegpt_model(tmp_path):
    from scoring.evaluator import CandidateEvaluator
    from scoring.perplexity import perplexity

    model = build_model(tiny_llama_config())
    calibration = _calibration()
    fitness = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    db = build_level_database(model, calibration, LEVELS, tmp_path / "db", CPU, IDENTITY, BATCH, progress=False)
    uniform = Profile((0.5,) * db.num_blocks)
    pruned = copy.deepcopy(model)
    prune_sequentially(pruned, calibration, uniform, get_pruner("sparsegpt"), CPU, batch_size=BATCH, progress=False)
    shipped = perplexity(pruned, fitness, CPU, BATCH, progress=False)

    evaluator = CandidateEvaluator(model, calibration, fitness, CPU, batch_size=BATCH, progress=False,
                                   levels=DatabaseLevels(tmp_path / "db"))
    assert evaluator.fitness(uniform, metric="ppl") == pytest.approx(shipped, rel=1e-5)
    wanda = CandidateEvaluator(model, calibration, fitness, CPU, batch_size=BATCH, progress=False)
    assert abs(wanda.fitness(uniform, metric="ppl") - shipped) > 1e-4 * shipped  # Wanda masks are not it
    mixed = Profile((0.3, 0.7, 0.5, 0.5))
    assert evaluator.fitness(mixed) != evaluator.fitness(uniform)
    # Off the grid: each block scored at its nearest stored level.
    assert evaluator.fitness(Profile((0.34, 0.66, 0.52, 0.48))) == evaluator.fitness(Profile((0.3, 0.7, 0.5, 0.5)))
    with pytest.raises(SparseAllocError, match="not a level"):
        evaluator.levels.db.weight(0, "self_attn.q_proj", 0.4)
    with pytest.raises(SparseAllocError, match="N:M"):
        evaluator.fitness(Profile((0.5,) * 4, ((2, 4), None, None, None)))
    with pytest.raises(SparseAllocError, match="kl-seq"):
        evaluator.fitness(uniform, metric="kl-seq")


def test_database_refusals(tmp_path, monkeypatch):
    model = build_model(tiny_llama_config())
    calibration = _calibration()
    need = database_bytes(model, LEVELS)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(level_db_module.shutil, "disk_usage", lambda _p: usage(need, 0, need - 1))
    with pytest.raises(SparseAllocError, match=r"needs 0\.\d+ GiB"):
        build_level_database(model, calibration, LEVELS, tmp_path / "db", CPU, IDENTITY, BATCH, progress=False)
    assert not (tmp_path / "db").exists()
    monkeypatch.undo()
    with pytest.raises(SparseAllocError, match=r"\[0, 1\)"):
        build_level_database(model, calibration, (0.5, 1.0), tmp_path / "db", CPU, IDENTITY, BATCH, progress=False)
    with pytest.raises(SparseAllocError, match="no complete level database"):
        LevelDatabase(tmp_path / "missing")
    db = build_level_database(model, calibration, (0.5,), tmp_path / "db", CPU, IDENTITY, BATCH, progress=False)
    index = json.loads((tmp_path / "db" / "levels.json").read_text())
    assert index["identity"] == db.identity == IDENTITY and index["levels"] == [0.5]


def test_nearest_level_counts_dense_and_breaks_ties_towards_sparser(tmp_path):
    db = build_level_database(build_model(tiny_llama_config(layers=1)), _calibration(), (0.3, 0.5), tmp_path / "db",
                              CPU, IDENTITY, BATCH, progress=False)
    assert [db.nearest(s) for s in (0.02, 0.15, 0.16, 0.4, 0.41, 0.9)] == [0.0, 0.3, 0.3, 0.5, 0.5, 0.5]


def test_database_grid_always_holds_the_target():
    from scoring.level_db import database_levels

    assert database_levels(0.7) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert database_levels(0.5, (0.4, 0.6)) == [0.4, 0.5, 0.6]
    for bad in ((0.5,), (0.0, 0.5), (0.5, 1.0)):
        with pytest.raises(SparseAllocError, match="--db-levels"):
            database_levels(0.5, bad)
