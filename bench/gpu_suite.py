"""The GPU-relevant part of the benchmark suite, for one GPU (sized for an H200 in under 8 minutes),
writing the same report format as bench/run_all.py to bench/REPORT-gpu.md.

    .venv/bin/python -m bench.gpu_suite            # on a GPU machine (CUDA build of torch)
    .venv/bin/python -m bench.gpu_suite --tiny     # CPU smoke test of every section: tiny shapes, seconds

Sections (each timed, each failure reported with its error, none hidden):
  1. LSTM kernels: cuDNN nn.LSTM forward+backward alone vs a full training step of the model (embedding,
     LSTM, softmax loss, AdamW) at the seed, default and amazon-gpu shapes, bf16 autocast; median of 5.
  2. Peer: Keras 3 (torch backend, on the GPU) vs raylstm seed and default presets, same text, same wall
     time, held-out bpc (bench.peer_keras.compare).
  3. Quality on GPU: the amazon-gpu model (3x1024) trained for a fixed time on the Musical Instruments
     reviews, held-out bpc beside unigram/gzip/bz2/xz/PPMd on the same text.
  4. bench/gpu_train.py: raw cuDNN LSTM vs the bare step vs the full Ray Train step (1 GPU worker) at the
     amazon-gpu shapes (the training issue's GPU benchmark, run here as part of the suite).
Plus any bench_*.py module that defines `run_gpu(out_dir, quick) -> str`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = ".venv/bin/python"


class Plan:
    """Sizes for a GPU run and for the CPU smoke test (--tiny)."""

    def __init__(self, tiny: bool) -> None:
        import torch

        self.tiny = tiny
        self.device = "cpu" if tiny else "cuda"
        if not tiny and not torch.cuda.is_available():
            raise SystemExit("gpu_suite: no CUDA device visible to torch (use --tiny for the CPU smoke test)")
        # (label, hidden, layers, seq, batch, embed)
        self.shapes = (
            [("tiny", 32, 1, 16, 4, 8)]
            if tiny
            else [
                ("seed 1x128", 128, 1, 40, 128, 128),
                ("default 2x512", 512, 2, 128, 64, 64),
                ("default 2x512, batch 512", 512, 2, 128, 512, 64),
            ]  # amazon-gpu shapes: gpu_train
        )
        self.kernel_iters = 2 if tiny else 10
        self.peer_seconds = 2.0 if tiny else 25.0
        self.peer_eval_chars = 2_000 if tiny else 100_000
        self.quality_seconds = 3.0 if tiny else 60.0
        # The amazon-gpu preset, shrunk for the smoke test; warmup scaled to a 100-second run.
        self.gpu_overrides = (
            [
                "model.hidden_size=32",
                "model.num_layers=1",
                "model.embed_dim=8",
                "data.seq_len=32",
                "train.batch_size=8",
                "train.warmup_steps=2",
            ]
            if tiny
            else ["train.warmup_steps=50"]
        )


# --- 1. kernels -----------------------------------------------------------------------------------------
def _time(fn: Callable[[], None], iters: int, device: str) -> float:
    import torch

    fn()  # warm-up (cuDNN plans, allocator)
    reps = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        reps.append((time.perf_counter() - t0) / iters)
    return statistics.median(reps)


def kernels(plan: Plan, out_dir: Path) -> str:
    import torch

    from raylstm.config import ModelConfig
    from raylstm.model import CharLSTM

    dev, V = plan.device, 100
    rows, data = [], {}
    for label, H, L, T, B, E in plan.shapes:
        model = CharLSTM(ModelConfig(vocab_size=V, embed_dim=E, hidden_size=H, num_layers=L, dropout=0.0)).to(
            dev
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
        ids = torch.randint(0, V, (B, T + 1), device=dev)
        emb = torch.randn(B, T, E, device=dev, requires_grad=True)
        autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")

        def lstm_only(model=model, emb=emb, autocast=autocast) -> None:
            with autocast:
                out, _ = model.lstm(emb)
            out.float().sum().backward()

        def full_step(model=model, ids=ids, opt=opt, autocast=autocast) -> None:
            with autocast:
                logits, _ = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, V).float(), ids[:, 1:].reshape(-1)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        t_lstm = _time(lstm_only, plan.kernel_iters, dev)
        t_full = _time(full_step, plan.kernel_iters, dev)
        cps_lstm, cps_full = B * T / t_lstm, B * T / t_full
        data[label] = {"lstm_fwd_bwd_chars_per_s": cps_lstm, "full_step_chars_per_s": cps_full}
        rows.append(
            f"| {label} | {H}x{L} | {T} | {B} | {cps_lstm:,.0f} | {cps_full:,.0f} | {cps_full / cps_lstm:.2f} |"
        )
        del model, opt
    (out_dir / "gpu_kernels.json").write_text(
        json.dumps(
            {
                "throughput": {f"{k} full step": v["full_step_chars_per_s"] for k, v in data.items()},
                "rows": data,
            },
            indent=2,
        )
    )
    return "\n".join(
        [
            f"## LSTM kernels on {dev}: cuDNN LSTM forward+backward vs a full training step",
            "",
            f"bf16 autocast on CUDA; median of 5 repetitions of {plan.kernel_iters} iterations; chars = batch x seq.",
            "",
            "| shape | hidden x layers | seq | batch | nn.LSTM fwd+bwd chars/s | full step chars/s | full / LSTM |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )


# --- 2. peer ----------------------------------------------------------------------------------------------
def _text(plan: Plan):
    from bench.peer_keras import load_text

    if not hasattr(plan, "_peer_text"):
        plan._peer_text = load_text(quick=plan.tiny)
    return plan._peer_text


def peer(plan: Plan, out_dir: Path) -> str:
    from bench.peer_keras import compare, to_markdown

    res = compare(_text(plan), plan.peer_seconds, plan.peer_eval_chars, device=plan.device)
    (out_dir / "peer.json").write_text(json.dumps(res, indent=2, default=str))
    md = to_markdown(res, f"{PY} -m bench.gpu_suite" + (" --tiny" if plan.tiny else ""))
    return md.replace("## Peer:", f"## Peer on {plan.device}:", 1)


# --- 3. quality on the GPU (bare loop) --------------------------------------------------------------------
def quality(plan: Plan, out_dir: Path) -> str:
    from bench.peer_keras import train_torch
    from raylstm.evaluate import baselines, join_reviews, score_reviews

    text = _text(plan)
    r = train_torch(
        "amazon-gpu", text, plan.quality_seconds, device=plan.device, overrides=plan.gpu_overrides
    )
    test = text.test_reviews if not plan.tiny else text.test_reviews[:20]
    t0 = time.perf_counter()
    bits, chars, _ = score_reviews(r["model"], text.vocab, test, device=plan.device)
    score_s = time.perf_counter() - t0
    held = join_reviews(test)
    base = baselines(held, join_reviews(text.train_reviews))
    plan.bare_chars_per_s = r["preds"] / r["seconds"]
    bpc = bits / chars
    precision = "bf16 autocast" if plan.device == "cuda" else "fp32"
    rows = [
        f"| **amazon-gpu model, {r['seconds']:.0f} s** | bare loop, {precision} | **{bpc:.3f}** | 1.00x |"
    ]
    rows += [
        f"| {n} | {b['setting']} | {b['bpc']:.3f} | {b['bpc'] / bpc:.2f}x |"
        for n, b in sorted(base.items(), key=lambda kv: kv[1]["bpc"])
    ]
    (out_dir / "gpu_quality.json").write_text(
        json.dumps(
            {
                "bpc": bpc,
                "chars": chars,
                "train": {k: v for k, v in r.items() if k not in ("model", "config")},
                "baselines": base,
                "score_seconds": score_s,
            },
            indent=2,
            default=str,
        )
    )
    return "\n".join(
        [
            f"## Quality on {plan.device}: the amazon-gpu model for {plan.quality_seconds:.0f} s",
            "",
            f"{' '.join('--set ' + o for o in plan.gpu_overrides)}; {r['preds']:,} supervised predictions "
            f"({plan.bare_chars_per_s:,.0f}/s) on {len(text.train_ids):,} training chars; held-out: {chars:,} chars "
            f"of the test split ({len(test)} reviews), scored in {score_s:.1f} s; compressors read the training split first.",
            "",
            "| method | setting | held-out bpc | vs model |",
            "|---|---|---:|---:|",
            *rows,
            "",
        ]
    )


# --- 4. the training benchmark of bench/gpu_train.py (raw cuDNN vs the full Ray Train step) -----------------
def gpu_train(plan: Plan, out_dir: Path) -> str:
    from bench.gpu_train import run

    return run(plan.tiny)


# Cheapest first; a section that would start past --budget-s is reported as skipped, not run.
SECTIONS: list[tuple[str, Callable[[Plan, Path], str]]] = [
    ("kernels", kernels),
    ("gpu_train", gpu_train),
    ("quality", quality),
    ("peer", peer),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: tiny shapes, a few seconds per section"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="skip (and report) sections that would start after this many seconds",
    )
    ap.add_argument("--only", nargs="*", help="run only these sections: " + ", ".join(n for n, _ in SECTIONS))
    ap.add_argument(
        "--out", default=None, help="raw outputs (default bench/out/gpu, --tiny: bench/out/gpu-tiny)"
    )
    ap.add_argument(
        "--report", default=None, help="default bench/REPORT-gpu.md (--tiny: <out>/REPORT-gpu-tiny.md)"
    )
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    from bench.run_all import machine, plot_learning_curves, plot_throughput, write_report

    out_dir = Path(args.out or BENCH / "out" / ("gpu-tiny" if args.tiny else "gpu")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Path(
        args.report or (out_dir / "REPORT-gpu-tiny.md" if args.tiny else BENCH / "REPORT-gpu.md")
    ).resolve()
    plan = Plan(args.tiny)
    info = machine()
    command = f"{PY} -m bench.gpu_suite" + (" --tiny" if args.tiny else "")
    sections = [(n, f) for n, f in SECTIONS if not args.only or n in args.only]
    for name in sorted(p.stem for p in BENCH.glob("bench_*.py")):  # other areas' GPU parts, if any
        try:
            mod = importlib.import_module(f"bench.{name}")
        except Exception:
            continue  # an import failure is run_all's to report; here we only look for run_gpu
        if hasattr(mod, "run_gpu") and (not args.only or name in args.only):
            sections.append((name, lambda p, o, m=mod: m.run_gpu(o, p.tiny)))
    results, t_all = [], time.perf_counter()
    for name, fn in sections:
        if time.perf_counter() - t_all > args.budget_s:
            results.append(
                {
                    "name": name,
                    "status": "skipped",
                    "seconds": 0.0,
                    "markdown": "",
                    "error": f"not started: {args.budget_s:.0f} s budget spent",
                    "command": command + f" --only {name}",
                }
            )
            continue
        print(f"[gpu] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            md, status, err = fn(plan, out_dir), "ok", ""
        except Exception:
            md, status, err = "", "failed", traceback.format_exc()
            print(err, flush=True)
        secs = time.perf_counter() - t0
        print(
            f"[gpu] {name}: {status} in {secs:.0f} s (total {time.perf_counter() - t_all:.0f} s)", flush=True
        )
        results.append(
            {
                "name": name,
                "status": status,
                "seconds": secs,
                "error": err,
                "markdown": md,
                "command": command + f" --only {name}",
            }
        )
    plots = [
        p
        for p in (
            plot_learning_curves(out_dir, out_dir / "gpu_learning_curves.png"),
            plot_throughput(out_dir, out_dir / "gpu_throughput.png"),
        )
        if p is not None
    ]
    write_report(
        results, info, [], out_dir, report, plots, invocation=command, title="raylstm GPU benchmark report"
    )
    print(f"[gpu] wrote {report} in {time.perf_counter() - t_all:.0f} s")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
