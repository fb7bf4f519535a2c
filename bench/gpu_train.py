"""GPU training benchmark (one GPU, under 5 minutes on an H200): raw cuDNN LSTM vs the full Ray Train step.

At the amazon-gpu shapes (embed 128, 3 x 1024 LSTM, seq 256, batch 256 per GPU, bf16 autocast):
  1. cuDNN nn.LSTM forward + backward alone (no embedding, no softmax, no optimizer): the ceiling.
  2. The bare training step of raylstm's model (embedding, LSTM, softmax loss, clipping, AdamW), bf16
     autocast and fp32, on in-memory batches.
  3. The full pipeline: raylstm.train.fit_windows with 1 GPU worker (Ray Data shard -> iter_torch_batches
     -> the real train loop), steady-state chars/s from its metrics (start-up excluded).

    .venv/bin/python -m bench.gpu_train            # on a GPU machine (CUDA build of torch)
    .venv/bin/python -m bench.gpu_train --tiny     # CPU smoke test: tiny shapes, same code paths

Writes bench/out/gpu_train.md (or the --out path) and prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100  # a typical cased review vocabulary (~100 characters)


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(embed=8, hidden=32, layers=1, seq=16, batch=4, steps=2000, iters=5, device="cpu")
    return dict(embed=128, hidden=1024, layers=3, seq=256, batch=256, steps=300, iters=20, device="cuda")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def raw_lstm(s: dict, bf16: bool) -> float:
    """chars/s of nn.LSTM forward+backward alone (cuDNN on GPU), median of s['iters'] timed iterations."""
    import torch

    dev = s["device"]
    lstm = torch.nn.LSTM(s["embed"], s["hidden"], num_layers=s["layers"], batch_first=True).to(dev)
    x = torch.randn(s["batch"], s["seq"], s["embed"], device=dev, requires_grad=True)
    times = []
    for i in range(s["iters"] + 3):
        _sync(dev)
        t = time.perf_counter()
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16):
            out, _ = lstm(x)
        out.float().sum().backward()
        _sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return s["batch"] * s["seq"] / statistics.median(times)


def model_step(s: dict, precision: str) -> float:
    """chars/s of raylstm's full training step (model + loss + clip + AdamW) on in-memory batches."""
    import torch

    from raylstm.config import ModelConfig, TrainConfig
    from raylstm.model import build_model
    from raylstm.train_loop import autocast_for, loss_sum_and_count, make_optimizer

    dev = torch.device(s["device"])
    torch.manual_seed(0)
    model = (
        build_model(
            ModelConfig(
                vocab_size=VOCAB,
                embed_dim=s["embed"],
                hidden_size=s["hidden"],
                num_layers=s["layers"],
                dropout=0.1,
            )
        )
        .to(dev)
        .train()
    )
    opt = make_optimizer(model, TrainConfig())
    ids = torch.randint(1, VOCAB, (s["batch"], s["seq"] + 1), device=dev)
    times = []
    for i in range(s["iters"] + 3):
        _sync(s["device"])
        t = time.perf_counter()
        with autocast_for(dev, precision):
            loss_sum, n = loss_sum_and_count(model, ids, "full")
            loss = loss_sum / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        _sync(s["device"])
        if i >= 3:
            times.append(time.perf_counter() - t)
    return s["batch"] * s["seq"] / statistics.median(times)


