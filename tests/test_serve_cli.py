"""`raylstm serve` end to end: its own local Ray in a subprocess, token from the env, Ctrl-C stops it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from test_serve_support import free_port, run_dir

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_cli_serve_with_token_then_ctrl_c(tmp_path_factory, tmp_path):
    run = run_dir(tmp_path_factory)
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rls", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAYLSTM_API_TOKEN": "cli-token", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raylstm.cli",
            "serve",
            "--run",
            str(run),
            "--port",
            str(port),
            "--set",
            "serve.num_cpus=0.5",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "raylstm serve never became healthy"
            time.sleep(0.5)
        while "Ctrl-C to stop" not in (tmp_path / "serve.log").read_text():  # startup finished
            assert time.monotonic() < deadline and proc.poll() is None, "no ready message"
            time.sleep(0.2)
        body = {"prompt": "I bought ", "max_chars": 20, "temperature": 0, "seed": 1}
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code == 401
        ok = httpx.post(
            f"{url}/v1/generate", json=body, timeout=60, headers={"Authorization": "Bearer cli-token"}
        )
        assert ok.status_code == 200 and len(ok.json()["samples"][0]["text"]) == 20
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        out = (tmp_path / "serve.log").read_text()
        assert f"{url}/" in out and "auth: on" in out and "shutting down Serve" in out
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this session's own Ray still left
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
