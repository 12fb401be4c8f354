"""`sparsealloc search` end to end on the tiny model: run, then --resume repeats nothing."""

import json

import pytest
import torch

from conftest import build_model, save_model_dir, tiny_llama_config
from orchestrator.runtime.candidates import DriverResult
from orchestrator.cli import main
from orchestrator.runtime.results import ResultsTable
from orchestrator.passes import tasks as tasks_module
from orchestrator.passes.finalists import finalists, same_profile_passes
from orchestrator.search.run import final_stage
from orchestrator.search.settings import Tokens, selection_windows
from conftest import settings_of
from orchestrator.runtime.rundir import lock_run_dir, open_run_dir
from orchestrator.search.config import SearchConfig
from core.errors import SparseAllocError
from pruning.load import find_blocks, find_linears
from core.profile import Profile

pytestmark = pytest.mark.usefixtures("shared_ray")


def _args(model_dir, data, out, *extra, method="evolution", budget_evals=24):
    # 8 selection windows: on this tiny model's 32-token windows, more let uniform win the pick these tests
    # check the saved model against (the real default, 32, is measured in bench/results/pick-noise.md).
    return ["search", "--method", method, "--sparsity", "0.6", "--budget-evals", str(budget_evals),
            "--model", str(model_dir), "--data", str(data), "--seqlen", "32", "--calib-samples", "4",
            "--fitness-windows", "4", "--fitness-seqlen", "32", "--fidelities", "64", "128", "--eval-windows", "8",
            "--selection-windows", "8", "--actors", "1", "--out", str(out), "--no-progress", *extra]


def _fragile_model_dir(tmp_path):
    """A tiny LLaMA whose block 0 is fragile (pruning it hurts far more), saved as a model directory."""
    model = build_model(tiny_llama_config())
    for layer in find_linears(find_blocks(model)[0]).values():
        layer.weight.data *= 6.0
    return save_model_dir(model, tmp_path / "model")


def test_search_saves_winner_and_resume_reuses_results(corpus_file, tmp_path, capsys):
    model_dir = _fragile_model_dir(tmp_path)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus_file, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drivers"]["evolution"]["evaluations"] <= 24
    # The saved model is pruned with the driver's best profile, block by block (not uniform, not another).
    best = json.loads((out / "best-evolution.json").read_text())["sparsities"]
    assert best == summary["drivers"]["evolution"]["profile"] and len(set(best)) > 1
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["achieved_sparsity"]["per_block"] == pytest.approx(best, abs=0.02)
    assert metrics["achieved_sparsity"]["overall"] == pytest.approx(0.6, abs=0.01)
    rows, duplicates = _rows(out)
    assert rows and duplicates == [] and "winner evolution" in capsys.readouterr().out
    assert (out / "report.html").exists() and (out / "report.md").exists()  # written at the end

    assert main(_args(model_dir, corpus_file, out, "--resume")) == 0
    again, duplicates = _rows(out)
    assert len(again) == len(rows) and duplicates == []  # every request answered from the results table
    assert json.loads((out / "summary.json").read_text())["drivers"]["evolution"]["profile"] == \
        summary["drivers"]["evolution"]["profile"]


def test_sparsegpt_search_scores_the_level_database_built_once(corpus_file, tmp_path, monkeypatch, own_ray):
    """``--pruner sparsegpt``: the evaluator's levels come from a SparseGPT database, built once in the
    cache and reused by the next search of the same model and calibration; evolution searches its grid."""
    monkeypatch.setenv("SPARSEALLOC_CACHE", str(tmp_path / "cache"))  # the Ray workers' cache too (one node)
    model_dir = _fragile_model_dir(tmp_path)
    built = []
    for run in ("first", "second"):
        out = tmp_path / run
        assert main(_args(model_dir, corpus_file, out, "--pruner", "sparsegpt", "--db-levels", "0.4", "0.5", "0.6",
                          "0.7", "0.8")) == 0
        identity = json.loads((out / "config.json").read_text())["identity"]
        assert identity["level_source"] == "sparsegpt-db" and identity["evaluator"]["levels"] == "sparsegpt-db"
        best = json.loads((out / "best-evolution.json").read_text())["sparsities"]
        assert set(best) <= {0.4, 0.5, 0.6, 0.7, 0.8} and len(set(best)) > 1
        built += [index.stat().st_mtime_ns for index in (tmp_path / "cache" / "level-db").glob("*/levels.json")]
    assert len(built) == 2 and built[0] == built[1]  # built by the first search (a Ray task), reused by the second
    databases = list((tmp_path / "cache" / "level-db").iterdir())
    assert len(databases) == 1 and json.loads((databases[0] / "levels.json").read_text())["levels"] == \
        [0.4, 0.5, 0.6, 0.7, 0.8]
    # A grid with no level besides the target is refused before any work.
    assert main(_args(model_dir, corpus_file, tmp_path / "bad", "--pruner", "sparsegpt", "--db-levels", "0.6")) == 2
    assert not (tmp_path / "bad").exists()


