"""`sparsealloc sweep` end to end on a tiny model: rows, one pool per model, resume, spec errors."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import build_model, save_model_dir, tiny_llama_config
from core.errors import SparseAllocError
from orchestrator.sweep import run as sweep_module
from orchestrator.sweep.allocations import ALLOCATIONS
from orchestrator.cli import main
from orchestrator.runtime.results import ResultsTable
from orchestrator.sweep.run import load_sweep_spec, run_sweep
from orchestrator.sweep.spec import parse_spec
from pruning.pruners import PRUNERS

pytestmark = pytest.mark.usefixtures("shared_ray")

METHODS = {name: allocation.searches for name, allocation in ALLOCATIONS.items()}


def _spec(tmp_path, model_dir, corpus, **overrides) -> dict:
    spec = {"models": [str(model_dir)], "sparsities": [0.4, 0.6], "pruners": ["wanda"],
            "methods": ["uniform", "evolution"], "budget": {"evals": 10}, "data": str(corpus), "seqlen": 32,
            "calib_samples": 4, "eval_windows": 4, "fitness_windows": 4, "fitness_seqlen": 32,
            "fidelities": [64, 128], "selection_windows": 2, "actors": 1, "atp_grid": 3}
    spec.update(overrides)
    return spec


def _write(tmp_path, spec: dict, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def model_dir(tmp_path):
    return save_model_dir(build_model(tiny_llama_config()), tmp_path / "model")


def test_sweep_rows_one_pool_per_model_and_resume(tmp_path, model_dir, corpus_file, monkeypatch, capsys):
    builds = []
    real_make_pool = sweep_module.make_pool

    def counting_make_pool(*args, **kwargs):
        builds.append(args[0].config.model)
        return real_make_pool(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "make_pool", counting_make_pool)
    spec_path = _write(tmp_path, _spec(tmp_path, model_dir, corpus_file, methods=["uniform", "atp", "evolution"],
                                       pruners=["wanda", "magnitude"]))
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec_path), "--out", str(out), "--no-progress"]) == 0
    assert builds == [str(model_dir)]  # one evaluator pool served both targets and every method

    table = pq.read_table(out / "table.parquet").to_pylist()
    chosen = [r for r in table if r["chosen"]]
    assert sorted((r["target"], r["method"]) for r in chosen if r["pruner"] == "wanda") == [
        ("0.4", "atp"), ("0.4", "evolution"), ("0.4", "uniform"), ("0.6", "atp"), ("0.6", "evolution"),
        ("0.6", "uniform")]
    assert len(chosen) == 12
    # The search does not depend on the pruner: the magnitude cells reuse the wanda cells' searches.
    evolution = {(r["target"], r["pruner"]): r for r in chosen if r["method"] == "evolution"}
    for target in ("0.4", "0.6"):
        shared = evolution[(target, "magnitude")]
        assert shared["search_shared_with"] == evolution[(target, "wanda")]["cell"]
        assert shared["profile"] == evolution[(target, "wanda")]["profile"]
    assert all(0 < r["search_evaluations"] <= 12 and r["search_tokens"] >= 64 * r["search_evaluations"]
               for r in evolution.values())
    atp = [r for r in table if r["method"] == "atp" and r["target"] == "0.6" and r["pruner"] == "wanda"]
    assert len(atp) == 3  # the grid: every beta got its real pass, the lowest validation ppl is the pick
    assert min(atp, key=lambda r: r["validation_perplexity"])["chosen"]
    for row in table:
        profile = json.loads(row["profile"])
        assert len(profile) == 4 and row["achieved_sparsity"] == pytest.approx(row["sparsity"], abs=0.02)
        assert row["test_perplexity"] > row["dense_test_perplexity"] > 1
        protocol = json.loads(row["protocol"])
        assert protocol["seqlen"] == 32 and protocol["fitness_tokens"] == 128 and "dtype" in protocol

    assert all(r["search_tokens"] == 0 for r in chosen if r["method"] == "uniform")
    last = json.loads((out / "sweep.json").read_text())["last_run"]
    # Per pruner and target: uniform 1, the ATP grid 3 (beta=0 is the uniform profile: one shared pass), evolution 1.
    assert last["passes_run"] == 2 * 2 * (1 + 3 - 1 + 1)
    assert "report:" in capsys.readouterr().out

    # Resume: nothing is searched or pruned again.
    assert main(["sweep", str(spec_path), "--out", str(out), "--resume", "--no-progress"]) == 0
    last = json.loads((out / "sweep.json").read_text())["last_run"]
    assert last["passes_run"] == 0 and last["cells_proposed"] == 0 and last["pools_built"] == 0
    again = pq.read_table(out / "table.parquet").to_pylist()
    assert [r["test_perplexity"] for r in again] == [r["test_perplexity"] for r in table]
    assert all(r["reused"] for r in again)

    # A grown spec (one more method) runs only the new cells, its tasks sized by the passes that run.
    sized = []
    real_resources = sweep_module.task_resources
    monkeypatch.setattr(sweep_module, "task_resources",
                        lambda gpu, threads, tasks: sized.append(tasks) or real_resources(gpu, threads, tasks))
    grown = _write(tmp_path, _spec(tmp_path, model_dir, corpus_file, methods=["uniform", "atp", "evolution",
                                                                             "fisher-map"],
                                   pruners=["wanda", "magnitude"]), "grown.yaml")
    assert main(["sweep", str(grown), "--out", str(out), "--resume", "--no-progress"]) == 0
    last = json.loads((out / "sweep.json").read_text())["last_run"]
    # fisher-map at two targets: searched once per target, pruned by both pruners.
    assert last["cells_proposed"] == 2 and last["passes_run"] == 4 and last["pools_built"] == 1
    assert sized == [4]  # not every candidate of the grown spec, nor the stored dense perplexity


def test_interrupted_search_cell_resumes_from_its_results(tmp_path, model_dir, corpus_file, monkeypatch):
    spec_path = _write(tmp_path, _spec(tmp_path, model_dir, corpus_file, sparsities=[0.6], methods=["evolution"],
                                       budget={"evals": 12, "per": "sweep"}))
    out = tmp_path / "sweep"
    real_propose = sweep_module._propose

    def crash_after_search(*args, **kwargs):
        real_propose(*args, **kwargs)
        (args[5] / "proposal.json").unlink()  # as if killed before the proposal was written
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "_propose", crash_after_search)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec_path, out, progress=False)
    cell = next((out / "cells").iterdir())
    rows_before = len(ResultsTable(cell, "x").read())
    monkeypatch.setattr(sweep_module, "_propose", real_propose)
    run_sweep(spec_path, out, resume=True, progress=False)
    table = ResultsTable(cell, "x")
    assert len(table.read()) == rows_before and table.duplicate_keys() == []  # answered from the table
    assert json.loads((cell / "proposal.json").read_text())["budget"] == {"evals": 12}  # the one search: all of it


def test_spec_errors_are_listed_together(tmp_path, model_dir, corpus_file):
    bad = _spec(tmp_path, model_dir, corpus_file, methods=["uniform", "magic"], sparsities=[0.5, 1.2],
                nm=["4:4"], pruners=["wanda", "scissors"], seqlen="long", colour="blue", budget={})
    bad["models"].append(str(tmp_path / "no-such-model"))
    bad["methods"].append("evolution")
    with pytest.raises(SparseAllocError) as info:
        load_sweep_spec(_write(tmp_path, bad))
    message = str(info.value)
    for expected in ("'magic'", "1.2", "4:4", "'scissors'", "seqlen", "colour", "no-such-model", "budget:"):
        assert expected in message, expected
    assert not (tmp_path / "sweep").exists()
    assert main(["sweep", str(_write(tmp_path, bad)), "--out", str(tmp_path / "sweep")]) == 2
    assert not (tmp_path / "sweep").exists()  # nothing was started


def test_spec_targets_and_cells():
    spec = parse_spec({"models": ["a", "b"], "sparsities": [0.5], "nm": ["2:4"], "methods": ["uniform", "owl"],
                       "pruners": ["wanda", "sparsegpt"]}, METHODS, list(PRUNERS))
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 * 2 and [c.model for c in cells[:8]] == ["a"] * 8
    nm = [c for c in cells if c.target == "2:4"]
    assert all(c.nm == (2, 4) and c.sparsity == 0.5 for c in nm)
    assert len({c.id for c in cells}) == len(cells)


def test_zero_shot_scores_reach_the_table_and_report(tmp_path, model_dir, corpus_file):
    pytest.importorskip("lm_eval")
    from test_zero_shot import QUESTIONS, write_task

    tasks = write_task(tmp_path)
    spec_path = _write(tmp_path, _spec(tmp_path, model_dir, corpus_file, sparsities=[0.5], methods=["uniform"],
                                       zero_shot={"tasks": ["tiny_mc"], "include": str(tasks)}))
    out = tmp_path / "sweep"
    summary = run_sweep(spec_path, out, progress=False)
    (row,) = pq.read_table(out / "table.parquet").to_pylist()
    scores = json.loads(row["zero_shot"])["tiny_mc"]
    assert 0.0 <= scores["acc"] <= 1.0 and scores["samples"] == QUESTIONS
    assert "tiny_mc" in (out / "report.md").read_text() and summary["report"]


def test_a_sweep_wide_budget_is_shared_by_the_searches_left():
    from orchestrator.sweep.run import search_allowance

    per_search = {"evals": 40, "minutes": 5}
    assert search_allowance(per_search, [{"evaluations": 40, "seconds": 300, "tokens": 0}], 1) == per_search
    sweep = {"evals": 100, "minutes": 10, "tokens": 4096, "per": "sweep"}
    assert search_allowance(sweep, [], 4) == {"evals": 25, "minutes": 2.5, "tokens": 1024}
    # A search that used less leaves more to the rest; one that overran leaves them less.
    thrifty = {"evaluations": 10, "seconds": 60, "tokens": 1024}
    assert search_allowance(sweep, [thrifty], 3) == {"evals": 30, "minutes": 3.0, "tokens": 1024}
    greedy = {"evaluations": 100, "seconds": 600, "tokens": 4096}
    assert search_allowance(sweep, [greedy], 3) == {"evals": 1, "minutes": 1 / 60, "tokens": 1}


def test_budget_scope_is_checked(tmp_path, model_dir, corpus_file):
    with pytest.raises(SparseAllocError, match="budget.per"):
        parse_spec(_spec(tmp_path, model_dir, corpus_file, budget={"evals": 10, "per": "cell"}), METHODS,
                   list(PRUNERS))
    with pytest.raises(SparseAllocError, match="give budget"):
        parse_spec(_spec(tmp_path, model_dir, corpus_file, budget={"per": "sweep"}), METHODS, list(PRUNERS))


def test_spec_traps_are_explained():
    with pytest.raises(SparseAllocError) as info:
        parse_spec(yaml.safe_load("models: [/a/run1/final, /b/run1/final]\nnm: [2:4]\nsparsities: []\n"
                                  "methods: [uniform]"), METHODS, list(PRUNERS))
    message = str(info.value)
    assert "quote N:M patterns" in message  # YAML read 2:4 as 124
    assert "share one directory name" in message
    with pytest.raises(SparseAllocError, match="give at least one target sparsity"):
        parse_spec({"models": ["a"], "sparsities": [], "methods": ["uniform"]}, METHODS, list(PRUNERS))


def test_a_sweep_from_before_kl_seq_resumes_only_with_the_kl_top_fitness(tmp_path):
    import json

    from orchestrator.sweep.run import _prepare

    old = parse_spec({"models": ["a"], "sparsities": [0.5], "methods": ["all"], "budget": {"evals": 8},
                      "top_fitness": "kl"}, METHODS, list(PRUNERS))
    identity = {k: v for k, v in old.identity().items() if k not in ("top_fitness", "sequential_windows")}
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"run_id": "r1", "identity": {**identity, "budget": {"evals": 8}}}))
    assert _prepare(tmp_path / "spec.yaml", old, out, True, False) == "r1"
    new = parse_spec({"models": ["a"], "sparsities": [0.5], "methods": ["all"], "budget": {"evals": 8}}, METHODS,
                     list(PRUNERS))
    with pytest.raises(SparseAllocError, match="top_fitness"):
        _prepare(tmp_path / "spec.yaml", new, out, True, False)


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_spec_is_valid(example):
    from orchestrator.sweep.spec import read_spec
    from pruning.pruners import PRUNERS

    spec = read_spec(example, METHODS, list(PRUNERS))
    assert spec.cells()