def ray_step(s: dict, tiny: bool) -> dict:
    """Steady-state chars/s of fit_windows with one worker (GPU unless --tiny) on random review-sized ids."""
    import numpy as np
    import ray

    from raylstm.config import load_config
    from raylstm.train import fit_windows, read_metrics
    from raylstm.vocab import CharVocab

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            num_cpus=4 if tiny else None,
        )
    vocab = CharVocab([chr(c) for c in range(32, 32 + VOCAB - 1)])
    rng = np.random.default_rng(0)
    n_train = s["batch"] * (400 if tiny else 40)

    def make(n: int):
        ids = rng.integers(1, VOCAB, (n, s["seq"] + 1), dtype=np.int32)
        return ray.data.from_numpy(ids).rename_columns({"data": "ids"})

    cfg = load_config(
        ROOT / "configs" / "amazon-gpu.toml",
        [
            "train.num_workers=1",
            f"train.use_gpu={'false' if tiny else 'true'}",
            f"train.batch_size={s['batch']}",
            f"data.seq_len={s['seq']}",
            f"model.embed_dim={s['embed']}",
            f"model.hidden_size={s['hidden']}",
            f"model.num_layers={s['layers']}",
            f"train.max_steps={s['steps']}",
            f"train.eval_every={s['steps']}",
            "train.log_every=5",
            "train.sample_chars=0",
            "train.max_val_batches=2",
            "train.warmup_steps=10",
            "data.materialize=true",
            "train.max_failures=0",
            f"train.precision={'fp32' if tiny else 'bf16'}",
            "train.cpus_per_worker=1.0",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = fit_windows(cfg, vocab, make(n_train), make(s["batch"] * 2), storage=tmp, name="gpu-bench")
        wall = time.perf_counter() - t0
        reports = [r for r in read_metrics(res.run_dir) if r.get("val_bpc") is None]
    rows = reports[2:] or reports[1:]  # drop start-up and warm-up reports when there are enough
    if not rows:
        raise RuntimeError(f"{len(reports)} metrics reports: too few for a steady-state figure")
    return {
        "chars_per_s": statistics.median(r["chars_per_s"] for r in rows),
        "reports": len(rows),
        "wall_s": wall,
    }


def run(tiny: bool) -> str:
    import torch

    s = shapes(tiny)
    if tiny:
        torch.set_num_threads(1)  # tiny shapes: thread start-up costs more than the work
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_train: no CUDA device visible to torch (use --tiny for the CPU smoke test)")
    name = torch.cuda.get_device_name(0) if not tiny else "CPU (smoke test, tiny shapes)"
    rows = []

    def timed(label, fn):
        t = time.perf_counter()
        try:
            value = fn()
            rows.append((label, value, None))
        except Exception as e:  # reported in the table, not hidden
            rows.append((label, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        print(f"{label}: {rows[-1][1] or rows[-1][2]} ({time.perf_counter() - t:.0f} s)", flush=True)

    timed("cuDNN LSTM fwd+bwd, bf16 autocast", lambda: raw_lstm(s, bf16=not tiny))
    timed("cuDNN LSTM fwd+bwd, fp32", lambda: raw_lstm(s, bf16=False))
    timed("raylstm train step (bare loop), bf16", lambda: model_step(s, "fp32" if tiny else "bf16"))
    timed("raylstm train step (bare loop), fp32", lambda: model_step(s, "fp32"))
    ray_res = {}

    def ray_fn():
        ray_res.update(ray_step(s, tiny))
        return ray_res["chars_per_s"]

    timed("Ray Train + Data, 1 worker, full train loop", ray_fn)
    base = rows[0][1]
    lines = [
        "## GPU training: cuDNN LSTM vs the full Ray Train step",
        "",
        f"Device: {name}; torch {torch.__version__}. Shapes: embed {s['embed']}, {s['layers']} x {s['hidden']} LSTM, "
        f"seq {s['seq']}, batch {s['batch']}, vocabulary {VOCAB}. Medians of {s['iters']} timed iterations "
        f"after 3 warm-up ones; the Ray row is the median of its steady-state chars/s reports.",
        "",
        "| measurement | chars/s | vs raw cuDNN bf16 |",
        "|---|---:|---:|",
    ]
    for label, value, err in rows:
        if value is None:
            lines.append(f"| {label} | failed: {err} | |")
        else:
            ratio = f"{value / base:.2f}" if base else ""
            lines.append(f"| {label} | {value:,.0f} | {ratio} |")
    if ray_res:
        lines += [
            "",
            f"Ray run: {ray_res['reports']} steady-state reports, fit() wall time {ray_res['wall_s']:.0f} s "
            f"for {s['steps']} steps (includes start-up).",
        ]
    lines += ["", f"Rerun: `.venv/bin/python -m bench.gpu_train{' --tiny' if tiny else ''}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny shapes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_train.md"))
    args = ap.parse_args()
    md = run(args.tiny)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    print(md)
    sys.exit(0)
