"""Two Ray nodes on this machine (head + worker on loopback): evaluators run on both."""

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from conftest import build_model, save_model_dir, tiny_llama_config
from orchestrator.candidates import Candidate
from orchestrator.pool import EvaluatorPool, EvaluatorSpec
from orchestrator.results import ResultsTable
from search_spaces import families


@pytest.fixture
def two_node_cluster(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # throwaway local cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_spread_over_both_nodes(two_node_cluster, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    model_dir = save_model_dir(build_model(tiny_llama_config()), tmp_path / "model")
    pool = EvaluatorPool(EvaluatorSpec(str(model_dir)), torch.randint(3, 120, (2, 16)), torch.randint(3, 120, (2, 16)),
                         ResultsTable(tmp_path / "run", "two-nodes"), num_actors=2)
    assert len({info["node"] for info in pool.infos}) == 2  # one CPU per node: one actor on each
    candidates = [Candidate.of(families.atp(4, 0.5, beta)) for beta in (0.0, 0.05, 0.1, 0.15)]
    pool.evaluate(candidates)
    nodes = {pool.results.get(c.key)["node"] for c in candidates}
    assert nodes == {info["node"] for info in pool.infos}
