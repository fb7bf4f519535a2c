"""cluster.yaml and configs/cluster.local.yaml through Ray's own cluster-launcher checks.

`prepare_config` is what `ray up` runs first (merge with the provider's defaults.yaml, per-node-type worker
bounds); `validate_config` checks the result against the autoscaler's JSON schema, which forbids unknown
keys. The AWS node_configs are free-form to Ray (they are passed to EC2's RunInstances), so they are checked
against botocore's model of that API call: a misspelt EC2 key fails here instead of at launch time.
Nothing here talks to AWS.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _prepare_and_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ec2_run_instances_errors(node_config: dict) -> str:
    """botocore's own parameter validation for RunInstances ('' when valid). Min/MaxCount are filled by Ray."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
    return report.generate_report() if report.has_errors() else ""


def test_aws_cluster_yaml_passes_ray_validation_and_default_filling():
    import ray

    prepared = _prepare_and_validate(_load("cluster.yaml"))
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and "head" in types
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    assert set(gpu_types) == {"gpu_g5", "gpu_g6"}
    for name, t in gpu_types.items():
        assert t["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6"}, name
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
    # Default filling really happened (keys absent from our file come from Ray's aws/defaults.yaml).
    assert "cluster_synced_files" in prepared and "head_setup_commands" in prepared
    # The images are this Ray's version on this project's Python, not the retired ray-ml line.
    major, minor = ray.__version__.split(".")[:2]
    for key in ("image", "head_image"):
        image = prepared["docker"][key]
        assert image.startswith(f"rayproject/ray:{major}.{minor}.") and "-py311-" in image, image
    assert prepared["docker"]["image"].endswith("-gpu")
    # Token auth: every node gets the token file and starts Ray with token mode on.
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    assert sum("RAY_AUTH_MODE=token ray start" in c for c in starts) == 2
    assert any("pip install" in c and "raylstm" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("node_type", ["head", "gpu_g5", "gpu_g6"])
def test_aws_node_configs_are_valid_run_instances_parameters(node_type):
    node_config = _load("cluster.yaml")["available_node_types"][node_type]["node_config"]
    assert _ec2_run_instances_errors(node_config) == ""


@pytest.mark.parametrize(
    "where, typo",
    [
        ("top", ("max_worker", 4)),  # max_workers misspelt
        ("node_type", ("min_worker", 0)),
        ("docker", ("imag", "rayproject/ray:2.60.0-py311-gpu")),
        ("auth", ("ssh_usr", "ubuntu")),
    ],
)
def test_a_misspelt_key_is_rejected_by_ray(where, typo):
    import jsonschema

    config = _load("cluster.yaml")
    target = {
        "top": config,
        "node_type": config["available_node_types"]["gpu_g5"],
        "docker": config["docker"],
        "auth": config["auth"],
    }[where]
    target[typo[0]] = typo[1]
    with pytest.raises(jsonschema.ValidationError, match=typo[0]):
        _prepare_and_validate(config)


def test_a_misspelt_ec2_key_is_rejected_by_the_run_instances_model():
    node_config = copy.deepcopy(_load("cluster.yaml")["available_node_types"]["gpu_g5"]["node_config"])
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    assert "InstanceTyp" in _ec2_run_instances_errors(node_config)
    node_config = copy.deepcopy(_load("cluster.yaml")["available_node_types"]["gpu_g5"]["node_config"])
    node_config["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOption": {}}  # SpotOptions
    assert "SpotOption" in _ec2_run_instances_errors(node_config)


def test_inconsistent_worker_bounds_are_rejected():
    config = _load("cluster.yaml")
    config["max_workers"] = 1
    config["available_node_types"]["gpu_g5"]["min_workers"] = 2
    with pytest.raises(ValueError, match="min_workers"):
        _prepare_and_validate(config)


def test_local_cluster_yaml_passes_ray_validation():
    prepared = _prepare_and_validate(_load("configs/cluster.local.yaml"))
    assert prepared["provider"]["type"] == "local" and prepared["provider"]["head_ip"] == "127.0.0.1"
    # The local provider turns the file into one node type whose worker count is len(worker_ips).
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == 0
    assert any("--node-ip-address=127.0.0.1" in c for c in prepared["head_start_ray_commands"])
    config = _load("configs/cluster.local.yaml")
    config["provider"]["head_ipp"] = config["provider"].pop("head_ip")
    # The local provider's own check: a head without an address cannot be `ray up`ed.
    with pytest.raises(BaseException, match="head_ip"):
        _prepare_and_validate(config)
