"""cluster.yaml is a valid Ray cluster-launcher config with the layout the search expects."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")
ray = pytest.importorskip("ray")

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _head_and_workers(config: dict) -> tuple[dict, dict[str, dict]]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    return head, workers


def test_matches_ray_schema(config, schema):
    jsonschema.validate(config, schema)


def test_passes_ray_launcher_validation(config):
    """The same fill-defaults + validate path `ray up` runs before it touches AWS."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API; the schema test above still covers the file
        pytest.skip("ray.autoscaler._private.util moved")
    validate_config(prepare_config(copy.deepcopy(config)))


def test_invalid_configs_are_rejected(config, schema):
    """The schema check has teeth: unknown keys and wrong types fail."""
    bad_top = copy.deepcopy(config)
    bad_top["not_a_ray_key"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_top, schema)

    bad_node = copy.deepcopy(config)
    bad_node["available_node_types"][config["head_node_type"]]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_node, schema)

    bad_type = copy.deepcopy(config)
    _, workers = _head_and_workers(bad_type)
    next(iter(workers.values()))["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_type, schema)


def test_aws_provider_and_auth(config):
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    assert provider["availability_zone"].startswith("us-west-2")
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["cluster_name"] == "sparsealloc"


def test_cpu_head_and_autoscaling_gpu_workers(config):
    head, workers = _head_and_workers(config)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) > 0
    gpu_workers = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no GPU worker node type"
    for spec in gpu_workers.values():
        assert spec["min_workers"] == 0
        assert spec["max_workers"] > 0
        assert spec["max_workers"] <= config["max_workers"]


def test_setup_installs_project_and_fetches_assets(config):
    commands = config["setup_commands"]
    install = [i for i, c in enumerate(commands) if "pip install" in c and "~/sparsealloc" in c]
    fetch = [i for i, c in enumerate(commands) if "sparsealloc fetch" in c]
    assert install and fetch
    assert install[0] < fetch[0], "assets must be fetched after the project is installed"
    # GPU nodes need the CUDA torch build: the Makefile's CPU pin must not reach the cluster.
    all_commands = commands + config.get("head_setup_commands", []) + config.get("worker_setup_commands", [])
    assert not any("torch==2.13.0" in c for c in all_commands)
    assert "~/sparsealloc" in config["file_mounts"]


def test_ray_start_commands(config):
    head = config["head_start_ray_commands"]
    worker = config["worker_start_ray_commands"]
    assert head[0] == "ray stop" and worker[0] == "ray stop"
    assert any("ray start --head" in c and "--port=6379" in c
               and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in head)
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in worker)
