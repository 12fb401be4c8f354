"""The cluster path on real multi-node Ray (tests/local_cluster.py): a CPU head that runs only the
driver, workers that share no disk with it, nodes that die, and `ray job submit`. Tiny models; the
real-model variant is `python -m bench.cluster`."""

import json
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from conftest import _corpus_text, build_model, save_model_dir, tiny_llama_config
from local_cluster import LocalCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
def shared(tmp_path):
    """The model and the corpus, at the same path on every node (as an image or a fetched copy gives them)."""
    folder = tmp_path / "shared"
    model = save_model_dir(build_model(tiny_llama_config()), folder / "model")
    corpus = folder / "corpus.txt"
    corpus.write_text(_corpus_text())
    return model, corpus


@pytest.fixture
def cluster(tmp_path):
    driver = tmp_path / "driver"
    driver.mkdir()
    made = LocalCluster(tmp_path, hidden=[driver]).start()
    yield made
    made.stop()


def _search(model, corpus, out, *extra, budget="24", method="evolution"):
    return ["search", "--method", method, "--sparsity", "0.6", "--budget-evals", budget, "--model", str(model),
            "--data", str(corpus), "--seqlen", "32", "--calib-samples", "4", "--fitness-windows", "4",
            "--fitness-seqlen", "32", "--fidelities", "64", "128", "--eval-windows", "4", "--selection-windows", "2",
            "--actors", "2", "--out", str(out), "--no-progress", *extra]


def _rows(out: Path) -> list[dict]:
    return ds.dataset(out / "results", format="parquet").to_table(columns=["key", "node"]).to_pylist()


def _ok(done) -> None:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_a_search_and_a_sweep_on_workers_that_share_no_disk_with_the_driver(cluster, shared, tmp_path):
    """Actors and final passes on two workers whose caches and disks differ from the driver's: a SparseGPT search
    whose level database is built once on a worker (never on the CPU head) and copied to the other; everything
    the run keeps comes back to the driver's run directory; a resume re-runs nothing; a Wanda sweep's models come
    back, and its tune-atp cell runs a Ray Tune experiment."""
    model, corpus = shared
    workers = cluster.add_worker("first", num_cpus=1), cluster.add_worker("second", num_cpus=1)
    out = tmp_path / "driver" / "run"
    search = _search(model, corpus, out, "--pruner", "sparsegpt", "--db-levels", "0.5", "0.6", "0.7", budget="12")
    _ok(cluster.run(*search))
    rows = _rows(out)
    nodes = {row["node"] for row in rows}
    assert len(nodes) == 2 and rows  # actors on both workers (the head has no CPU), both read the database
    built = [list((node.cache / "level-db").glob("*/levels.json")) for node in workers]
    assert all(len(found) == 1 for found in built), built  # one database on each worker's disk
    assert not (tmp_path / "driver" / "cache" / "level-db").exists()  # never on the CPU head
    summary = json.loads((out / "summary.json").read_text())
    winner = summary["winner"]
    assert all(p["node"] in nodes for p in summary["final_passes"].values())  # passes on the workers too
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "config.json").exists()
    assert (out / "finalists" / winner / "metrics.json").exists()  # the metrics came back to the driver
    assert not (out / "finalists" / winner / "model.safetensors").exists()  # the finalist's weights stayed there
    assert any((node.cache / "dense").is_dir() for node in workers)  # the dense pass cached on its worker
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns

    resumed = cluster.run(*search, "--resume")
    _ok(resumed)
    assert sorted(row["key"] for row in _rows(out)) == sorted(row["key"] for row in rows)  # nothing evaluated again
    again = json.loads((out / "summary.json").read_text())
    assert all(p["reused"] for p in again["final_passes"].values())  # no final pass made again
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp

    spec = tmp_path / "driver" / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "models": [str(model)], "sparsities": [0.5], "methods": ["uniform", "tune-atp"], "budget": {"evals": 6},
        "data": str(corpus), "seqlen": 32, "calib_samples": 4, "eval_windows": 4, "fitness_windows": 4,
        "fitness_seqlen": 32, "fidelities": [64, 128], "selection_windows": 2, "actors": 2, "save_models": True}))
    sweep = tmp_path / "driver" / "sweep"
    _ok(cluster.run("sweep", str(spec), "--out", str(sweep), "--no-progress"))
    passes = list((sweep / "passes").iterdir())
    assert passes and all((p / "model.safetensors").exists() and (p / "metrics.json").exists() for p in passes)
    # tune-atp's Ray Tune experiment ran on the cluster, kept on the driver (trials checkpoint nothing, so no
    # storage shared by the nodes is needed), and finished.
    experiments = list(sweep.glob("**/tune/tune-atp"))
    assert len(experiments) == 1 and (experiments[0] / "sparsealloc-result.json").exists()
    assert list(experiments[0].glob("experiment_state-*.json"))


