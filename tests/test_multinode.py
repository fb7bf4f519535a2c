"""Several nodes (a head + 2 worker nodes of 1 CPU, ray.cluster_utils.Cluster) running raylstm for real:
Ray Data's read tasks spread over the nodes, Train workers placed on different nodes (STRICT_SPREAD), and a
worker node removed mid-run with the run finishing from its last checkpoint on the nodes that are left.

The cluster runs in tests/multinode_check.py, in a process (and PID/mount namespace) of its own: it cannot
share a process with the session Ray, and its cleanup must not reach other Ray processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def observed(tmp_path_factory, amazon_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root for private PID/mount namespaces")
    work = tmp_path_factory.mktemp("multinode")
    (work / "ray").mkdir()
    files = [
        str(amazon_dir / f)
        for f in (
            "reviews.tsv",
            "amazon_cells_labelled.txt",
            "Musical_Instruments_5.json",
            "amazon_reviews_us_Gift_Card_v1_00.tsv",
        )
    ]
    inner = (
        f"mount --bind {work / 'ray'} /tmp/ray && exec {sys.executable} "
        f"{ROOT / 'tests' / 'multinode_check.py'} {work} {' '.join(files)}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "disabled"  # a private test cluster: no token to hand around
    proc = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--mount-proc",
            "bash",
            "-c",
            f"mkdir -p /tmp/ray && {inner}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return json.loads(lines[-1].removeprefix("MULTINODE "))


def test_ray_data_read_tasks_spread_over_nodes(observed):
    nodes = set(observed["read_nodes"])
    assert len(nodes) >= 2, nodes
    assert nodes <= {observed["head"], *observed["workers"]}


def test_train_workers_on_different_nodes_then_survive_losing_one(observed):
    removed = observed["removed"]
    # STRICT_SPREAD: the two workers were on two different nodes of the cluster.
    before = removed["before"]
    assert len(before) == 2 and len(set(before)) == 2
    assert removed["node"] in before and removed["node"] in observed["workers"]
    # After the node was lost, the restarted group ran on two other (still distinct) nodes.
    after = removed["after"]
    assert len(set(after)) == 2 and removed["node"] not in after


def test_run_finished_from_its_last_checkpoint(observed):
    metrics = observed["metrics"]
    assert observed["final_step"] == 40
    restored = [m for m in metrics if m.get("restored_from_step", -1) >= 0]
    assert restored, "no report came from a restarted worker group"
    first = restored[0]
    # The new group resumed from a checkpoint (at least the one best.json named when the node was removed),
    # at the step after it: no step was repeated from the start, none skipped.
    ckpt_step = int(first["restored_from_step"])
    assert ckpt_step >= int(observed["removed"]["best_at_removal"].rsplit("_", 1)[1])
    assert ckpt_step % 10 == 0 and first["attempt_first_step"] == ckpt_step + 1
    assert min(m["step"] for m in restored) > ckpt_step
