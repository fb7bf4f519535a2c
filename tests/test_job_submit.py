"""`ray job submit` against a real, token-authenticated local head: train, then serve the best checkpoint
with `serve deploy` and get text back over HTTP. The commands are the ones docs/cluster.md gives users.

The head (tests/ray_head.py) runs in a private PID namespace with free ports, so its `ray stop` cannot
reach the session Ray or anyone else's cluster.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from moto_s3 import exported_s3_server, free_port
from ray_head import local_head, namespaces_unavailable
from train_support import tiny_cli_sets

from raylstm import storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BUCKET = "raylstm-jobs"
STEPS = 16
TINY = tiny_cli_sets(STEPS, **{"train.max_val_batches": 4})


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    with local_head(tmp_path_factory.mktemp("head")) as h:
        yield h


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not answering after {timeout} s")


def test_a_client_without_the_token_is_refused(head):
    # Token auth is on for real: the same request with the token is accepted (ray_head waited on it).
    r = httpx.get(f"{head.dashboard}/api/jobs/", timeout=10)
    assert r.status_code == 401
    token = head.token_path.read_text().strip()
    assert (
        httpx.get(
            f"{head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).status_code
        == 200
    )


def test_job_runs_the_working_dir_code(head):
    # --working-dir ships this checkout; the job imports raylstm from the shipped copy, not from wherever the
    # head has it installed, so a job always runs the code that was submitted.
    out = head.run(
        "ray",
        "job",
        "submit",
        "--working-dir",
        ".",
        "--",
        "python",
        "-c",
        "import raylstm; print('RAYLSTM_AT', raylstm.__file__)",
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RAYLSTM_AT"))
    assert "runtime_resources/working_dir_files/" in line and line.endswith("raylstm/__init__.py")


@pytest.fixture(scope="module")
def s3(head):
    """moto's S3 server; its endpoint and credentials reach the jobs through their runtime env only."""
    with exported_s3_server(BUCKET) as env:
        yield env


def test_submit_training_then_serve_the_best_checkpoint(head, s3, amazon_dir):
    """The documented path end to end: shards read from S3 by Ray Data, checkpoints written to S3 by Ray
    Train, the best one served from S3 by Ray Serve, with the endpoint handed over in the runtime env."""
    storage.write_bytes(f"s3://{BUCKET}/reviews/reviews.tsv", (amazon_dir / "reviews.tsv").read_bytes())
    run = f"s3://{BUCKET}/runs/job"
    sub_id = f"raylstm-train-{int(time.time())}"
    out = head.run(
        "ray",
        "job",
        "submit",
        "--submission-id",
        sub_id,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"env_vars": s3}),
        "--",
        "raylstm",
        "train",
        "--config",
        "configs/demo.toml",
        "--data",
        f"s3://{BUCKET}/reviews/",
        "--workers",
        "2",
        "--storage",
        f"s3://{BUCKET}/runs",
        "--name",
        "job",
        *TINY,
        timeout=400,
    ).stdout
    assert f"Job '{sub_id}' succeeded" in out
    status = head.run("ray", "job", "status", sub_id).stdout
    assert f"{sub_id}' succeeded" in status
    logs = head.run("ray", "job", "logs", sub_id).stdout
    assert f"run dir: {run}" in logs  # the CLI's last words, from the job's driver on the head

    # Ray Data read the shard from the bucket (the manifest names it); Ray Train wrote the checkpoints there.
    manifest = storage.read_json(f"{run}/data_manifest.json")
    assert f"{BUCKET}/reviews/reviews.tsv" in json.dumps(manifest)
    best = storage.read_json(f"{run}/best.json")
    assert storage.exists(f"{run}/{best['checkpoint']}/meta.json")
    assert {"metrics.jsonl", "samples.txt", "config.json"} <= set(storage.list_dir(run))

    port = free_port()
    serve_config = head.work / "serve_config.yaml"
    serve_config.write_text(
        yaml.safe_dump(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": port},
                "applications": [
                    {
                        "name": "raylstm",
                        "route_prefix": "/",
                        "import_path": "raylstm.serve:app_builder",
                        "runtime_env": {"env_vars": s3},
                        "args": {"run": run, "num_cpus": 0.5},
                    }
                ],
            }
        )
    )
    head.run("serve", "deploy", str(serve_config), "-a", head.dashboard)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz")
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
        # The replica serves its verified local copy of the checkpoint best.json names.
        assert Path(health["checkpoint"]).name.endswith(best["checkpoint"])
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate",
            json={"prompt": "I bought these ", "max_chars": 60, "temperature": 0.7, "seed": 7},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        (sample,) = body["samples"]
        assert sample["finish_reason"] == "length" and len(sample["text"]) == 60
        assert body["step"] == int(best["checkpoint"].rsplit("_", 1)[1])
        status = head.run("serve", "status", "-a", head.dashboard).stdout
        assert "RUNNING" in status
    finally:
        head.run("serve", "shutdown", "-y", "-a", head.dashboard, check=False)
