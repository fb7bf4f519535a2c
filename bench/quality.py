"""The quality run: `configs/cpu-quality.toml` trained on the real Musical Instruments reviews with Ray
Train on this machine, then `raylstm.evaluate` on its held-out (test) split beside unigram, gzip, bz2, xz
and PPMd on the same text, plus samples at 0.2, 0.5, 1.0 and 1.2 from the best checkpoint.

The published reference figures (xz 2.10 and PPMd 1.79 bpc, "the last 10% of those reviews given the first
90%") are reproduced on the raw CSV text by `raylstm.evaluate.reference_figures`, reported beside ours.

`.venv/bin/python -m bench.quality [--quick]`   (--quick: 60 steps, to check the path, not the figure)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AMAZON_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"
CONFIG = ROOT / "configs" / "cpu-quality.toml"


def supervised_predictions(cfg: Any, steps: int) -> int:
    """Every optimizer step supervises batch x workers windows, at every position in full mode."""
    per_window = 1 if cfg.data.window_mode == "seed" else cfg.data.seq_len
    return steps * cfg.train.batch_size * cfg.train.num_workers * per_window


def run_quality(out_dir: Path, quick: bool = False, source: Path = AMAZON_CSV) -> dict[str, Any]:
    from raylstm.config import load_config
    from raylstm.evaluate import evaluate, reference_figures
    from raylstm.ray_env import ensure_ray
    from raylstm.train import read_metrics, train

    if not source.exists():
        raise FileNotFoundError(f"quality run needs the real reviews at {source} (../shared/data/amazon)")
    overrides = ["train.max_steps=60", "train.eval_every=30", "train.warmup_steps=10"] if quick else []
    cfg = load_config(CONFIG, overrides)
    cfg.data.sources = [str(source)]
    # Logical CPUs above the 2 physical ones: the worker's CPUs plus room for Ray Data's tasks (the
    # 2-core hang in RAY-NOTES); the worker still runs only round(cpus_per_worker) torch threads.
    ensure_ray(num_cpus=4, include_dashboard=False, log_to_driver=True)
    name = f"quality-{time.strftime('%Y%m%d-%H%M%S')}" + ("-quick" if quick else "")
    t0 = time.perf_counter()
    res = train(cfg, storage=str(Path(out_dir) / "runs"), name=name)
    train_s = time.perf_counter() - t0
    metrics = read_metrics(res.run_dir)
    last_step = max((int(m.get("step", 0)) for m in metrics), default=0)
    ev = evaluate(res.run_dir, cfg.data, "test")
    samples_txt = Path(res.run_dir) / "samples.txt"
    out = {
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "run_dir": res.run_dir,
        "train_wall_s": train_s,
        "steps": last_step,
        "supervised_predictions": supervised_predictions(cfg, last_step),
        "best_val_bpc": res.best_metrics.get("val_bpc"),
        "evaluation": ev,
        "samples": samples_txt.read_text() if samples_txt.exists() else "",
        "curve": [(m.get("time"), m.get("step"), m.get("val_bpc"), m.get("train_loss")) for m in metrics],
        "reference": reference_figures(source, names=["xz", "ppmd"]),
    }
    (Path(out_dir) / "quality.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def to_markdown(q: dict[str, Any], command: str) -> str:
    ev = q["evaluation"]
    m = ev["model"]
    b = ev["baselines"]
    lines = [
        "## Quality run: cpu-quality on the Musical Instruments reviews",
        "",
        f"`{q['config']}` {' '.join('--set ' + o for o in q['overrides'])}: {q['steps']:,} steps in "
        f"{q['train_wall_s'] / 60:.1f} min of `train()` wall time (Ray start, data, training, evals, samples), "
        f"{q['supervised_predictions']:,} supervised predictions. Best val bpc {q['best_val_bpc']:.4f}.",
        "",
        f"Held-out **test** split: {ev['chars']:,} chars in {ev['reviews']:,} reviews; compressors read the "
        f"{ev['train_context_chars']:,}-char training split first (conditional size).",
        "",
        "| method | setting | held-out bpc | vs model |",
        "|---|---|---:|---:|",
        f"| **raylstm cpu-quality** | step {m['step']} | **{m['bpc']:.3f}** | 1.00x |",
    ]
    for name, r in sorted(b.items(), key=lambda kv: kv[1]["bpc"]):
        lines.append(f"| {name} | {r['setting']} | {r['bpc']:.3f} | {r['bpc'] / m['bpc']:.2f}x |")
    ref = q["reference"]

    def verdict(name: str) -> str:
        d = b[name]["bpc"] - m["bpc"]
        if d > 0:
            return f"beats {name} ({b[name]['bpc']:.3f}) by {d:.3f} bpc"
        return f"is {-d:.3f} bpc worse than {name} ({b[name]['bpc']:.3f})"

    lines += [
        "",
        f"Verdict on the same held-out text: the model {verdict('xz')}; it {verdict('ppmd')}; "
        f"it {verdict('ppmd-o16')}.",
        "",
        "Reference figures reproduced on the raw CSV `reviewText` (last 10% of reviews given the first 90%, "
        f"file order): xz -9e **{ref['xz']:.3f}** (published 2.10), PPMd o6/16 MiB **{ref['ppmd']:.3f}** "
        "(published 1.79, which is what PPMd at these settings gives on the *whole* file: see the evaluation "
        "section). The table above uses the cleaned text and raylstm's held-out split (a stable hash of the "
        "review key), so its compressor figures differ slightly from these.",
        "",
        "Samples from the best checkpoint (prime, then 500 generated chars):",
        "",
        "```",
        q["samples"].strip(),
        "```",
        "",
        f"Rerun: `{command}`",
        "",
    ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    q = run_quality(out_dir, quick)
    return to_markdown(q, ".venv/bin/python -m bench.quality" + (" --quick" if quick else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 steps: checks the path, not the figure")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    md = run(Path(args.out), args.quick)
    (Path(args.out) / "quality.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