def test_token_budget_bounds_the_tokens_each_driver_scores(corpus_file, tmp_path):
    model_dir = _fragile_model_dir(tmp_path)
    out = tmp_path / "run"
    args = _args(model_dir, corpus_file, out, "--budget-tokens", "2048", method="all")
    args[args.index("--budget-evals"):args.index("--budget-evals") + 2] = []
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = ResultsTable(out, "check").read()
    spent = 0
    for name, driver in summary["drivers"].items():
        scored = sum(row["tokens"] or 128 for row in rows if row["driver"] == name)
        # Charged: also what the table answered (shapley's uniform fallback is the setup probe); not
        # charged: every driver's best rescored on all 128 fitness tokens.
        assert 0 < driver["details"]["tokens"] and scored <= driver["details"]["tokens"] + 128, name
        spent += driver["details"]["tokens"]
    assert 2048 - 4 * 128 < spent <= 2048


def test_resume_needs_the_same_settings(tmp_path):
    def prepare(config):
        lock = lock_run_dir(config.out, "run directory", config.resume, config.overwrite)
        try:
            return open_run_dir(config.out, settings_of(config).identity(), {}, config.resume, config.overwrite)
        finally:
            lock.release()

    prepare(SearchConfig(out=tmp_path / "run", budget_evals=10))
    with pytest.raises(SparseAllocError, match="sparsity"):
        prepare(SearchConfig(out=tmp_path / "run", budget_evals=10, sparsity=0.5, resume=True))
    with pytest.raises(SparseAllocError, match="--overwrite"):
        prepare(SearchConfig(out=tmp_path / "run", budget_evals=10))
    with pytest.raises(SparseAllocError, match="no search"):
        prepare(SearchConfig(out=tmp_path / "other", budget_evals=10, resume=True))


def test_search_all_runs_every_driver_compares_with_atp_and_hands_on_unspent_budget(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(_fragile_model_dir(tmp_path), corpus_file, out, method="all", budget_evals=80)) == 0
    summary = json.loads((out / "summary.json").read_text())
    drivers = summary["drivers"]
    assert list(drivers) == ["shapley", "evolution", "tune-free", "tune-atp"]
    assert sum(d["evaluations"] for d in drivers.values()) <= 80
    # The Shapley plan on 4 blocks needs fewer than its 24 evaluations: evolution gets the rest of its part.
    assert drivers["shapley"]["evaluations"] < 24 and drivers["evolution"]["evaluations"] > 32
    passes = summary["final_passes"]
    # Every driver's best profile and the uniform baseline went through the final pass (once per distinct profile).
    profiles = {**drivers, **summary["baselines"]}
    assert list(passes) == [*drivers, "uniform"] and set(summary["selection"]["finalists"]) <= set(passes)
    assert summary["baselines"]["uniform"]["profile"] == pytest.approx([0.6] * 4)
    for name, row in passes.items():
        assert (row.get("same_profile_as") is None) == (name in summary["selection"]["finalists"])
        if "same_profile_as" in row:
            assert profiles[name]["profile"] == profiles[row["same_profile_as"]]["profile"]
    assert summary["winner"] == min(passes, key=lambda name: passes[name]["validation_perplexity"])
    assert summary["winner_test_perplexity"] == passes[summary["winner"]]["test_perplexity"]
    assert summary["winner_vs_atp"] == pytest.approx(
        summary["winner_test_perplexity"] / summary["atp_test_perplexity"] - 1)
    assert summary["winner_vs_uniform"] == pytest.approx(
        summary["winner_test_perplexity"] / passes["uniform"]["test_perplexity"] - 1)
    assert (out / "model" / "metrics.json").exists()
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split()[:1] and line.split()[0] in drivers}
    for name in drivers:  # each driver's row shows the final-pass perplexities of its best profile
        assert f"{passes[name]['test_perplexity']:.3f}" in lines[name], lines[name]
    assert "winner vs ATP" in printed
    headline = printed[printed.index("÷ uniform"):].splitlines()  # uniform, the ATP pick and the winner
    assert headline[1].split()[0] == "uniform" and headline[2].startswith("ATP pick (tune-atp)")
    assert headline[3].startswith(f"winner ({summary['winner']})")
    assert f"{passes['uniform']['test_perplexity']:.3f}" in headline[1]


