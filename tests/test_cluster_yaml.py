"""cluster.yaml is a valid Ray cluster-launcher config with the layout the search expects."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")
ray = pytest.importorskip("ray")

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
CLUSTER_DOC = CLUSTER_YAML.parent / "docs" / "cluster.md"

# AWS specs of the instance types the cluster may use: vCPUs, RAM in GiB, GPUs, GiB usable per GPU
# (nvidia-smi: A10G 23028 MiB, A100/H100 80 GB 81920 MiB / 81559 MiB).
INSTANCES = {
    "m5.2xlarge": {"cpus": 8, "ram_gib": 32, "gpus": 0, "gpu_gib": 0.0, "accelerator": None},
    "g5.2xlarge": {"cpus": 8, "ram_gib": 32, "gpus": 1, "gpu_gib": 22.4, "accelerator": "A10G"},
    "p4de.24xlarge": {"cpus": 96, "ram_gib": 1152, "gpus": 8, "gpu_gib": 79.6, "accelerator": "A100"},
    "p5.48xlarge": {"cpus": 192, "ram_gib": 2048, "gpus": 8, "gpu_gib": 79.6, "accelerator": "H100"},
}
# Share of a node's RAM the actors may plan on: Ray's memory monitor kills workers at 95 % use, and
# the OS, raylet, object store and page cache need the rest.
HOST_HEADROOM = 0.8


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


def _node_types_by_instance(config: dict) -> dict[str, tuple[str, dict]]:
    return {spec["node_config"]["InstanceType"]: (name, spec) for name, spec in config["available_node_types"].items()}


def test_node_types_match_their_instances(config):
    """Declared resources are the instance's real vCPUs and GPUs; every instance type is a known one."""
    for name, spec in config["available_node_types"].items():
        instance = spec["node_config"]["InstanceType"]
        assert instance in INSTANCES, f"{name}: add {instance}'s specs to INSTANCES"
        known = INSTANCES[instance]
        assert spec["resources"]["CPU"] == known["cpus"], name
        assert spec["resources"].get("GPU", 0) == known["gpus"], name
        if known["accelerator"]:
            assert spec["resources"].get(f"accelerator_type:{known['accelerator']}") == 1, name


def test_small_and_large_gpu_worker_types(config):
    """A cheap single-GPU type for small models and an 8 x 80 GB type for 7B-70B, both from zero."""
    head, workers = _head_and_workers(config)
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert INSTANCES[head["node_config"]["InstanceType"]]["ram_gib"] >= 32  # the driver, final passes are on GPUs
    small = workers["ray.worker.gpu.small"]
    large = workers["ray.worker.gpu.large"]
    assert small["node_config"]["InstanceType"] == "g5.2xlarge"
    assert small["resources"]["GPU"] == 1
    assert large["node_config"]["InstanceType"] in ("p4de.24xlarge", "p5.48xlarge")
    assert large["resources"]["GPU"] == 8 and INSTANCES[large["node_config"]["InstanceType"]]["gpu_gib"] >= 79
    for spec in (small, large):
        assert spec["min_workers"] == 0 and 0 < spec["max_workers"] <= config["max_workers"]
    assert small["max_workers"] + large["max_workers"] <= config["max_workers"]
    assert large["max_workers"] <= small["max_workers"]  # the expensive type is capped harder

    def disk_gb(spec):
        (root,) = spec["node_config"]["BlockDeviceMappings"]
        return root["Ebs"]["VolumeSize"]

    # A 70B in bf16 is 140 GB, its pruned output as much again: room for both plus the AMI.
    assert disk_gb(large) >= 1000
    assert disk_gb(head) >= 140 * 2 + 100  # setup_commands fetch on the head too
    assert disk_gb(small) >= 150


def _docs_memory_table() -> list[dict]:
    """Rows of the "model size -> node type" table of docs/cluster.md ("Run on a cluster")."""
    text = CLUSTER_DOC.read_text()
    assert text.startswith("# Run on a cluster")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header_at = next(i for i, line in enumerate(lines) if "actors per node" in line and "GPUs per actor" in line)
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    rows = []
    for line in lines[header_at + 2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells)))
    return rows


def _max_gib(cell: str) -> float:
    """The largest figure in GiB in a cell: '0.8–12.4 GiB' -> 12.4, '130.5 GiB (65.2 per GPU)' -> 130.5."""
    numbers = [float(n) for n in re.findall(r"(\d+(?:\.\d+)?)\s*GiB", cell)]
    assert numbers, f"no GiB figure in {cell!r}"
    return max(numbers)


def test_docs_memory_table_fits_the_node_types(config):
    """Every row of docs/cluster.md's table fits the node type it names: GPUs, memory per GPU, host RAM."""
    rows = _docs_memory_table()
    assert len(rows) >= 5
    sizes = " ".join(row["model (bf16)"] for row in rows)
    for size in ("3B", "7", "13B", "34B", "70B"):
        assert size in sizes
    by_instance = _node_types_by_instance(config)
    for row in rows:
        instance = row["node type"].strip("`")
        assert instance in by_instance, f"docs/cluster.md names {instance}, which cluster.yaml does not have"
        name, spec = by_instance[instance]
        known = INSTANCES[instance]
        actors, gpus = int(row["actors per node"]), int(row["GPUs per actor"])
        device, host = _max_gib(row["device memory per actor"]), _max_gib(row["host memory per actor"])
        assert actors * gpus <= spec["resources"]["GPU"], row
        assert device / gpus <= known["gpu_gib"], f"{row['model (bf16)']}: {device / gpus:.1f} GiB per GPU on {name}"
        assert actors * host <= HOST_HEADROOM * known["ram_gib"], (
            f"{row['model (bf16)']}: {actors} x {host} GiB host memory on {name} ({known['ram_gib']} GiB)")
    # A 70B is offered both ways: resident over 4 GPUs and streamed on one.
    seventy = {(int(r["GPUs per actor"]), r["evaluator"]) for r in rows if "70B" in r["model (bf16)"]}
    assert {(4, "resident"), (1, "streamed")} <= seventy


