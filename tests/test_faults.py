"""Run directories a hostile-but-ordinary user cannot break: each row of the fault table, driven through
the CLI on the tiny model, ends in one clear ``error:`` line or a repaired outcome, with no row lost or
duplicated."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import build_model, save_model_dir, tiny_llama_config
from orchestrator.cli import main
from orchestrator.runtime.results import QUARANTINE, ResultsTable, part_files

pytestmark = pytest.mark.usefixtures("shared_ray")

ROOT = Path(__file__).parents[1]


def _args(model_dir, data, out, *extra):
    return ["search", "--method", "evolution", "--sparsity", "0.6", "--budget-evals", "12", "--model",
            str(model_dir), "--data", str(data), "--seqlen", "32", "--calib-samples", "4", "--fitness-windows", "4",
            "--fitness-seqlen", "32", "--fidelities", "64", "128", "--eval-windows", "4", "--selection-windows", "2",
            "--actors", "1", "--no-uniform", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(build_model(tiny_llama_config()), tmp_path_factory.mktemp("faults") / "model")


@pytest.fixture(scope="module")
def finished(model_dir, corpus_file, tmp_path_factory):
    """One finished search; each test works on a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(model_dir, corpus_file, out)) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _keys(out: Path) -> list[str]:
    return [row["key"] for row in ResultsTable(out, "check").read()]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds a run directory's lock, as a search still running does."""
    processes = []

    def hold(out: Path) -> subprocess.Popen:
        code = textwrap.dedent(f"""
            import sys, time
            from orchestrator.runtime.lock import RunLock
            lock = RunLock({str(out / ".lock")!r}, "run directory").acquire()
            print("locked", flush=True)
            time.sleep(120)
        """)
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "locked"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


# --- one writer per run directory ---------------------------------------------------------------------

def test_a_second_resume_of_a_running_search_is_refused_naming_the_holder(run, holder, model_dir, corpus_file,
                                                                          capsys, caplog):
    keys = _keys(run)
    process = holder(run)
    assert main(_args(model_dir, corpus_file, run, "--resume")) == 2
    assert f"process {process.pid} on" in _error(capsys)
    assert _keys(run) == keys  # nothing evaluated twice, nothing written
    process.kill()
    process.wait()
    assert main(_args(model_dir, corpus_file, run, "--resume")) == 0  # a dead holder's lock is taken over
    assert "which is gone; taking the lock over" in caplog.text
    assert sorted(_keys(run)) == sorted(keys)


def test_overwrite_never_deletes_a_directory_another_process_holds(run, holder, model_dir, corpus_file, capsys):
    before = sorted(p.name for p in run.iterdir())
    holder(run)
    assert main(_args(model_dir, corpus_file, run, "--overwrite")) == 2
    assert "is in use by process" in _error(capsys)
    assert sorted(p.name for p in run.iterdir()) == before


def test_two_searches_started_together_on_one_out_run_once(model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "orchestrator.cli", *_args(model_dir, corpus_file, out)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    processes = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=600), p.stderr.read()) for p in processes)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "is in use by process" in outcomes[1][1] and "not empty" not in outcomes[1][1]
    keys = _keys(out)
    assert keys and len(keys) == len(set(keys))


# --- every file read back: a clear error or a repair -----------------------------------------------

def test_unreadable_results_parts_are_named_then_set_aside_on_resume(run, model_dir, corpus_file, capsys, caplog):
    """A truncated, an empty and a garbage part (a crash mid-write, a full disk, a stray file)."""
    parts = part_files(run / "results")
    damaged = dict(zip(("truncated", "empty", "garbage"), parts[1:4]))
    lost = {row["key"] for bad in damaged.values() for row in pq.read_table(bad).to_pylist()}
    kept = set(_keys(run)) - lost
    for damage, bad in damaged.items():
        data = bad.read_bytes()
        bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not parquet" * 9}[damage])
    for command in (["results", str(run)], ["report", str(run)]):
        assert main(command) == 2
        message = _error(capsys)
        assert any(str(bad) in message for bad in damaged.values()) and "--resume" in message
    assert main(_args(model_dir, corpus_file, run, "--resume")) == 0
    for bad in damaged.values():
        assert f"{bad.name} is unreadable" in caplog.text
        assert (run / "results" / QUARANTINE / bad.name).exists() and not bad.exists()
    keys = _keys(run)
    assert len(keys) == len(set(keys)) and kept <= set(keys) and lost <= set(keys)  # set aside, evaluated again


def test_a_lost_or_corrupt_config_and_clock_are_rebuilt_on_resume(run, model_dir, corpus_file, caplog):
    keys, record = _keys(run), json.loads((run / "config.json").read_text())
    (run / "config.json").write_text('{"run_id": "abc", "ident')  # corrupt
    (run / "clock.json").unlink()  # lost
    assert main(_args(model_dir, corpus_file, run, "--resume")) == 0
    assert "config.json was unreadable" in caplog.text and "clock.json was missing" in caplog.text
    assert "rebuilt from the results table's timestamps" in caplog.text
    rebuilt = json.loads((run / "config.json").read_text())
    assert rebuilt["identity"] == record["identity"] and rebuilt["run_id"] == record["run_id"]
    assert sorted(_keys(run)) == sorted(keys)  # nothing evaluated twice
    clock = json.loads((run / "clock.json").read_text())
    assert clock["driver:evolution"] > 0  # the drivers' time before the loss still counts


