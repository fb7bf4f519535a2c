"""Training benchmark: the full Ray Train + Ray Data pipeline vs a bare PyTorch loop, full-sequence vs
seed-window supervision, and 2 workers vs 1.

1. Pipeline overhead: `fit_windows` with 1 worker (Ray Data shard -> iter_torch_batches -> the real
   train loop with metrics and checkpoints) vs a bare loop over the same windows held in memory, same
   model, same batch, same thread count (1). Steady state: the median of the workers' chars/s reports
   after the first two (start-up and warm-up excluded); the bare loop's median over the same number of
   timed blocks after warm-up, run before and after the Ray run and averaged. Goal: ratio >= 0.95.
2. Supervision: supervised predictions per second training the seed model (Embedding 128 -> LSTM 128
   -> Dense 256) on full 128-char windows (a prediction at every position) vs the original's 40-char
   windows (one prediction each). Bare loops, same model, same thread count.
3. Scaling: total chars/s of 2 workers vs 1 on this machine (2 cores: both workers share them).

Rerun: `.venv/bin/python -m bench.bench_train` (quick: `--quick`).
"""

from __future__ import annotations

import csv
import gzip
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MI_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"
THREADS = 1


def _sources(tmp: Path, n_reviews: int) -> tuple[list[str], str]:
    """First n reviews of the shared Musical Instruments CSV (read, written to tmp), else the demo corpus."""
    if not MI_CSV.exists():
        return [], "bundled demo corpus"
    out = tmp / "reviews.csv"
    with gzip.open(MI_CSV, "rt", newline="") as f, open(out, "w", newline="") as g:
        reader, writer = csv.reader(f), csv.writer(g)
        for i, row in enumerate(reader):
            writer.writerow(row)
            if i >= n_reviews:
                break
    return [str(out)], f"first {n_reviews} reviews of Musical_instruments_reviews.csv.gz"


def _config(workers: int, steps: int):
    from raylstm.config import load_config

    return load_config(
        ROOT / "configs" / "demo.toml",
        [
            "data.dedupe=false",
            "data.seq_len=128",
            "model.hidden_size=192",
            "model.num_layers=1",
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={THREADS}.0",
            "train.batch_size=32",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            "train.log_every=5",
            "train.sample_chars=0",
            "train.max_val_batches=4",
            "train.max_failures=0",
        ],
    )


def ray_pipeline(windows, vocab, workers: int, steps: int, storage: str) -> dict:
    """Steady-state chars/s per worker and total from a real fit's metrics (first two reports dropped)."""
    from raylstm.train import fit_windows, read_metrics

    cfg = _config(workers, steps)
    train_ds, val_ds = windows
    t0 = time.perf_counter()
    res = fit_windows(cfg, vocab, train_ds, val_ds, storage=storage, name=f"bench-{workers}w-{int(t0)}")
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(res.run_dir) if r.get("val_bpc") is None][2:]
    if not rows:
        raise RuntimeError("too few metrics reports for a steady-state figure: raise the step count")
    return {
        "per_worker": statistics.median(r["chars_per_s"] for r in rows),
        "total": statistics.median(r["chars_per_s_total"] for r in rows),
        "reports": len(rows),
        "wall_s": wall,
        "steps": steps,
    }


