"""serve_config.yaml with the real `serve deploy` on a `ray start` cluster, in a private PID namespace
(so the `ray stop` at the end cannot touch any other Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from test_serve_support import free_port, run_dir

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys, time, urllib.request
url = sys.argv[1]
deadline = time.time() + 240
while True:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("app never became healthy")
    time.sleep(1)
req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
    data=json.dumps({"prompt": "I bought these ", "max_tokens": 25, "temperature": 0}).encode())
with urllib.request.urlopen(req, timeout=60) as r:
    print("DEPLOY_TEXT=" + json.dumps(json.loads(r.read())["choices"][0]["text"]))
with urllib.request.urlopen(url + "/v1/model", timeout=30) as r:
    info = json.loads(r.read())
print("DEPLOY_MODEL=" + json.dumps({k: info[k] for k in ("replica", "checkpoint", "reloads")}))
"""

# After `serve deploy` of the same config with the deployment's user_config pinning ckpt_b.
RELOADED = """
import json, sys, time, urllib.request
url, want = sys.argv[1], sys.argv[2]
deadline = time.time() + 120
while True:
    with urllib.request.urlopen(url + "/v1/model", timeout=30) as r:
        info = json.loads(r.read())
    if info["checkpoint"].endswith(want) or time.time() > deadline:
        break
    time.sleep(0.5)
print("RELOADED_MODEL=" + json.dumps({k: info[k] for k in ("replica", "checkpoint", "reloads")}))
"""


def test_serve_deploy_with_the_repo_config(tmp_path_factory, tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private PID namespace around ray start/stop")
    run = run_dir(tmp_path_factory)
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port, dash = free_port(), free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["run"] = str(run)  # absolute, as the comments in the file say
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    cfg["applications"][0]["deployments"] = [
        {"name": "LSTMServer", "user_config": {"checkpoint": str(run / "ckpt_b")}}
    ]
    (tmp_path / "reload.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "check.py").write_text(CHECK)
    (tmp_path / "reloaded.py").write_text(RELOADED)
    ray_tmp = tempfile.mkdtemp(prefix="rld", dir="/tmp")  # Ray's socket paths must fit 107 bytes
    bindir = Path(sys.executable).parent
    script = f"""
set -e
export PATH={bindir}:$PATH RAY_AUTH_MODE=disabled
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --num-cpus 2 --temp-dir {ray_tmp} --include-dashboard true --dashboard-host 127.0.0.1 \
    --dashboard-port {dash} --disable-usage-stats >/dev/null
serve deploy {tmp_path}/serve.yaml -a http://127.0.0.1:{dash}
python {tmp_path}/check.py http://127.0.0.1:{port}
serve deploy {tmp_path}/reload.yaml -a http://127.0.0.1:{dash}
python {tmp_path}/reloaded.py http://127.0.0.1:{port} ckpt_b
"""
    try:
        out = subprocess.run(
            ["unshare", "-p", "-f", "--mount-proc", "bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("DEPLOY_TEXT="))
    text = json.loads(line.split("=", 1)[1])

    from raylstm.sample import SampleParams, Sampler

    assert (
        text == Sampler.load(run).complete("I bought these ", SampleParams(temperature=0, max_chars=25)).text
    )
    # A changed user_config in a `serve deploy` reloads the replica in place (same replica, reconfigured).
    before = json.loads(
        next(ln for ln in out.stdout.splitlines() if ln.startswith("DEPLOY_MODEL=")).split("=", 1)[1]
    )
    after = json.loads(
        next(ln for ln in out.stdout.splitlines() if ln.startswith("RELOADED_MODEL=")).split("=", 1)[1]
    )
    assert before["checkpoint"].endswith("ckpt_a") and after["checkpoint"].endswith("ckpt_b")
    assert after["replica"] == before["replica"] and after["reloads"] == before["reloads"] + 1
