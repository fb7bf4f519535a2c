"""Resume on a real local Ray, checked by state: a worker killed by SIGKILL, a driver killed and rerun,
and a run continued on another worker count; and stateful windows partitioning the shard.

Every worker writes a record (train.trace_dir): the weights, optimizer tensors and LR schedule it
restored before its first update, and a digest of every window it trained on. The tests compare that
record with independent references: the checkpoint files the run resumed from, the rows of the dataset,
and an uninterrupted run of the same config. Data order is deterministic (data.preserve_order: Ray
Data's split hands out blocks in order, and the local shuffle is seeded per epoch and rank), dropout
masks are seeded per step, and checkpoints fall on segment boundaries, so a resumed run retraces the
uninterrupted one: the final weights are compared to 1e-6 (they come out bit-identical here).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_support import ROOT, make_windows, metrics_lines, review_sources, tiny_config, wait_for

from raylstm.model import build_model
from raylstm.train import fit_windows
from raylstm.train_loop import lr_multiplier
from raylstm.vocab import CharVocab

SEQ, SEG = 32, 4  # 32-char windows, 4 per segment (stateful): checkpoints every 20 steps = 5 segments
BATCH = 32  # tiny_config's batch per worker


@pytest.fixture(scope="module")
def data(ray_session):
    return make_windows(review_sources(n_reviews=150), seq_len=SEQ, segment_windows=SEG)


def steps_per_epoch(data, workers: int) -> int:
    """Ray's equal split, then whole batches (drop_last), each SEG steps."""
    return (data.n_train // workers) // BATCH * SEG


def config(data, workers: int, max_steps: int, trace: Path, **kw):
    cfg = tiny_config(seq_len=SEQ, segment_windows=SEG, num_workers=workers, max_steps=max_steps)
    for k, v in dict(
        eval_every=20, log_every=5, sample_chars=0, keep_checkpoints=20, trace_dir=str(trace)
    ).items():
        setattr(cfg.train, k, v)
    for k, v in kw.items():
        setattr(cfg.train, k, v)
    return cfg


def run_in_thread(cfg, data, storage: Path, name: str) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["result"] = fit_windows(
                cfg, data.vocab, data.train, data.val, storage=str(storage), name=name
            )
        except BaseException as e:  # surfaced by the callers' assertions
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"checkpoint_{step:07d}" / "model.safetensors"))


def assert_restored_the_checkpoint(trace: Path, run_dir: Path, step: int, cfg, ranks: int) -> None:
    """What each worker held before its first update after the resume IS checkpoint `step`: every weight,
    every optimizer tensor, the scheduler's position and the LR it gives."""
    ckpt = run_dir / f"checkpoint_{step:07d}"
    weights = load_file(str(ckpt / "model.safetensors"))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    dumps = sorted(trace.glob(f"restore-step{step:07d}-rank*.safetensors"))
    assert len({d.name.split("-rank")[1][0] for d in dumps}) == ranks, dumps
    cfg.model.vocab_size = len(CharVocab.load(ckpt / "vocab.json"))
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg.model).state_dict()
    assert any(not torch.equal(fresh[k], weights[k]) for k in weights)  # trained: a restore is visible
    expected_lr = cfg.train.lr * lr_multiplier(
        step, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio
    )
    for dump in dumps:
        got = load_file(str(dump))
        for k, v in weights.items():
            assert torch.equal(got[f"model.{k}"], v), f"{dump.name}: weight {k} is not the checkpoint's"
        n_opt = 0
        for idx, per_param in state["optimizer"]["state"].items():
            for name, v in per_param.items():
                assert torch.equal(got[f"optimizer.{idx}.{name}"], v), f"{dump.name}: optimizer {idx}.{name}"
                n_opt += 1
        assert n_opt >= 3 * len(weights)  # step, exp_avg and exp_avg_sq of every parameter
        info = json.loads(dump.with_suffix(".json").read_text())
        assert info["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"] == step
        assert info["lr"] == [g["lr"] for g in state["optimizer"]["param_groups"]]
        assert info["lr"][0] == pytest.approx(expected_lr, rel=1e-9)


def window_digests(row: np.ndarray) -> list[str]:
    """Digests of a segment's windows, computed here the way a reader of the trace would (int32 bytes)."""
    return [
        hashlib.blake2b(
            np.ascontiguousarray(row[j * SEQ : (j + 1) * SEQ + 1], np.int32).tobytes(), digest_size=8
        ).hexdigest()
        for j in range(SEG)
    ]