def _result(name, fitness, sparsities):
    return DriverResult(name, Profile(tuple(sparsities)), fitness, evaluations=1)


def test_finalists_are_the_best_distinct_profiles_plus_the_atp_baseline():
    results = {"shapley": _result("shapley", 1.0, [0.5, 0.7]), "evolution": _result("evolution", 0.9, [0.5, 0.7]),
               "tune-free": _result("tune-free", 1.1, [0.6, 0.6]), "tune-atp": _result("tune-atp", 2.0, [0.4, 0.8])}
    assert finalists(results, 2) == ["evolution", "tune-free", "tune-atp"]  # shapley's profile is evolution's
    assert finalists(results, 1) == ["evolution", "tune-atp"]
    assert finalists({"shapley": results["shapley"]}, 3) == ["shapley"]
    assert finalists(results) == ["evolution", "tune-free", "tune-atp"]  # all, each distinct profile once
    with pytest.raises(SparseAllocError, match="--finalists"):
        finalists(results, 0)
    # The uniform baseline gets its pass beside the finalists (never taking a slot), unless a finalist's profile
    # is the same (then it shares that one).
    uniform = {"uniform": _result("uniform", 0.1, [0.6, 0.6])}  # the best KL of all, still not a driver
    assert finalists(results, 1, uniform) == ["evolution", "tune-atp", "uniform"]
    assert finalists(results, 2, uniform) == ["evolution", "tune-free", "tune-atp"]


def test_a_driver_sharing_a_finalists_profile_gets_its_final_pass_row():
    results = {"shapley": _result("shapley", 1.0, [0.5, 0.7]), "evolution": _result("evolution", 0.9, [0.5, 0.7]),
               "tune-atp": _result("tune-atp", 2.0, [0.4, 0.8])}
    passes = {"evolution": {"test_perplexity": 3.0}, "tune-atp": {"test_perplexity": 4.0}}
    rows = same_profile_passes(results, passes)
    assert rows == {"shapley": {"test_perplexity": 3.0, "same_profile_as": "evolution"},
                    "evolution": {"test_perplexity": 3.0}, "tune-atp": {"test_perplexity": 4.0}}
    assert "tune-free" not in same_profile_passes({**results, "tune-free": _result("tune-free", 1.1, [0.6, 0.6])},
                                                  passes)


def test_selection_windows_are_held_out_from_the_fitness_tokens():
    validation = torch.arange(40).view(5, 8)
    assert torch.equal(selection_windows(validation, 12, 2), validation[2:4])  # 12 fitness tokens span 2 windows
    assert torch.equal(selection_windows(validation, 16, 8), validation[2:])
    with pytest.raises(SparseAllocError, match="--fitness-windows x --fitness-seqlen"):
        selection_windows(validation, 40, 1)


def test_the_final_pass_not_the_kl_proxy_picks_the_winner(tmp_path, monkeypatch):
    """Evolution has the best KL but the worst perplexity after the real pass: Shapley wins and is saved."""
    import ray

    model_dir = _fragile_model_dir(tmp_path)
    validation_ppl = {"evolution": 30.0, "shapley": 20.0, "tune-atp": 25.0}

    def fake_pass(job, name, profile, calibration, selection, test):  # runs in a Ray worker
        import json as _json
        from pathlib import Path as _Path

        out = _Path(job.out)
        out.mkdir(parents=True)
        (out / "profile.json").write_text(_json.dumps(profile.to_json()))
        metrics = {"validation_perplexity": validation_ppl[name], "test_perplexity": validation_ppl[name] + 1,
                   "prune_s": 0.0, "achieved_sparsity": {}, "offload": False, "device": "cpu", "dtype": "fp32",
                   "node": ray.get_runtime_context().get_node_id(), "inputs": job.inputs}
        (out / "metrics.json").write_text(_json.dumps(metrics))
        return metrics

    monkeypatch.setattr(tasks_module, "final_pass_task", fake_pass)
    results = {"shapley": _result("shapley", 1.0, [0.5, 0.7, 0.6, 0.6]),
               "evolution": _result("evolution", 0.5, [0.6, 0.6, 0.6, 0.6]),
               "tune-free": _result("tune-free", 2.0, [0.7, 0.5, 0.6, 0.6]),
               "tune-atp": _result("tune-atp", 3.0, [0.45, 0.55, 0.65, 0.75])}
    tokens = torch.randint(0, 100, (4, 16))
    config = SearchConfig(out=tmp_path / "run", model=str(model_dir), budget_evals=10, progress=False, finalists=2)
    summary = final_stage(settings_of(config), Tokens(tokens, tokens, tokens[:2], tokens[2:], {}), results,
                          tmp_path / "run")
    assert summary["selection"]["finalists"] == ["evolution", "shapley", "tune-atp"]
    assert summary["winner"] == "shapley" and summary["winner_test_perplexity"] == 21.0
    assert summary["winner_vs_atp"] == pytest.approx(21.0 / 26.0 - 1)
    saved = json.loads((tmp_path / "run" / "model" / "profile.json").read_text())
    assert saved["sparsities"] == pytest.approx([0.5, 0.7, 0.6, 0.6])


