"""Fault tolerance on a real local Ray: a worker killed by SIGKILL mid-run, and a driver stopped mid-run.

Both resume from the latest checkpoint; the first step trained after the restart is that checkpoint's
step + 1 (workers report `restored_from_step` and `attempt_first_step` with their first step, and the
run's metrics.jsonl records them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from train_support import ROOT, make_windows, metrics_lines, review_sources, tiny_config, wait_for

from raylstm.train import fit_windows


@pytest.fixture(scope="module")
def sources() -> list[str]:
    return review_sources()


def check_resume(lines: list[dict], total: int) -> dict:
    """The restart line: its first step is the step after the latest checkpoint written before it."""
    restarts = [
        i
        for i, r in enumerate(lines)
        if r["restored_from_step"] >= 0 and r["step"] == r["attempt_first_step"]
    ]
    assert restarts, "no attempt resumed from a checkpoint"
    i = restarts[0]
    before = [r["step"] for r in lines[:i] if r.get("checkpoint")]
    restart = lines[i]
    assert restart["restored_from_step"] == max(before)
    assert restart["attempt_first_step"] == restart["step"] == max(before) + 1
    assert lines[-1]["step"] == total and lines[-1].get("checkpoint")
    return restart


@pytest.mark.slow
def test_a_killed_worker_costs_only_the_work_since_the_last_checkpoint(ray_session, sources, tmp_path: Path):
    w = make_windows(sources)
    cfg = tiny_config(max_steps=240, eval_every=40, log_every=10, max_failures=1, sample_chars=0)
    run_dir = tmp_path / "wk"
    box: dict = {}

    def run():
        try:
            box["result"] = fit_windows(cfg, w.vocab, w.train, w.val, storage=str(tmp_path), name="wk")
        except BaseException as e:  # surfaced by the assertion below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # Kill rank 0 (pid from its metrics) once a checkpoint exists and before the run ends.
    line = wait_for(
        lambda: next((r for r in metrics_lines(run_dir) if r.get("checkpoint")), None),
        240,
        "the first checkpoint",
    )
    assert line["step"] < 240
    os.kill(line["pid"], signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in box, box.get("error")
    lines = metrics_lines(run_dir)
    restart = check_resume(lines, 240)
    assert restart["pid"] != line["pid"]
    assert {r["pid"] for r in lines[lines.index(restart) :]}.isdisjoint({line["pid"]})


@pytest.mark.slow
def test_a_stopped_driver_continues_from_its_latest_checkpoint_when_rerun(sources, tmp_path: Path):
    """`raylstm train` in a subprocess with its own local Ray; killed (with its process group) after the
    first checkpoint; the same command again continues the run instead of starting over."""
    cmd = [
        sys.executable,
        "-m",
        "raylstm.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "demo.toml"),
        "--data",
        *sources,
        "--workers",
        "1",
        "--storage",
        str(tmp_path),
        "--name",
        "drv",
        "--set",
        "data.dedupe=false",
        "--set",
        "data.seq_len=64",
        "--set",
        "model.hidden_size=96",
        "--set",
        "train.max_steps=200",
        "--set",
        "train.eval_every=40",
        "--set",
        "train.log_every=10",
        "--set",
        "train.cpus_per_worker=1.0",
        "--set",
        "train.sample_chars=40",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    run_dir = tmp_path / "drv"
    log1 = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        first = wait_for(
            lambda: next((r for r in metrics_lines(run_dir) if r.get("checkpoint")), None),
            300,
            "the first checkpoint of the first driver",
        )
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started
        p.wait(timeout=60)
    assert first["step"] < 200
    n_before = len(metrics_lines(run_dir))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = metrics_lines(run_dir)
    restart = check_resume(lines, 200)
    assert lines.index(restart) >= n_before  # the rerun wrote it
    assert restart["restored_from_step"] >= first["step"]
    assert "best checkpoint:" in second.stdout
