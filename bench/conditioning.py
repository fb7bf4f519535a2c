"""Conditioning on rating and category: the figures of docs/conditioning.md and REPORT.md's section.

    train   configs/cpu-conditioned.toml (the Musical Instruments reviews plus the Blitzer reviews, with
            their ratings and categories; cpu-quality's model and 20-minute schedule) and its twin, "the
            same model without conditions": the same preset with --set 'model.conditions=[]'. Each in its
            own process (its wall time includes Ray start and prepare); `--run NAME` trains one of them,
            so each 20-minute run can be its own CPU-lock hold.
    heldout both models on the same held-out text: the whole test split (MI + Blitzer) and the Musical
            Instruments test reviews alone; the conditioned model reads each review with its own rating
            and category.
    eval    on the test split: rating by Bayes' rule (5-way, and positive 4-5 vs negative 1-2) beside the
            majority class and TF-IDF + logistic regression fit on the training split (accuracy,
            macro-F1); category by Bayes' rule; 200 samples at 1 star and 200 at 5 stars judged by an
            independent TF-IDF + LR sentiment classifier fit on the real training reviews; the linear
            probe and the single sentiment unit on the Blitzer and amazon_cells held-out labels beside
            TF-IDF + LR; samples at 1, 3 and 5 stars and steered ones.

    .venv/bin/python -m bench.conditioning --out DIR                      # everything (~45 min on 2 cores)
    .venv/bin/python -m bench.conditioning --out DIR --stage train --run unconditioned   # one run (~20 min)
    .venv/bin/python -m bench.conditioning --out DIR --stage train --run conditioned     # the other
    .venv/bin/python -m bench.conditioning --out DIR --stage eval         # the figures, from both runs
    .venv/bin/python -m bench.conditioning --out DIR --stage guided --guidance 0 1 2 4   # guided sampling
    .venv/bin/python -m bench.conditioning --out DIR --stage guided --confirm --guidance 8 16 32  # fixed T, w
    .venv/bin/python -m bench.conditioning --out DIR --stage report       # the Markdown again, no Ray
    .venv/bin/python -m bench.conditioning --quick                        # tiny runs: the path, not figures

Give --out a directory outside the repository: the runs and checkpoints are generated data.
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
MI_CSV = AMAZON / "Musical_instruments_reviews.csv.gz"
CONFIG = ROOT / "configs" / "cpu-conditioned.toml"
RUNS = {"conditioned": [], "unconditioned": ["model.conditions=[]"]}
# eval_every must be a multiple of data.segment_windows (64): two evaluations of the whole val split
QUICK = ["train.max_steps=128", "train.eval_every=64", "train.warmup_steps=5", "train.sample_chars=50"]
BUDGET_S = 20 * 60


def out_paths(out_dir: Path) -> tuple[Path, Path]:
    base = Path(out_dir) / "conditioning"
    return base, base / "runs"


def conditioned_config(overrides: list[str]) -> Any:
    """The preset, its relative sources resolved against the repository root (it names ../shared/...)."""
    from raylstm.config import load_config

    cfg = load_config(CONFIG, overrides)
    cfg.data.sources = [s if "://" in s or Path(s).is_absolute() else str(ROOT / s) for s in cfg.data.sources]
    return cfg


# --- stage 1: the training run(s) ------------------------------------------------------------------------
def train_one(name: str, out_dir: Path, quick: bool, steps: int | None = None) -> dict[str, Any]:
    """One run in this process (called by `--one-run NAME`)."""
    t0 = time.perf_counter()
    from raylstm.ray_env import ensure_ray
    from raylstm.train import read_metrics, train

    base, runs = out_paths(out_dir)
    overrides = RUNS[name] + (QUICK if quick else [])
    if steps:  # a shorter run (when the lock time is short; or development)
        overrides += [f"train.max_steps={steps}"]
        every = conditioned_config(overrides).train.eval_every
        if steps < 3 * every:  # still evaluate (and checkpoint) 3 times, at multiples of segment_windows
            overrides += [f"train.eval_every={max(64, steps // 3 // 64 * 64)}"]
    cfg = conditioned_config(overrides)
    shutil.rmtree(runs / name, ignore_errors=True)  # a run name that exists would be continued
    t_ray = time.time()
    ensure_ray(num_cpus=4, include_dashboard=False, log_to_driver=True)
    res = train(cfg, storage=str(runs), name=name)
    wall = time.perf_counter() - t0
    metrics = read_metrics(res.run_dir)
    best_name = Path(res.best_checkpoint).name
    best_line = next(m for m in metrics if m.get("checkpoint") == best_name)
    out = {
        "name": name,
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "sources": cfg.data.sources,
        "run_dir": res.run_dir,
        "best_checkpoint": res.best_checkpoint,
        "wall_s": wall,  # process start to the end of train(): Ray, prepare, training, evals, samples
        "ray_start_to_best_s": best_line["time"] - t_ray,  # the 20-minute budget's measure
        "best_step": int(best_line["step"]),
        "steps": max((int(m.get("step", 0)) for m in metrics), default=0),
        "best_val_bpc": res.best_metrics.get("val_bpc"),
        "chars_per_s_per_worker": [m["chars_per_s"] for m in metrics if m.get("chars_per_s")],
    }
    base.mkdir(parents=True, exist_ok=True)
    (base / f"run-{name}.json").write_text(json.dumps(out, indent=2))
    return out


def register_run(out_dir: Path, name: str, run_dir: Path, started: float | None) -> dict[str, Any]:
    """run-NAME.json for a run stopped at its deadline (the lock's end) before max_steps: its best
    checkpoint so far (best.json is written at every evaluation) is the model; wall time from `started`
    (the epoch second the run process started) to that checkpoint's report."""
    from raylstm.train import read_metrics

    base, _ = out_paths(out_dir)
    metrics = read_metrics(run_dir)
    best = json.loads((Path(run_dir) / "best.json").read_text())
    cfg = (
        json.loads((Path(run_dir) / "config.json").read_text())
        if (Path(run_dir) / "config.json").exists()
        else {}
    )
    out = {
        "name": name,
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": RUNS[name],
        "sources": (cfg.get("data") or {}).get("sources") or conditioned_config([]).data.sources,
        "run_dir": str(run_dir),
        "best_checkpoint": str(Path(run_dir) / best["checkpoint"]),
        "wall_s": (float(best["metrics"]["time"]) - started)
        if started and "time" in best["metrics"]
        else None,
        "steps": max((int(m.get("step", 0)) for m in metrics), default=0),
        "best_step": int(best["metrics"]["step"]),
        "best_val_bpc": best["metrics"].get("val_bpc"),
        "stopped_at_deadline": True,
    }
    base.mkdir(parents=True, exist_ok=True)
    (base / f"run-{name}.json").write_text(json.dumps(out, indent=2))
    return out


def train_stage(out_dir: Path, quick: bool, steps: int | None = None, only: str | None = None) -> dict:
    """Both runs (or `only` one), each in a fresh process: its wall time includes Ray start and prepare."""
    base, _ = out_paths(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in [only] if only else list(RUNS):
        cmd = [sys.executable, "-m", "bench.conditioning", "--one-run", name, "--out", str(out_dir)]
        cmd += ["--quick"] if quick else []
        cmd += ["--steps", str(steps)] if steps else []
        print(f"[conditioning] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
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
    ap.add_argument(
        "--stage",
        choices=["all", "train", "eval", "guided", "report"],
        default="all",
        help="report: the Markdown again from figures.json (no Ray); guided: only the --guidance "
        "figures, added to the eval stage's figures.json",
    )
    ap.add_argument(
        "--guidance",
        type=float,
        nargs="*",
        help="eval/guided stage: Bayes-rule guidance weights to measure (bench.conditioning_guided), "
        "e.g. 0 1 2 4",
    )
    ap.add_argument(
        "--guidance-temperatures", type=float, nargs="+", help="with --guidance (default 0.8 0.5)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny runs: check the path, not the figures")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--steps", type=int, help="train.max_steps of the run(s) (shorter, for development)")
    ap.add_argument(
        "--confirm",
        action="store_true",
        help="--stage guided: choose T and w together on the select set, then measure that one setting "
        "on fresh seeds (figures.json's guided_confirm)",
    )
    ap.add_argument("--run", choices=list(RUNS), help="--stage train: this run only (one lock hold each)")
    ap.add_argument("--one-run", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument(
        "--register-run", help="a run dir stopped at its deadline (--run names it): its best so far"
    )
    ap.add_argument("--started", type=float, help="with --register-run: the epoch second the run started")
    ap.add_argument(
        "--deadline",
        type=float,
        help="--stage eval: an epoch second; parts not started by then are skipped (most important first)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.register_run:
        reg = register_run(out, args.run or "conditioned", Path(args.register_run), args.started)
        print(json.dumps(reg, indent=2))
        return
    if args.one_run:
        print(json.dumps(train_one(args.one_run, out, args.quick, args.steps), indent=2))
        return
    if args.run and args.stage != "train":
        ap.error("--run goes with --stage train")
    if args.stage in ("all", "train"):
        train_stage(out, args.quick, args.steps, args.run)
    if args.stage == "guided" and not args.guidance:
        ap.error("--stage guided needs --guidance W [W ...]")
    if args.stage in ("all", "eval", "guided", "report"):
        from bench.conditioning_eval import eval_stage, to_markdown

        base, _ = out_paths(out)
        if args.stage == "report":
            figures = json.loads((base / "figures.json").read_text())
        elif args.stage == "guided":
            from bench.conditioning_guided import TEMPERATURES, guided_stage

            temps = args.guidance_temperatures or list(TEMPERATURES)
            figures = guided_stage(out, args.guidance, temps, args.quick, args.confirm)
        else:
            figures = eval_stage(out, args.quick, args.deadline, args.guidance, args.guidance_temperatures)
        md = to_markdown(figures, "python -m bench.conditioning" + (" --quick" if args.quick else ""))
        (base / "conditioning.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
