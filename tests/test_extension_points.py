"""Adding a driver, a pruner and a level source touches only their own code and one entry in each
registry: the CLI's choices, the memory plan, the evaluator actors and the final-pass tasks find them."""

import json
import os
from pathlib import Path

import pytest
import ray
import torch

import planted_extensions as planted
from conftest import build_model, save_model_dir, settings_of, tiny_llama_config
from orchestrator.cli import build_parser, main
from orchestrator.runtime.cluster import start_local
from orchestrator.search.config import SearchConfig
from orchestrator.search.registry import DRIVERS
from orchestrator.search.settings import token_sets
from pruning.load import find_blocks, find_linears, load_model
from pruning.masks import layer_mask
from pruning.pruners import PRUNERS
from scoring.evaluator import CandidateEvaluator
from scoring.level_sources import LEVEL_SOURCES
from search_spaces import families

TESTS = Path(__file__).parent


@pytest.fixture
def registered():
    """The planted entries in this process's registries (removed afterwards)."""
    before = [dict(registry) for registry in (DRIVERS, PRUNERS, LEVEL_SOURCES)]
    planted.register()
    yield
    for registry, saved in zip((DRIVERS, PRUNERS, LEVEL_SOURCES), before):
        registry.clear()
        registry.update(saved)


@pytest.fixture
def workers(registered):
    """A local Ray whose every worker process registers the planted entries at start."""
    path = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    start_local(num_cpus=3, runtime_env={"worker_process_setup_hook": "planted_extensions.register",
                                         "env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def test_the_cli_lists_the_planted_entries(registered):
    args = build_parser().parse_args(["search", "--method", "planted", "--pruner", "planted", "--level-source",
                                      "planted-levels", "--out", "x"])
    assert (args.method, args.pruner, args.level_source) == ("planted", "planted", "planted-levels")
    assert build_parser().parse_args(["prune", "--pruner", "planted", "--out", "x"]).pruner == "planted"


def test_the_memory_plan_counts_the_planted_pruner(registered, tmp_path, capsys):
    model_dir = save_model_dir(build_model(tiny_llama_config()), tmp_path / "model")
    assert main(["plan", "--model", str(model_dir), "--pruner", "planted", "--device-memory-gb", "1"]) == 0
    assert "final pass (planted)" in capsys.readouterr().out


def test_a_search_runs_the_planted_driver_pruner_and_level_source(workers, tmp_path, corpus_file, capsys):
    model = build_model(tiny_llama_config())
    model_dir = save_model_dir(model, tmp_path / "model")
    out = tmp_path / "run"
    flags = ["--sparsity", "0.5", "--model", str(model_dir), "--data", str(corpus_file), "--seqlen", "32",
             "--calib-samples", "4", "--fitness-windows", "4", "--fitness-seqlen", "32", "--fidelities", "64", "128",
             "--eval-windows", "4", "--selection-windows", "2", "--actors", "1", "--seed", "3"]
    assert main(["search", "--method", "planted", "--pruner", "planted", "--budget-evals", "10", "--out", str(out),
                 "--no-progress", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["winner"] == "planted" and list(summary["drivers"]) == ["planted"]
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["level_source"] == "planted-levels"  # the planted pruner's own level source

    # The actors scored with the planted level source: the uniform profile's fitness is the magnitude masks'.
    settings = settings_of(SearchConfig(out=out, model=str(model_dir), data=str(corpus_file), seqlen=32,
                                        calib_samples=4, fitness_windows=4, fitness_seqlen=32, eval_windows=4,
                                        selection_windows=2, seed=3, budget_evals=10))
    dense, tokenizer = load_model(str(model_dir))
    tokens = token_sets(settings, tokenizer)
    uniform = families.uniform(len(find_blocks(dense)), 0.5)
    magnitude = CandidateEvaluator(dense, tokens.calibration, tokens.fitness, torch.device("cpu"), progress=False,
                                   levels=planted.MagnitudeLevels())
    wanda = CandidateEvaluator(dense, tokens.calibration, tokens.fitness, torch.device("cpu"), progress=False)
    stored = {row["key"]: row["fitness"] for row in _rows(out)}
    from orchestrator.runtime.candidates import Candidate

    scored = stored[Candidate.of(uniform, tokens.top_tokens, "planted").key]
    assert scored == pytest.approx(magnitude.fitness(uniform, tokens.top_tokens), rel=1e-6)
    assert scored != pytest.approx(wanda.fitness(uniform, tokens.top_tokens), rel=1e-6)

    # The final pass used the planted pruner: each linear's zeros are its smallest |W|.
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["pruner"] == "planted"
    pruned, _ = load_model(str(out / "model"))
    sparsities = json.loads((out / "model" / "profile.json").read_text())["sparsities"]
    for block, dense_block, level in zip(find_blocks(pruned), find_blocks(dense), sparsities):
        for name, layer in find_linears(block).items():
            weight = find_linears(dense_block)[name].weight.data
            assert torch.equal(layer.weight.data == 0, layer_mask(weight.abs().float(), level)), name


def _rows(out: Path) -> list[dict]:
    import pyarrow.dataset as ds

    return ds.dataset(out / "results", format="parquet").to_table(columns=["key", "fitness"]).to_pylist()