def bare_loop(ids, vocab_size: int, steps: int, blocks: int) -> float:
    """The same model/optimizer/schedule/clipping on in-memory batches; median chars/s over timed blocks."""
    import torch

    from raylstm.model import build_model
    from raylstm.train_loop import loss_sum_and_count, make_optimizer, make_scheduler

    torch.set_num_threads(THREADS)
    cfg = _config(1, steps)
    cfg.model.vocab_size = vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train, steps)
    B = cfg.train.batch_size
    n = ids.shape[0] // B
    per_block = max(1, steps // (blocks + 1))
    rates, t, chars, step = [], time.perf_counter(), 0, 0
    while step < steps:
        batch = torch.as_tensor(ids[(step % n) * B : (step % n + 1) * B], dtype=torch.long)
        s, c = loss_sum_and_count(model, batch, "full")
        loss = s / c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        loss.item()
        step += 1
        chars += batch.shape[0] * (batch.shape[1] - 1)
        if step % per_block == 0:
            now = time.perf_counter()
            if step > per_block:  # first block is warm-up
                rates.append(chars / (now - t))
            t, chars = now, 0
    return statistics.median(rates)


def supervision(text_ids, vocab_size: int, seconds: float) -> dict:
    """Predictions/s of the seed model: full 128-char windows vs 40-char seed windows (one prediction)."""
    import numpy as np
    import torch

    from raylstm.config import ModelConfig, TrainConfig
    from raylstm.model import build_model
    from raylstm.train_loop import loss_sum_and_count, make_optimizer

    torch.set_num_threads(THREADS)
    out = {}
    for mode, width, stride, batch in (("full", 129, 128, 32), ("seed", 41, 3, 128)):
        windows = np.lib.stride_tricks.sliding_window_view(text_ids, width)[::stride]
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(
                kind="seed",
                vocab_size=vocab_size,
                embed_dim=128,
                hidden_size=128,
                num_layers=1,
                dropout=0.5,
                seed_dense=256,
            )
        ).train()
        opt = make_optimizer(model, TrainConfig(optimizer="rmsprop", lr=1e-3))
        preds, i, t0, warm = 0, 0, None, 3
        while True:
            b = torch.tensor(windows[(i * batch) % (len(windows) - batch) :][:batch], dtype=torch.long)
            s, n = loss_sum_and_count(model, b, mode)
            opt.zero_grad(set_to_none=True)
            (s / n).backward()
            opt.step()
            i += 1
            if i == warm:
                t0 = time.perf_counter()
            elif i > warm:
                preds += n
                if time.perf_counter() - t0 >= seconds:
                    break
        out[mode] = preds / (time.perf_counter() - t0)
    return out


