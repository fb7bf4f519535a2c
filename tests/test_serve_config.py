"""serve_config.yaml is a valid Serve deploy config whose app builder builds the raylstm app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylstm.serve import app_builder
from test_serve_support import run_dir

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