def trace_lines(trace: Path, pid: int | None = None) -> dict[int, list[dict]]:
    """Trace lines by rank (of one attempt when pid is given), in step order."""
    out: dict[int, list[dict]] = defaultdict(list)
    for f in sorted(trace.glob("windows-rank*-pid*.jsonl")):
        rank, fpid = int(f.name.split("rank")[1].split("-")[0]), int(f.name.split("pid")[1].split(".")[0])
        if pid is None or fpid == pid:
            out[rank] += [json.loads(line) for line in f.read_text().splitlines()]
    return {r: sorted(v, key=lambda x: x["step"]) for r, v in out.items()}


def assert_epoch_partitions_the_shard(data, lines: dict[int, list[dict]], epoch: int, workers: int) -> None:
    """In one epoch, every batch row reads one segment's windows in order (state carried, reset only at
    the segment's start), no segment is read twice, and only the rows Ray's equal split and drop_last
    leave over (fewer than workers x batch) are not read."""
    rows = [np.asarray(r["ids"]) for r in data.train.take_all()]
    by_first: dict[str, list[int]] = defaultdict(list)
    digests = [window_digests(r) for r in rows]
    for i, d in enumerate(digests):
        by_first[d[0]].append(i)
    batch = BATCH
    read: list[int] = []
    for rank in range(workers):
        ep = [x for x in lines[rank] if x["epoch"] == epoch]
        assert len(ep) % SEG == 0 and ep, (rank, len(ep))
        for k in range(0, len(ep), SEG):
            group = ep[k : k + SEG]
            assert [x["reset"] for x in group] == [True] + [False] * (SEG - 1), group
            for b in range(batch):
                seen = [x["rows"][b] for x in group]
                matches = [i for i in by_first[seen[0]] if digests[i] == seen]
                assert matches, f"rank {rank}, row {b}: windows not consecutive windows of one segment"
                read.append(matches[0])
    assert len(read) == len(set(read)), "a segment was read twice in one epoch"
    steps_per_rank = (len(rows) // workers) // batch
    assert len(read) == steps_per_rank * batch * workers
    assert len(rows) - len(read) < workers * batch + workers


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The reference: 2 workers, two whole epochs and 20 steps more, no failure. It evaluates and
    checkpoints at its last step only: evaluation changes nothing the training computes (no dropout,
    per-step seeds, the carried state untouched), so the resumed run, which checkpoints every 20 steps,
    must still end on its weights."""
    storage = tmp_path_factory.mktemp("ref")
    total = 2 * steps_per_epoch(data, 2) + 20
    cfg = config(data, workers=2, max_steps=total, trace=storage / "trace", eval_every=total)
    res = fit_windows(cfg, data.vocab, data.train, data.val, storage=str(storage), name="ref")
    return cfg, Path(res.run_dir), storage / "trace"


@pytest.mark.slow
def test_with_two_workers_the_streams_partition_the_shard(data, uninterrupted):
    _, _, trace = uninterrupted
    lines = trace_lines(trace)
    assert sorted(lines) == [0, 1]
    for epoch in (0, 1):
        assert_epoch_partitions_the_shard(data, lines, epoch, workers=2)


@pytest.mark.slow
def test_a_killed_worker_resumes_the_checkpoint_state_and_ends_where_the_uninterrupted_run_ends(
    data, uninterrupted, tmp_path: Path
):
    ref_cfg, ref_dir, _ = uninterrupted
    total = ref_cfg.train.max_steps
    cfg = config(data, workers=2, max_steps=total, trace=tmp_path / "trace", max_failures=1)
    run_dir = tmp_path / "wk"
    t, box = run_in_thread(cfg, data, tmp_path, "wk")
    first = wait_for(
        lambda: next((r for r in metrics_lines(run_dir) if r.get("checkpoint")), None),
        240,
        "the first checkpoint",
    )
    assert first["step"] < total
    os.kill(first["pid"], signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in box, box.get("error")

    lines = metrics_lines(run_dir)
    restart = next(r for r in lines if r["restored_from_step"] >= 0)
    resumed_at = restart["restored_from_step"]
    assert resumed_at >= first["step"] and restart["pid"] != first["pid"]
    assert_restored_the_checkpoint(tmp_path / "trace", run_dir, resumed_at, cfg, ranks=2)
    # The resumed attempt read on from the checkpoint's step: its first window is step resumed_at + 1.
    after = trace_lines(tmp_path / "trace", pid=restart["pid"])[0]
    assert after[0]["step"] == resumed_at + 1
    # ... and retraced the uninterrupted run.
    ref, got = final_weights(ref_dir, total), final_weights(run_dir, total)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_a_run_continued_on_another_worker_count_restores_the_checkpoint_on_every_worker(
    data, tmp_path: Path
):
    trace = tmp_path / "trace"
    spe1, spe2 = steps_per_epoch(data, 1), steps_per_epoch(data, 2)
    stop = spe1 + 20  # 20 steps into epoch 1 on one worker: 20 x 32 windows of it read
    one = config(data, workers=1, max_steps=stop, trace=trace, eval_every=stop)  # one checkpoint: at stop
    fit_windows(one, data.vocab, data.train, data.val, storage=str(tmp_path), name="wc")
    assert_epoch_partitions_the_shard(data, trace_lines(trace), 0, workers=1)

    two = config(data, workers=2, max_steps=stop + 40, trace=trace)
    res = fit_windows(two, data.vocab, data.train, data.val, storage=str(tmp_path), name="wc")
    run_dir = Path(res.run_dir)
    restart = next(r for r in metrics_lines(run_dir) if r["restored_from_step"] >= 0)
    assert restart["restored_from_step"] == stop and restart["world_size"] == 2
    assert_restored_the_checkpoint(trace, run_dir, stop, one, ranks=2)
    # Two workers read 64 windows a step: 640 windows are 10 steps, rounded down to whole 4-window
    # segments: 8. Epoch 1 then has spe2 - 8 steps left, and both workers start at a segment.
    for rank in (0, 1):
        second = [x for x in trace_lines(trace)[rank] if x["step"] > stop]
        assert second[0]["step"] == stop + 1 and second[0]["epoch"] == 1 and second[0]["reset"]
        assert sum(1 for x in second if x["epoch"] == 1) == spe2 - 8
    assert max(r["step"] for r in metrics_lines(run_dir)) == stop + 40


@pytest.mark.slow
def test_a_killed_driver_rerun_resumes_the_checkpoint_state_and_ends_where_an_uninterrupted_run_ends(
    ray_session, tmp_path: Path
):
    """`raylstm train` in a subprocess with its own local Ray, killed (with its process group) after its
    first checkpoint; the same command again continues the run. Its result equals an uninterrupted run of
    the same config trained in this process."""
    sources = review_sources(n_reviews=400)
    trace = tmp_path / "trace"
    sets = {
        "data.dedupe": "false",
        "data.seq_len": "64",
        "data.segment_windows": "2",
        "data.shuffle_buffer": "256",
        "model.hidden_size": "96",
        "train.max_steps": "120",
        "train.eval_every": "40",
        "train.log_every": "10",
        "train.cpus_per_worker": "1.0",
        "train.sample_chars": "40",
        "train.keep_checkpoints": "10",
        "train.trace_dir": f'"{trace}"',
    }
    cmd = [sys.executable, "-m", "raylstm.cli", "train", "--config", str(ROOT / "configs" / "demo.toml")]
    cmd += ["--data", *sources, "--workers", "1", "--storage", str(tmp_path), "--name", "drv"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    run_dir = tmp_path / "drv"
    with open(tmp_path / "first.log", "w") as log:
        p = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
    assert first["step"] < 120
    n_before = len(metrics_lines(run_dir))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "best checkpoint:" in second.stdout
    lines = metrics_lines(run_dir)
    restart = next(r for r in lines[n_before:] if r["restored_from_step"] >= 0)
    resumed_at = restart["restored_from_step"]
    assert resumed_at >= first["step"] and restart["step"] == restart["attempt_first_step"] == resumed_at + 1

    from raylstm.config import load_config
    from raylstm.train import train

    cfg = load_config(ROOT / "configs" / "demo.toml", [f"{k}={v}" for k, v in sets.items()])
    cfg.data.sources, cfg.train.num_workers = sources, 1
    assert_restored_the_checkpoint(trace, run_dir, resumed_at, cfg, ranks=1)

    cfg.train.trace_dir = ""
    cfg.train.eval_every = 120  # the reference needs only its last checkpoint (evaluation trains nothing)
    ref = train(cfg, storage=str(tmp_path), name="ref")
    want, got = final_weights(Path(ref.run_dir), 120), final_weights(run_dir, 120)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