def _allreduce_worker(rank: int, store_path: str, n: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    t = torch.zeros(2)
    for _ in range(20):  # warm-up
        dist.all_reduce(t)
    t0 = time.perf_counter()
    for _ in range(n):
        loss = torch.tensor(1.0)
        t = torch.stack([loss, torch.tensor(0.0)])
        dist.all_reduce(t)
        t.tolist()
    if rank == 0:
        Path(out).write_text(str((time.perf_counter() - t0) / n))
    dist.destroy_process_group()


def step_overheads(n: int = 2000) -> dict:
    """What the loop adds to every step beyond the step itself: the per-step dropout seed
    (`step_seed` + torch.manual_seed) and `agree_on_step`'s all-reduce of [loss, report flag] between 2
    gloo processes on this machine (the workers' case). Seconds per step, each."""
    import torch
    import torch.multiprocessing as mp

    from raylstm.train_loop import step_seed

    t0 = time.perf_counter()
    for i in range(n):
        torch.manual_seed(step_seed(1337, i, 0))
    seed_s = (time.perf_counter() - t0) / n
    tmp = Path(tempfile.mkdtemp(prefix="bench-ar-"))
    mp.start_processes(
        _allreduce_worker, args=(str(tmp / "store"), n, str(tmp / "out")), nprocs=2, start_method="spawn"
    )
    return {"seed_s": seed_s, "allreduce_s": float((tmp / "out").read_text())}


def run(out_dir: Path, quick: bool = False) -> str:
    import ray

    from raylstm.config import DataConfig
    from raylstm.data import load_splits, window_dataset

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out_dir.mkdir(parents=True, exist_ok=True)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            object_store_memory=512 * 1024**2,
        )
    # Steps per Ray run (1 worker, 2 workers) and per bare-loop run: enough for >= 4 steady-state reports
    # (reports come every ~2 s) while each fit() stays around a minute on 2 cores, start-up included.
    steps, steps_two, steps_bare = (100, 80, 40) if quick else (200, 120, 70)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        sources, what = _sources(tmp, 1500)
        dcfg = DataConfig(sources=sources, dedupe=False, seq_len=128)
        splits = load_splits(dcfg)
        train_ds = window_dataset(splits.train, splits.vocab, dcfg).materialize()
        val_ds = window_dataset(splits.val, splits.vocab, dcfg).materialize()
        import numpy as np

        ids = np.stack([r["ids"] for r in train_ds.take_all()])
        vocab = splits.vocab
        # The bare loop runs before and after the Ray run and the two are averaged, so a change in load
        # on a shared machine during the benchmark does not favour either side.
        bare_before = bare_loop(ids, len(vocab), steps_bare, blocks=6)
        one = ray_pipeline((train_ds, val_ds), vocab, 1, steps, str(tmp / "runs"))
        bare_after = bare_loop(ids, len(vocab), steps_bare, blocks=6)
        bare = (bare_before + bare_after) / 2
        two = ray_pipeline((train_ds, val_ds), vocab, 2, steps_two, str(tmp / "runs"))
        sup = supervision(ids[:, :-1].reshape(-1), len(vocab), seconds=3.0 if quick else 6.0)
        over = step_overheads(500 if quick else 2000)
    finally:
        if own_ray:
            ray.shutdown()
    ratio = one["per_worker"] / bare
    lines = [
        "## Training (Ray Train + Ray Data vs bare PyTorch)",
        "",
        f"Data: {what}, {ids.shape[0]:,} training windows of 128 chars. Model: the demo preset's LSTM "
        f"(embed 32, 1x192), batch 32, AdamW, warmup+cosine, clipping; {THREADS} torch thread per worker; "
        f"{steps} steps (1 worker) and {steps_two} steps (2 workers) per Ray run. Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {sys.version.split()[0]}.",
        "",
        "| measurement | chars/s | ratio |",
        "|---|---:|---:|",
        f"| bare PyTorch loop, in-memory batches (median of timed blocks; before {bare_before:,.0f}, after "
        f"{bare_after:,.0f}) | {bare:,.0f} | 1.00 |",
        f"| Ray Train + Data, 1 worker (median of {one['reports']} steady-state reports) | {one['per_worker']:,.0f} "
        f"| **{ratio:.2f}** (goal >= 0.95) |",
        f"| Ray Train + Data, 2 workers, total (per worker {two['per_worker']:,.0f}) | {two['total']:,.0f} "
        f"| {two['total'] / one['total']:.2f} x 1 worker |",
        "",
        f"Wall time of each `fit()` including Ray Train start-up, evaluation and checkpoints: 1 worker "
        f"{one['wall_s']:.0f} s for {steps} steps, 2 workers {two['wall_s']:.0f} s for {steps_two} steps (start-up is excluded from "
        "the chars/s figures above).",
        "",
        "| supervision (seed model: Embedding 128 -> LSTM 128 -> Dense 256, RMSprop) | predictions/s | ratio |",
        "|---|---:|---:|",
        f"| seed: 40-char windows every 3 chars, one prediction each (batch 128) | {sup['seed']:,.0f} | 1.0 |",
        f"| full: 128-char windows, a prediction at every position (batch 32) | {sup['full']:,.0f} "
        f"| **{sup['full'] / sup['seed']:.1f}x** |",
        "",
        f"Per-step additions of the loop (measured here, one thread each): the dropout seed of the step "
        f"(`step_seed` + `torch.manual_seed`) {over['seed_s'] * 1e6:.0f} us; `agree_on_step`'s all-reduce of "
        f"[loss, report flag] between 2 gloo processes {over['allreduce_s'] * 1e6:.0f} us (2 workers only), "
        f"against a step of the model above at batch 32 of {32 * 128 / one['per_worker'] * 1e3:.0f} ms: "
        f"{(over['seed_s'] + over['allreduce_s']) / (32 * 128 / one['per_worker']) * 100:.2f}% of it.",
        "",
        "The workers' chars/s covers training steps, data loading and metrics reports; evaluation and "
        "checkpoint pauses are excluded (the run's only evaluation is its last step) and show in the wall "
        "times. On 2 cores, 2 workers share the same cores as 1 worker's thread plus Ray Data.",
        "",
        "Rerun: `.venv/bin/python -m bench.bench_train` (`--quick` for a shorter run).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    out = ROOT / "bench" / "out"
    md = run(out, quick=quick)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.md").write_text(md)
    print(md)
