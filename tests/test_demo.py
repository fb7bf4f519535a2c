"""`raylstm demo` (the README's first command) end to end, as a user runs it: a real subprocess with its
own local Ray, prepare -> train -> Serve -> samples over real HTTP -> Serve shut down. Small: the demo
preset with a few dozen steps, so it takes about a minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

TEMPERATURES = ("0.2", "0.5", "1.0", "1.2")
PRIME = "I bought this "  # configs/demo.toml's train.sample_prime


def test_demo_ends_with_samples_over_http_and_serve_shut_down(tmp_path: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="rld", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    steps = ["--set", "train.max_steps=40", "--set", "train.eval_every=20", "--set", "train.warmup_steps=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylstm.cli", "demo", "--workdir", str(tmp_path / "demo"), *steps],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    refused = None
    try:
        deadline = time.monotonic() + 420
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("demo finished"):
                # Freeze the demo before it exits (its exit would end its Ray, and Serve with it): the
                # HTTP port must already be closed because the demo shut Serve down itself.
                os.kill(proc.pid, signal.SIGSTOP)
                url = next(m.group(1) for ln in lines if (m := re.match(r"serving step \d+ at (\S+)", ln)))
                try:
                    httpx.get(f"{url}/healthz", timeout=5)
                    refused = False
                except httpx.ConnectError:
                    refused = True
                os.kill(proc.pid, signal.SIGCONT)
            assert time.monotonic() < deadline, "the demo did not finish in 7 minutes:\n" + "\n".join(lines)
        assert proc.wait(timeout=120) == 0, "\n".join(lines[-60:])
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of the demo's own Ray still left
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = "\n".join(lines)

    # The three steps ran, in order, and the demo ended with the HTTP samples and its closing line.
    assert [ln[:7] for ln in lines if ln.startswith("== ")] == ["== 1/3 ", "== 2/3 ", "== 3/3 "], out
    assert lines[-1].startswith("demo finished"), out
    assert refused is True, "Serve was still answering HTTP after the demo said it finished"

    run_dir = Path(re.search(r"run dir: (\S+)$", lines[-1]).group(1))
    best = json.loads((run_dir / "best.json").read_text())
    served_step = int(re.search(r"serving step (\d+) at", out).group(1))
    assert served_step == best["metrics"]["step"] in (20, 40)

    # Each temperature's HTTP sample is exactly what the served checkpoint writes for that seed: sampling
    # is seeded per row, so the same checkpoint, prompt and parameters reproduce it here, without Ray.
    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(run_dir)
    assert sampler.ckpt.step == served_step
    headers = re.findall(r"^--- temperature (\S+) \(HTTP\) ---$", out, re.M)
    assert headers == list(TEMPERATURES), out
    for t in TEMPERATURES:
        local = sampler.complete(PRIME, SampleParams(temperature=float(t), max_chars=300, seed=0))
        assert len(local.text) == 300
        assert f"--- temperature {t} (HTTP) ---\n{PRIME}{local.text}\n" in out

    # The run's TensorBoard event file holds the metrics.jsonl figures (read with TensorBoard's reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    evals = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("val_bpc")
    ]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("val/bpc")] == [
        (r["step"], r["val_bpc"]) for r in evals
    ]
    assert [r["step"] for r in evals] == [20, 40]
