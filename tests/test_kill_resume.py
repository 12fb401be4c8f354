"""A search killed with SIGKILL mid-run and resumed ends like an uninterrupted one: every evaluation
exactly once in the results table, the same best profile, the same winner."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_model, save_model_dir, tiny_llama_config
from orchestrator.cli import main
from orchestrator.runtime.results import ResultsTable
from pruning.load import find_blocks, find_linears

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.usefixtures("shared_ray")  # the in-process searches; the killed one starts its own


def _args(model_dir, data, out, *extra):
    return ["search", "--method", "evolution", "--sparsity", "0.6", "--budget-evals", "150", "--model", str(model_dir),
            "--data", str(data), "--seqlen", "32", "--calib-samples", "4", "--fitness-windows", "4",
            "--fitness-seqlen", "32", "--fidelities", "64", "128", "--eval-windows", "8", "--actors", "1",
            "--population", "1", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(corpus_file, tmp_path_factory):
    """A tiny LLaMA with a fragile block 0, and the run directory of its uninterrupted search."""
    model = build_model(tiny_llama_config())
    for layer in find_linears(find_blocks(model)[0]).values():
        layer.weight.data *= 6.0
    model_dir = save_model_dir(model, tmp_path_factory.mktemp("model"))
    whole = tmp_path_factory.mktemp("whole") / "run"
    assert main(_args(model_dir, corpus_file, whole)) == 0
    return model_dir, whole


def test_sigkilled_search_resumes_to_the_same_end(uninterrupted, corpus_file, tmp_path):
    model_dir, whole = uninterrupted
    killed = tmp_path / "killed"

    _sigkill_after_parts(_args(model_dir, corpus_file, killed), killed, parts=20)
    before = len(ResultsTable(killed, "check").read())
    assert 20 <= before < len(ResultsTable(whole, "check").read())

    assert main(_args(model_dir, corpus_file, killed, "--resume")) == 0
    table, reference = ResultsTable(killed, "check"), ResultsTable(whole, "check")
    assert table.duplicate_keys() == [], "no evaluation ran twice"
    assert {r["key"] for r in table.read()} == {r["key"] for r in reference.read()}
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, killed))
    assert a["winner"] == b["winner"] and a["drivers"]["evolution"]["profile"] == b["drivers"]["evolution"]["profile"]
    assert a["final_passes"][a["winner"]]["test_perplexity"] == b["final_passes"][b["winner"]]["test_perplexity"]


def test_search_with_a_killed_actor_ends_like_an_uninterrupted_one(uninterrupted, corpus_file, tmp_path):
    """An evaluator actor's process SIGKILLed mid-search: its candidates are re-submitted, every
    evaluation lands once, and the search ends with the same best profile and winner."""
    import threading

    import psutil

    model_dir, whole = uninterrupted
    hit = tmp_path / "hit"
    killed = []

    def kill_an_actor() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            results = hit / "results"
            if results.exists() and len(list(results.glob("part-*.parquet"))) >= 20:
                for child in psutil.Process().children(recursive=True):
                    if "EvaluatorActor" in " ".join(child.cmdline()):
                        child.kill()
                        killed.append(child.pid)
                        return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_an_actor, daemon=True)
    killer.start()
    assert main(_args(model_dir, corpus_file, hit)) == 0
    killer.join()
    assert killed, "an actor was killed mid-search"
    table, reference = ResultsTable(hit, "check"), ResultsTable(whole, "check")
    assert table.duplicate_keys() == []
    assert {r["key"] for r in table.read()} == {r["key"] for r in reference.read()}
    a, b = (json.loads((run / "summary.json").read_text()) for run in (whole, hit))
    assert a["winner"] == b["winner"] and a["drivers"]["evolution"]["profile"] == b["drivers"]["evolution"]["profile"]


def test_sigkilled_tune_experiment_resumes_to_the_same_end(uninterrupted, corpus_file, tmp_path):
    """tune-atp (one trial at a time, so a seeded experiment repeats): SIGKILL mid-experiment, then --resume
    restores the Tune experiment. Every key once, no candidate sent to an actor twice, the same best profile."""
    model_dir, _ = uninterrupted
    tune = ["--method", "tune-atp", "--tune-concurrency", "1", "--tune-rungs", "32", "64", "--budget-evals", "24",
            "--no-uniform"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*_args(model_dir, corpus_file, whole), *tune]) == 0
    _sigkill_after_parts([*_args(model_dir, corpus_file, killed), *tune], killed, parts=8)
    before = len(ResultsTable(killed, "check").read())
    assert (killed / "tune" / "tune-atp").is_dir()

    assert main([*_args(model_dir, corpus_file, killed, "--resume"), *tune]) == 0
    table, reference = ResultsTable(killed, "check"), ResultsTable(whole, "check")
    assert table.duplicate_keys() == []
    rows = table.read()
    a, b = (json.loads((run / "summary.json").read_text())["drivers"]["tune-atp"] for run in (whole, killed))
    assert b["details"]["evaluations_sent"] == len(rows) - before  # only keys the table lacked were sent
    assert {r["key"] for r in rows} == {r["key"] for r in reference.read()}
    assert a["profile"] == b["profile"] and a["validation_kl"] == b["validation_kl"]


def _sigkill_after_parts(args: list[str], out, parts: int, timeout: float = 1800) -> None:
    """Run ``sparsealloc`` with ``args`` in its own process group and SIGKILL the group (the driver and the
    Ray processes it started) once ``out`` holds ``parts`` results parts; the search must still be running.
    ``timeout`` only guards against a hung search: a loaded machine writes parts slowly, not never."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    log = out.parent / f"{out.name}.stderr"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                                   start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            results = out / "results"
            if results.exists() and len(list(results.glob("part-*.parquet"))) >= parts:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the search ended before it could be killed: " + log.read_text()[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
