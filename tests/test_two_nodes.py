"""Two Ray nodes on this machine (head + worker on loopback): evaluators run on both.

The scenario runs in a fresh Python process, as a cluster client would, so no Ray state left by
other tests in this process can interfere.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_model, save_model_dir, tiny_llama_config

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
SCENARIO = """
import json, sys, torch, ray
from ray.cluster_utils import Cluster
from orchestrator.runtime.candidates import Candidate
from orchestrator.runtime.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.runtime.results import ResultsTable
from search_spaces import families

model_dir, run_dir = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
# A search without --address starts its own Ray even though this cluster runs on the machine (Ray would join it).
from orchestrator.runtime.cluster import init_ray
init_ray(None, 1, 1)
own = ray.get_runtime_context().gcs_address
ray.shutdown()
ray.init(address=cluster.address, log_to_driver=False)
alive = len([n for n in ray.nodes() if n["Alive"]])
pool = EvaluatorPool(EvaluatorSpec(model_dir), torch.randint(3, 120, (2, 16)), torch.randint(3, 120, (2, 16)),
                     ResultsTable(run_dir, "two-nodes"), num_actors=2)
candidates = [Candidate.of(families.atp(4, 0.5, beta)) for beta in (0.0, 0.05, 0.1, 0.15)]
pool.evaluate(candidates)
report = {"own": own, "cluster": cluster.address, "alive": alive, "actor_nodes": [info["node"] for info in pool.infos],
          "result_nodes": [pool.results.get(c.key)["node"] for c in candidates]}
pool.close()
ray.shutdown()
cluster.shutdown()
print("REPORT " + json.dumps(report))
"""


def test_actors_spread_over_both_nodes(tmp_path):
    model_dir = save_model_dir(build_model(tiny_llama_config()), tmp_path / "model")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}  # throwaway local cluster
    done = subprocess.run([sys.executable, "-c", SCENARIO, str(model_dir), str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["own"] != report["cluster"]  # the local search's own Ray, not the cluster on this machine
    assert report["alive"] == 2
    assert len(set(report["actor_nodes"])) == 2  # one CPU per node: one actor on each
    assert set(report["result_nodes"]) == set(report["actor_nodes"])  # both nodes did evaluations