def _fitness_by_key(out):
    import pyarrow.dataset as ds

    rows = ds.dataset(out / "results", format="parquet").to_table(columns=["key", "fitness", "actor"]).to_pylist()
    return {row["key"]: row["fitness"] for row in rows}


def test_streamed_search_under_a_budget_below_the_weights_runs_and_records_its_mode(corpus_file, tmp_path):
    """A search whose device budget is below the model's weights streams its blocks end to end and records the
    mode; that streamed and resident fitnesses are equal is tests/test_evaluator_modes.py's (and bench.modes')."""
    from orchestrator.runtime.plan import ModelShape, make_plan
    from pruning.offload import non_block_bytes, tensor_bytes

    model = build_model(tiny_llama_config(layers=12))
    model_dir = save_model_dir(model, tmp_path / "model")
    weights = non_block_bytes(model) + sum(tensor_bytes(b) for b in find_blocks(model))
    plan = make_plan(ModelShape.from_model(model), dtype="fp32", device_memory_bytes=weights, evaluator="streamed",
                     fitness_tokens=128, fitness_seqlen=32, batch_size=4, calib_samples=4, seqlen=32)
    budget = int(1.01 * max(s.device_bytes for s in plan.stages if s.mode != "resident"))
    assert budget < weights, "the budget is below the model's weights"
    streamed = tmp_path / "streamed"
    assert main(_args(model_dir, corpus_file, streamed, "--evaluator", "streamed", "--device-memory-gb",
                      f"{budget / 2**30:.12f}", budget_evals=8)) == 0
    assert len(_fitness_by_key(streamed)) > 5
    config = json.loads((streamed / "config.json").read_text())
    assert config["config"]["evaluator"] == "streamed" and config["identity"]["dtype"] == "fp32"


def test_dtype_reaches_actors_and_final_pass_and_resume_checks_it(corpus_file, tmp_path):
    model_dir = _fragile_model_dir(tmp_path)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus_file, out, "--dtype", "bf16", "--device", "cpu", budget_evals=8)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == "bf16" and summary["device"] == "cpu"
    assert {p["dtype"] for p in summary["final_passes"].values()} == {"bf16"}
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["dtype"] == "bf16"
    assert json.loads((out / "config.json").read_text())["identity"]["dtype"] == "bf16"
    fisher = json.loads((out / "sensitivities" / "fisher.json").read_text())
    assert fisher["identity"]["dtype"] == "bf16" and len(fisher["values"]) == 4
    assert main(_args(model_dir, corpus_file, out, "--resume", budget_evals=8)) == 2  # fp32 by default


def _rows(out):
    table = ResultsTable(out, "check")
    return table.read(), table.duplicate_keys()


def test_budget_grows_on_resume_without_redoing_evaluations(corpus_file, tmp_path):
    model_dir = _fragile_model_dir(tmp_path)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus_file, out, budget_evals=8)) == 0
    first, duplicates = _rows(out)
    assert duplicates == []
    assert main(_args(model_dir, corpus_file, out, "--resume", budget_evals=20)) == 0
    grown, duplicates = _rows(out)
    assert duplicates == [], "no evaluation of the first run was redone"
    assert len(grown) > len(first)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drivers"]["evolution"]["evaluations"] > 8
    assert {"setup", "driver:evolution", "final passes"} <= set(summary["timings"])


