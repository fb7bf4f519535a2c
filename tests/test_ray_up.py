"""The real `ray up` -> `ray job submit -- raylstm train` -> `ray down` cycle with configs/cluster.local.yaml.

`ray up` with the local provider reaches the head over SSH, so tests/scripts/ray_up_cycle.sh runs an sshd
(Debian's openssh-server; tests/scripts/ensure_ssh_tools.sh installs it when missing) on 127.0.0.1:22 with
keys made for the run, all inside private PID, network and mount namespaces: its `ray stop`/`ray down`
cannot reach any other Ray on the machine, and nothing is written to the real home directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import tiny_cli_sets

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 12  # tiny model, a few steps: this test is about the cluster path, not about learning


def _namespaces_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (private PID/network/mount namespaces and an sshd for root)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--net", "--mount", "--mount-proc", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create private namespaces here: {probe.stderr.strip()}"
    tools = subprocess.run(["bash", str(SCRIPTS / "ensure_ssh_tools.sh")], capture_output=True, text=True)
    if tools.returncode != 0:
        return f"no sshd/rsync: {tools.stderr.strip()}"
    return None


def test_ray_up_job_submit_ray_down(tmp_path, amazon_dir):
    why = _namespaces_available()
    if why:
        pytest.skip(why)
    runs = tmp_path / "runs"
    job = [
        "raylstm",
        "train",
        "--data",
        str(amazon_dir / "reviews.tsv"),
        "--workers",
        "2",
        "--storage",
        str(runs),
        "--name",
        "ray-up",
        *tiny_cli_sets(STEPS),
    ]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # the cycle sets its own; the suite's "disabled" must not leak
        env.pop(k, None)
    work = tmp_path / "cycle"
    work.mkdir()
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "ray_up_cycle.sh"), str(work), "configs/cluster.local.yaml", "--", *job],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    print(out[-6000:])  # shown with -s or on failure: the commands and what they printed at the end
    assert proc.returncode == 0, out[-6000:]

    # ray up: SSHed in and started the head with the cluster file's command (token auth on).
    up = (work / "ray_up.log").read_text()
    assert "RAY_AUTH_MODE=token ray start --head" in up and "up-to-date" in up
    assert "Ray runtime started" in up
    assert "no token -> HTTP 401" in out or "no token -> HTTP 403" in out
    # The job ran `raylstm train` on the cluster and succeeded; its run is complete and loadable.
    job_log = (work / "job.log").read_text()
    assert "succeeded" in job_log and "best checkpoint:" in job_log
    best = json.loads((runs / "ray-up" / "best.json").read_text())
    from raylstm.checkpoint import load_checkpoint

    loaded = load_checkpoint(runs / "ray-up")
    assert loaded.path.name == best["checkpoint"] and loaded.step in (STEPS // 2, STEPS)
    # ray down stopped every Ray process of the cluster (over SSH) and released the node.
    down = (work / "ray_down.log").read_text()
    assert "No nodes remaining" in down and "Stopped" in down
    assert proc.stdout.rstrip().endswith("none")  # pgrep found no raylet/gcs_server left in the namespace