def test_nodes_that_die_are_said_waited_for_within_a_bound_and_resumed(cluster, shared, tmp_path):
    """Every worker lost mid-search with none added: a clear error within the wait, results kept. Resumed on a
    new worker, which is lost in turn with a replacement added: the search goes on. The last worker lost
    while the final passes run, a node added: they run again there. Nothing lost, nothing evaluated twice."""
    model, corpus = shared
    first = cluster.add_worker("first", num_cpus=2)
    out = tmp_path / "driver" / "run"
    # One candidate per call: the kills land after a few evaluations, long before the search could run out of
    # profiles to try (on this tiny model evolution stops after about 500), so the third worker evaluates too.
    args = _search(model, corpus, out, "--node-wait-minutes", "0.3", "--population", "1", budget="600")
    search = cluster.spawn(*args)
    _wait_for_parts(out, 6, search)
    cluster.kill(first)
    assert search.wait(timeout=600) == 2  # the timeout guards against a hang; the message says how long it waited
    error = [line for line in _log(cluster).splitlines() if line.startswith("error:")]
    assert error and "within 0.3 min (--node-wait-minutes)" in error[0] and "--resume" in error[0], _log(cluster)[-3000:]
    kept = {row["key"] for row in _rows(out)}
    assert kept

    second = cluster.add_worker("second", num_cpus=2)
    # From here on a replacement is always added: a wait longer than a loaded machine needs to start a worker.
    search = cluster.spawn(*args, "--resume", "--node-wait-minutes", "5")
    _wait_for_parts(out, len(list((out / "results").glob("part-*"))) + 6, search)
    cluster.kill(second)
    time.sleep(3)
    third = cluster.add_worker("third", num_cpus=2)
    _wait_for_log(cluster, "final pass task(s)", search)
    cluster.kill(third)
    cluster.add_worker("fourth", num_cpus=2)
    assert search.wait(timeout=900) == 0, _log(cluster)[-3000:]
    log = _log(cluster)
    assert "is gone with evaluator actor(s)" in log and "kept and evaluated again" in log
    assert "the final passes it was running are run again on another node" in log
    rows = _rows(out)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) and kept <= set(keys)  # nothing evaluated twice, nothing lost
    assert len({row["node"] for row in rows}) >= 3, log[-3000:]  # the first, second and third workers evaluated
    assert (out / "model" / "model.safetensors").exists()


def test_a_search_submitted_as_a_ray_job_is_stopped_kept_and_resumed(tmp_path, shared):
    """`ray job submit` runs the search on the head (no CPUs) against the workers; `ray job stop` ends it like
    Ctrl-C (the run kept, the resume command in the job's log); a second job with --resume finishes it."""
    import re
    import subprocess
    import sys

    from local_cluster import RAY

    model, corpus = shared
    (tmp_path / "driver").mkdir()
    cluster = LocalCluster(tmp_path, hidden=[tmp_path / "driver"], dashboard=True)
    cluster.start()
    try:
        cluster.add_worker("worker", num_cpus=2)
        out = tmp_path / "driver" / "run"
        env = json.dumps({"env_vars": {"SPARSEALLOC_CACHE": str(tmp_path / "driver" / "cache")}})
        submit = [RAY, "job", "submit", "--address", cluster.job_address, "--runtime-env-json", env]
        sparsealloc = str(Path(sys.executable).parent / "sparsealloc")  # the console script, as in a cluster's image
        search = [sparsealloc, *_search(model, corpus, out, budget="2000")]
        deadline = time.monotonic() + 300
        while True:  # the head's job agent may still be starting (slowly on a loaded machine): "try again later"
            started = subprocess.run([*submit, "--no-wait", "--", *search], env=cluster.env(), capture_output=True,
                                     text=True, timeout=120)
            if started.returncode == 0 or "No available agent" not in started.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert started.returncode == 0, started.stderr[-2000:]
        job = re.search(r"raysubmit_[A-Za-z0-9]+", started.stdout + started.stderr).group(0)
        deadline = time.monotonic() + 300
        while len(list((out / "results").glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        stopped = subprocess.run([RAY, "job", "stop", "--address", cluster.job_address, job], env=cluster.env(),
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        logs = subprocess.run([RAY, "job", "logs", "--address", cluster.job_address, job], env=cluster.env(),
                              capture_output=True, text=True, timeout=60).stdout
        assert "is kept for --resume" in logs and f"`sparsealloc search --out {out}" in logs, logs[-2000:]
        kept = {row["key"] for row in _rows(out)}
        resumed = subprocess.run([*submit, "--", *search, "--resume", "--budget-evals", "16"], env=cluster.env(),
                                 capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0 and "succeeded" in resumed.stdout, (resumed.stdout + resumed.stderr)[-3000:]
        keys = [row["key"] for row in _rows(out)]
        assert len(keys) == len(set(keys)) and kept <= set(keys)
        assert (out / "model" / "model.safetensors").exists()
    finally:
        cluster.stop()


def _wait_for_parts(out: Path, count: int, process, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before the node was lost"
        if (out / "results").is_dir() and len(list((out / "results").glob("part-*.parquet"))) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError("no results")


def _wait_for_log(cluster: LocalCluster, text: str, process, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the search ended before {text!r}"
        if text in _log(cluster):
            return
        time.sleep(0.5)
    raise TimeoutError(text)


def _log(cluster: LocalCluster) -> str:
    return "\n".join(path.read_text() for path in sorted(cluster.root.glob("driver-*.log")))
