"""The Ray cluster-launcher files: valid under Ray's own schema, consistent with the instances
they name, and readable by `sweep plan --cluster`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from typer.testing import CliRunner

from sweep.cli import app
from sweep.errors import StudyError
from sweep.run.resources import ClusterShape

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = ["cluster.yaml", "cluster/gcp.yaml", "cluster/local.yaml"]
WITH_NODE_TYPES = ["cluster.yaml", "cluster/gcp.yaml"]

INSTANCES = {
    # type: (vCPUs, GPUs, memory GiB), as the providers list them
    "m5.2xlarge": (8, 0, 32),
    "g5.2xlarge": (8, 1, 32),
    "g5.12xlarge": (48, 4, 192),
    "n2-standard-8": (8, 0, 32),
    "g2-standard-8": (8, 1, 32),
    "g2-standard-48": (48, 4, 192),
}
"""What the instance types of the files have: the files' resources must fit them."""


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def validate(config: dict) -> None:
    """What `ray up` checks before it talks to any provider: the file against Ray's schema,
    then the config Ray fills out from its provider defaults against Ray's validator."""
    jsonschema.validate(config, ray_schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_pass_rays_own_validation(name):
    validate(load(name))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c.update(max_worker=4), "max_worker"),  # a misspelt top-level key
        (lambda c: c["available_node_types"]["gpu_small"].update(min_worker=1), "min_worker"),
        (lambda c: c["available_node_types"]["gpu_small"]["resources"].update(GPU=0.5), "0.5"),
        (lambda c: c["available_node_types"]["gpu_small"].pop("node_config"), "node_config"),
        (lambda c: c["provider"].pop("type"), "type"),
        (lambda c: c["docker"].update(imagee="x"), "imagee"),
    ],
)
def test_a_broken_copy_is_rejected(mutate, needle):
    config = load("cluster.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(needle)):
        validate(config)


def test_rays_validator_catches_what_the_schema_cannot():
    config = load("cluster.yaml")
    config["head_node_type"] = "gpu_tiny"
    with pytest.raises(ValueError, match="head_node_type"):
        validate(config)


@pytest.mark.parametrize("name", WITH_NODE_TYPES)
def test_node_resources_fit_their_instance_types(name):
    config = load(name)
    head = config["head_node_type"]
    for node_type, spec in config["available_node_types"].items():
        node = spec["node_config"]
        instance = node.get("InstanceType") or node.get("machineType")
        cpus, gpus, memory_gib = INSTANCES[instance]
        resources = spec["resources"]
        assert resources.get("GPU", 0) == gpus or node_type == head, node_type
        assert resources["CPU"] <= cpus, node_type
        # Ray's `memory` leaves the object store (30 % by default) and the OS their share.
        assert resources.get("memory", 0) <= 0.7 * memory_gib * 2**30, node_type
    # The head runs the driver, not trials.
    assert config["available_node_types"][head]["resources"]["CPU"] == 0
    assert config["available_node_types"][head]["resources"].get("GPU", 0) == 0
    assert (
        sum(t.get("min_workers", 0) for t in config["available_node_types"].values())
        <= (config["max_workers"])
    )


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_nodes_install_the_project_and_share_the_fetched_weights(name):
    config = load(name)
    assert config["file_mounts"] == {"~/anomaly-sweep": "."}
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e ~/anomaly-sweep" in setup
    head_setup = " ".join(config["head_setup_commands"])
    fetch = re.search(r"sweep weights fetch (\S+) --to (\S+)", head_setup)
    assert fetch, head_setup
    # The studies it fetches for are the repository's, and trials read the folder it fills.
    pattern = fetch.group(1).replace("~/anomaly-sweep/", "")
    assert sorted(ROOT.glob(pattern)), pattern
    folder = fetch.group(2).replace("~", "$HOME")
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert f"ANOMALY_SWEEP_WEIGHTS_DIR={folder}" in command, command


@pytest.mark.parametrize("name", WITH_NODE_TYPES)
def test_sweep_plan_reads_the_cluster_file(name):
    config = load(name)
    shape = ClusterShape.from_cluster_yaml(ROOT / name)
    assert shape.notes == (), "the instance types tell the GPU memory"
    assert {node.gpu_memory_gb for node in shape.nodes if node.gpus} == {24.0}  # A10G / L4
    types = config["available_node_types"]
    head = shape.nodes[0]
    assert head.name.endswith("(head)") and head.cpus == 0 and head.gpus == 0
    workers = shape.nodes[1:]
    assert len(workers) == config["max_workers"]
    for node in workers:
        kind = node.name.split("[")[0]
        assert node.gpus == types[kind]["resources"]["GPU"]
        assert node.memory_gb == types[kind]["resources"]["memory"] / 2**30

    result = CliRunner().invoke(
        app,
        [
            "plan",
            str(ROOT / "studies/glue_line.yaml"),
            "--cluster",
            str(ROOT / name),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["n_trials"] == 140
    assert plan["packing"]["unschedulable"] == []
    assert plan["packing"]["gpu_utilisation"] > 0.5  # the trials run on the GPU workers


def test_the_on_premise_file_has_no_node_types_for_the_plan():
    # Ray detects an on-premise node's resources itself; the plan says what it needs instead.
    with pytest.raises(StudyError, match="available_node_types"):
        ClusterShape.from_cluster_yaml(ROOT / "cluster/local.yaml")


def test_cluster_files_name_one_ray_version():
    # Head, workers and the machine running `ray up` must run the same Ray.
    versions = set()
    for name in CLUSTER_FILES:
        text = (ROOT / name).read_text()
        versions |= set(re.findall(r"rayproject/ray:([\d.]+)-", text))
        versions |= set(re.findall(r"ray\[default\]==([\d.]+)", text))
    assert len(versions) == 1, versions