def test_a_lost_config_with_results_of_other_settings_is_refused(run, model_dir, corpus_file, capsys):
    (run / "config.json").unlink()
    assert main(_args(model_dir, corpus_file, run, "--resume", "--seed", "1")) == 2
    assert "made with other settings" in _error(capsys)


def test_a_corrupt_clock_is_named_and_rebuilt(run, model_dir, corpus_file, caplog):
    (run / "clock.json").write_text("{garbage")
    assert main(_args(model_dir, corpus_file, run, "--resume")) == 0
    assert f"{run / 'clock.json'} was unreadable" in caplog.text


def test_a_corpus_that_is_not_utf8_names_the_file_and_the_offset(model_dir, tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Caf\u00e9 au lait.\n\nSecond document.".encode("latin-1"))
    assert main(_args(model_dir, corpus, tmp_path / "run")) == 2
    message = _error(capsys)
    assert str(corpus) in message and "offset 3" in message and "UTF-8" in message


# --- checks before the expensive work: a refused run leaves nothing ------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--deadline-minutes", "0.01"], "--deadline-minutes must be at least 0.5"),
    (["--budget-tokens", "1", "--budget-evals", "1000"], "the smallest that works is --budget-tokens 128"),
    (["--budget-evals", "0"], "--budget-evals must be positive"),
])
def test_bad_arguments_are_refused_before_any_work(flags, expected, model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(model_dir, corpus_file, out)
    args[args.index("--budget-evals"):args.index("--budget-evals") + 2] = []
    assert main([*args, *flags]) == 2
    assert expected in _error(capsys)
    assert not out.exists()


def test_an_all_search_with_a_budget_below_one_evaluation_per_driver_is_refused(model_dir, corpus_file, tmp_path,
                                                                              capsys):
    args = _args(model_dir, corpus_file, tmp_path / "run", "--budget-tokens", "512")
    args[args.index("--method") + 1] = "all"
    assert main(args) == 2
    assert "the smallest that works is --budget-tokens 854" in _error(capsys)  # 128 tokens / the 15 % share


@pytest.mark.parametrize("command", ["search", "prune"])
def test_an_out_that_cannot_be_written_is_refused_before_pruning(command, model_dir, corpus_file, capsys):
    out = Path("/proc/sparsealloc-read-only/run")  # /proc takes no new files, even from root
    if command == "search":
        args = _args(model_dir, corpus_file, out)
    else:
        args = ["prune", "--model", str(model_dir), "--data", str(corpus_file), "--sparsity", "0.5", "--seqlen",
                "32", "--calib-samples", "4", "--eval-windows", "4", "--out", str(out), "--no-progress"]
    started = time.monotonic()
    assert main(args) == 2
    assert "cannot be written" in _error(capsys)
    assert time.monotonic() - started < 60  # refused at once, not after the pass (a generous bound)


# --- messages that tell the truth ------------------------------------------------------------------------

def test_an_interrupted_search_says_what_it_kept_and_how_to_resume(model_dir, corpus_file, tmp_path, monkeypatch,
                                                                   capsys):
    from orchestrator.search.drivers import evolution

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evolution, "run_evolution", interrupted)
    out = tmp_path / "run"
    assert main(_args(model_dir, corpus_file, out)) == 130
    err = capsys.readouterr().err
    assert "is kept for --resume" in err and "--resume" in err.split("continue with")[1]
    assert "nothing was written" not in err
    command = err.split("continue with `")[1].split("`")[0]
    assert command.startswith("sparsealloc search ") and f"--out {out}" in command and "--resume" in command


def test_results_of_a_run_interrupted_before_its_first_row_advise_resume(run, capsys):
    shutil.rmtree(run / "results")
    assert main(["results", str(run)]) == 2
    message = _error(capsys)
    assert "no results yet" in message and "--resume" in message and "sparsealloc search" in message
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0  # the report of such a run is its settings and final passes
    assert (run / "report.md").exists()


def test_ctrl_c_of_a_real_search_process_keeps_a_resumable_run(model_dir, corpus_file, tmp_path):
    """SIGINT to the search's process group, as a terminal's Ctrl-C sends it, mid-search."""
    out = tmp_path / "run"
    args = _args(model_dir, corpus_file, out)
    args[args.index("--budget-evals") + 1] = "2000"
    args.append("--population=1")  # one evaluation per call: a search long enough to be interrupted in the middle
    # As a terminal's foreground job: SIGINT handled, even when this suite runs in the background (`make test &`
    # leaves SIGINT ignored, and an ignored SIGINT stays ignored across exec).
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 900  # a generous bound: on a loaded machine Ray's start alone took minutes
    while len(part_files(out / "results")) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the search ended before it could be interrupted: " + process.stderr.read()[-3000:]
    if len(part_files(out / "results")) < 3:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the search wrote no results in 900 s: " + process.stderr.read()[-3000:])
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130
    err = process.stderr.read()
    assert "is kept for --resume" in err and "continue with `sparsealloc search" in err
    keys = _keys(out)
    assert keys and len(keys) == len(set(keys))