def test_autoscaler_picks_the_node_type_the_readme_promises(config):
    """Eight 1-GPU actors (a 7B) or two 4-GPU actors (a 70B) start one large node; a few 1-GPU actors
    (small models) start small ones. Ray's own bin packing, with the memory it autodetects on AWS."""
    try:
        from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
        from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
    except ImportError:
        pytest.skip("ray.autoscaler._private moved")
    types = copy.deepcopy(config["available_node_types"])
    for name, spec in types.items():
        if name != config["head_node_type"]:
            ram = INSTANCES[spec["node_config"]["InstanceType"]]["ram_gib"]
            spec["resources"].setdefault("memory", int(ram * 2**30 * 0.7))
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))

    def nodes_for(actors: int, gpus: int) -> dict:
        added, unplaced = get_nodes_for(types, {}, config["head_node_type"], config["max_workers"],
                                        [{"GPU": gpus, "CPU": 1}] * actors, scorer)
        assert not unplaced
        return dict(added)

    assert nodes_for(8, 1) == {"ray.worker.gpu.large": 1}
    assert nodes_for(2, 4) == {"ray.worker.gpu.large": 1}
    assert nodes_for(4, 2) == {"ray.worker.gpu.large": 1}
    assert nodes_for(4, 1) == {"ray.worker.gpu.small": 4}
    assert nodes_for(1, 1) == {"ray.worker.gpu.small": 1}


def test_setup_exports_model_cache_and_fetches_listed_models(config):
    commands = config["setup_commands"]
    joined = "\n".join(commands)
    assert "export SPARSEALLOC_MODEL_CACHE=/home/ubuntu/sparsealloc-models" in joined
    assert "export SPARSEALLOC_FETCH_MODELS=" in joined
    exports = [i for i, c in enumerate(commands) if "SPARSEALLOC_MODEL_CACHE" in c and ".bashrc" in c]
    default_fetch = commands.index("sparsealloc fetch")
    (model_fetch,) = [i for i, c in enumerate(commands) if "sparsealloc fetch --model" in c]
    assert exports and max(exports) < default_fetch < model_fetch
    assert "$SPARSEALLOC_FETCH_MODELS" in commands[model_fetch] and "exit 1" in commands[model_fetch]
    # Re-running `ray up` rewrites the lines instead of appending duplicates.
    assert any(c.startswith("sed -i") and "sparsealloc-env" in c for c in commands[:min(exports)])
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", CLUSTER_YAML.read_text()), "a Hugging Face token in cluster.yaml"


def test_setup_commands_run_in_a_shell(config, tmp_path):
    """The bashrc lines and the fetch loop do what they say (a stub `sparsealloc` records its calls)."""
    import os
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir(), bin_dir.mkdir()
    (home / ".bashrc").write_text("# user's own\n")
    log = tmp_path / "calls"
    stub = bin_dir / "sparsealloc"
    stub.write_text(f"#!/bin/bash\necho \"$*\" >> {log}\n[ \"$3\" != bad/id ]\n")
    stub.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    start = next(i for i, c in enumerate(config["setup_commands"]) if c.startswith("sed -i"))
    commands = [c.replace('SPARSEALLOC_FETCH_MODELS=""', 'SPARSEALLOC_FETCH_MODELS="org/a org/b"')
                for c in config["setup_commands"][start:]]

    def run_all(cmds):  # as Ray runs them: each in a fresh shell that sources ~/.bashrc
        return [subprocess.run(["bash", "-c", f"source ~/.bashrc; ({c})"], env=env, capture_output=True).returncode
                for c in cmds]

    assert run_all(commands) == [0] * len(commands)
    assert run_all(commands) == [0] * len(commands)  # a second `ray up`
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.count("SPARSEALLOC_MODEL_CACHE") == 1 and bashrc.startswith("# user's own")
    assert log.read_text().splitlines() == ["fetch", "fetch --model org/a", "fetch --model org/b"] * 2
    bad = [c.replace("org/a org/b", "org/a bad/id org/c") for c in commands]
    assert run_all(bad)[-1] != 0  # a failed fetch fails the setup


def test_token_mount_can_be_enabled(config, schema):
    """Uncommenting the Hugging Face token line in file_mounts keeps the file valid."""
    text = CLUSTER_YAML.read_text()
    line = '  # "~/.cache/huggingface/token": "~/.cache/huggingface/token",'
    assert line in text
    enabled = yaml.safe_load(text.replace(line, line.replace("# ", "", 1)))
    assert enabled["file_mounts"]["~/.cache/huggingface/token"] == "~/.cache/huggingface/token"
    jsonschema.validate(enabled, schema)
