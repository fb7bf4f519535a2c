"""Conditioning on rating and category: the figures of docs/conditioning.md and REPORT.md's section.

    train   configs/cpu-conditioned.toml on the Musical Instruments + Blitzer reviews, twice, each in its
            own process and 20-minute budget: conditioned (rating, category) and the same preset with
            --set model.conditions=[]; held-out (test) bpc of both by raylstm.evaluate.
    eval    on the conditioned run's test split: rating by Bayes' rule (5-way, and positive 4-5 vs
            negative 1-2) beside the majority class and TF-IDF + logistic regression fit on the training
            split (accuracy, macro-F1); category by Bayes' rule; 200 samples at 1 star and 200 at 5 stars
            judged by an independent TF-IDF + LR sentiment classifier fit on the real training reviews;
            the linear probe and the single sentiment unit on the Blitzer and amazon_cells held-out labels
            beside TF-IDF + LR; samples at 1, 3 and 5 stars and steered ones.

    .venv/bin/python -m bench.conditioning                  # both stages (~50 min on 2 cores)
    .venv/bin/python -m bench.conditioning --stage train    # the two runs only
    .venv/bin/python -m bench.conditioning --stage eval     # the figures, from the runs already there
    .venv/bin/python -m bench.conditioning --quick          # tiny runs: checks the path, not the figures

Each training run starts in a fresh process, so its wall time includes Ray start and prepare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AMAZON = ROOT.parent / "shared" / "data" / "amazon"
SOURCES = [
    str(AMAZON / "Musical_instruments_reviews.csv.gz"),
    str(AMAZON / "sorted_data_acl" / "*" / "*.review.gz"),
]
CONFIG = ROOT / "configs" / "cpu-conditioned.toml"
RUNS = {"conditioned": [], "unconditioned": ["model.conditions=[]"]}
QUICK = ["train.max_steps=40", "train.eval_every=20", "train.warmup_steps=5", "train.sample_chars=50"]
BUDGET_S = 20 * 60


def out_paths(out_dir: Path) -> tuple[Path, Path]:
    base = Path(out_dir) / "conditioning"
    return base, base / "runs"


# --- stage 1: the two training runs ----------------------------------------------------------------------
def train_one(name: str, out_dir: Path, quick: bool, steps: int | None = None) -> dict[str, Any]:
    """One run in this process (called by `--one-run NAME`): train, then held-out bpc."""
    t0 = time.perf_counter()
    from raylstm.config import load_config
    from raylstm.evaluate import evaluate
    from raylstm.ray_env import ensure_ray
    from raylstm.train import read_metrics, train

    base, runs = out_paths(out_dir)
    overrides = RUNS[name] + (QUICK if quick else [])
    if steps:  # a shorter pair (development): not the 20-minute figures
        overrides += [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 2)}"]
    cfg = load_config(CONFIG, overrides)
    cfg.data.sources = list(SOURCES)
    shutil.rmtree(runs / name, ignore_errors=True)  # a run name that exists would be continued
    ensure_ray(num_cpus=4, include_dashboard=False, log_to_driver=True)
    res = train(cfg, storage=str(runs), name=name)
    wall = time.perf_counter() - t0
    metrics = read_metrics(res.run_dir)
    ev = evaluate(res.run_dir, split="test", compressors=False)
    out = {
        "name": name,
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "sources": SOURCES,
        "run_dir": res.run_dir,
        "best_checkpoint": res.best_checkpoint,
        "wall_s": wall,  # process start to the end of train(): Ray, prepare, training, evals, samples
        "steps": max((int(m.get("step", 0)) for m in metrics), default=0),
        "best_val_bpc": res.best_metrics.get("val_bpc"),
        "test_bpc": ev["model"]["bpc"],
        "test_chars": ev["model"]["chars"],
        "test_reviews": ev["model"]["reviews"],
    }
    base.mkdir(parents=True, exist_ok=True)
    (base / f"run-{name}.json").write_text(json.dumps(out, indent=2))
    return out


def train_stage(out_dir: Path, quick: bool, steps: int | None = None) -> dict[str, Any]:
    results = {}
    for name in RUNS:
        cmd = [sys.executable, "-m", "bench.conditioning", "--one-run", name, "--out", str(out_dir)]
        cmd += ["--quick"] if quick else []
        cmd += ["--steps", str(steps)] if steps else []
        print(f"[conditioning] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        base, _ = out_paths(out_dir)
        results[name] = json.loads((base / f"run-{name}.json").read_text())
    return results


# --- stage 2: the figures -----------------------------------------------------------------------------
def run(out_dir: Path, quick: bool = False) -> str:
    """run_all's entry: both stages, then the Markdown section."""
    train_stage(out_dir, quick)
    from bench.conditioning_eval import eval_stage, to_markdown

    figures = eval_stage(out_dir, quick)
    return to_markdown(figures, ".venv/bin/python -m bench.conditioning" + (" --quick" if quick else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["all", "train", "eval"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny runs: check the path, not the figures")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument(
        "--steps", type=int, help="train.max_steps of both runs (a shorter pair, for development)"
    )
    ap.add_argument("--one-run", choices=list(RUNS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.one_run:
        print(json.dumps(train_one(args.one_run, out, args.quick, args.steps), indent=2))
        return
    if args.stage in ("all", "train"):
        train_stage(out, args.quick, args.steps)
    if args.stage in ("all", "eval"):
        from bench.conditioning_eval import eval_stage, to_markdown

        md = to_markdown(eval_stage(out, args.quick), "python -m bench.conditioning")
        base, _ = out_paths(out)
        (base / "conditioning.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