def test_a_search_refused_at_validation_leaves_no_run_directory(corpus_file, tmp_path, capsys):
    model_dir = _fragile_model_dir(tmp_path)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus_file, out, "--fidelities", "64", "4096")) == 2
    assert "--fidelities asks for 4096 tokens" in capsys.readouterr().err
    assert not out.exists()


def test_deadline_bounds_the_whole_run(corpus_file, tmp_path, monkeypatch):
    """On an injected clock that moves only when candidates are scored (half a second each), so the
    machine's load cannot change the outcome: the drivers get what setup and the estimated final passes
    leave of the deadline, and stop there."""
    from types import SimpleNamespace

    from orchestrator.runtime import clock
    from orchestrator.runtime.pool import EvaluatorPool

    fake = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(clock, "monotonic", lambda: fake.now)
    real_evaluate = EvaluatorPool.evaluate

    def evaluate(self, candidates):
        fake.now += 0.5 * len(candidates)
        return real_evaluate(self, candidates)

    monkeypatch.setattr(EvaluatorPool, "evaluate", evaluate)
    model_dir = _fragile_model_dir(tmp_path)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus_file, out, "--deadline-minutes", "1.0", budget_evals=100000)) == 0
    summary = json.loads((out / "summary.json").read_text())
    timings = summary["timings"]
    allowed = timings["search_seconds_allowed"]
    assert allowed == pytest.approx(60 - timings["setup"] - timings["final_passes_estimate"], abs=0.01)
    assert 0 < allowed < 60 - timings["setup"]
    # Each stage starts only within the allowance, so the driver ends at most one stage (16 candidates) past it,
    # plus the rescoring of its best on all fitness tokens.
    assert allowed - 0.5 <= timings["driver:evolution"] <= allowed + (16 + 1) * 0.5
    assert fake.now - 1000.0 <= 60 - timings["final_passes_estimate"] + (16 + 1) * 0.5
    assert summary["drivers"]["evolution"]["evaluations"] > 8


def test_evolution_starts_from_the_earlier_drivers_bests(tmp_path):
    """Under --method all, the profiles the drivers before evolution found join its first population."""
    from orchestrator.search.budget import Budget, Charged
    from orchestrator.search.drivers.context import DriverContext
    from orchestrator.search.registry import DRIVERS

    n = 6

    class Pool:
        num_blocks, block_weights, max_tokens = n, [1] * n, 128

        def __init__(self):
            self.batches = []

        def call(self, method, *args):  # the Fisher traces
            return [1.0] * n

        def evaluate(self, candidates):
            self.batches.append(candidates)
            return [float(sum(s * s for s in c.sparsities)) for c in candidates]

    config = SearchConfig(out=tmp_path, sparsity=0.5, fidelities=(64, 128), fitness_windows=4, fitness_seqlen=32,
                          budget_evals=40, progress=False)
    earlier = Profile((0.3, 0.7, 0.3, 0.7, 0.5, 0.5))
    calibration = torch.zeros(2, 8, dtype=torch.long)
    for bests, expected in (((earlier,), True), ((), False)):
        pool = Pool()
        DRIVERS["evolution"].function()(DriverContext(Charged(pool, Budget(max_evals=40)), settings_of(config),
                                                      calibration, 128, tmp_path, bests))
        first = [tuple(round(s, 6) for s in c.sparsities) for c in pool.batches[0]]
        assert (earlier.sparsities in first) == expected


@pytest.mark.parametrize("method, keys", [("tune-owl", {"lam", "M"}), ("tune-fisher", {"strength"})])
def test_tune_owl_and_fisher_run_as_tune_experiments(corpus_file, tmp_path, method, keys):
    """The two Tune drivers --method all leaves out: a Tune experiment over their family's keys, with ASHA."""
    out = tmp_path / "run"
    assert main(_args(_fragile_model_dir(tmp_path), corpus_file, out, "--tune-rungs", "64", "128", "--no-uniform",
                      method=method, budget_evals=8)) == 0
    details = json.loads((out / "summary.json").read_text())["drivers"][method]["details"]
    assert details["scheduler"] == "asha" and details["rungs"] == [64, 128] and details["trials"] >= 1
    assert set(details["best_config"]) == keys
    assert (out / "tune" / method / "sparsealloc-result.json").exists()
    params = [json.loads(row["params"]) for row in ResultsTable(out, "check").read() if row["driver"] == method]
    assert params and all(keys <= set(p) and {"trial", "rung"} <= set(p) for p in params if p)
