"""serve_config.yaml is a valid Serve deploy config whose app builder builds the raylstm app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_serve_support import run_dir

from raylstm.serve import app_builder

ROOT = Path(__file__).resolve().parents[1]


def test_serve_config_yaml_is_a_deploy_config(tmp_path_factory):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "raylstm.serve:app_builder" and schema.http_options.host == "127.0.0.1"
    args = dict(app.args)
    args["run"] = str(run_dir(tmp_path_factory))
    built = app_builder(args)
    assert isinstance(built, serve.Application)


def test_app_builder_names_bad_args(tmp_path_factory):
    with pytest.raises(ValueError, match="run: RUN_DIR"):
        app_builder({"num_cpus": 1})
    with pytest.raises(ValueError, match="max_batchsize"):
        app_builder({"run": str(run_dir(tmp_path_factory)), "max_batchsize": 4})
    with pytest.raises(ValueError, match="no such checkpoint"):
        app_builder({"run": "/nonexistent/run"})


def test_replicas_resources_and_autoscaling_come_from_config(tmp_path_factory):
    from raylstm.config import ServeConfig
    from raylstm.serve import build_app

    run = run_dir(tmp_path_factory)
    fixed = build_app(run, ServeConfig(num_replicas=2, max_replicas=2, num_cpus=0.25))._bound_deployment
    assert fixed.num_replicas == 2 and fixed.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert fixed.max_ongoing_requests >= 32  # a full batch fits on one replica
    auto = build_app(run, ServeConfig(num_replicas=1, max_replicas=3, num_gpus=1.0))._bound_deployment
    scaling = auto._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert auto.ray_actor_options["num_gpus"] == 1.0
