"""Conditioning on rating and category: the figures of docs/conditioning.md and REPORT.md's section.

    train   configs/cpu-conditioned.toml (cpu-quality plus rating and category conditions, on the same
            sources) in its own process and 20-minute budget. "The same model without conditions" is the
            cpu-quality run itself when one is given (--unconditioned RUN_DIR; by default the team's shared
            one, ../runs-shared/quality, when it exists): the same preset, data and schedule, so its
            20 minutes are not spent twice. Without one it is trained here with
            --set 'model.conditions=[]'.
    heldout both models on the same held-out text: the Musical Instruments test reviews (cpu-quality's
            held-out figure), and the whole test split; the conditioned model reads each review with its
            own rating and category.
    eval    on the conditioned run's test split: rating by Bayes' rule (5-way, and positive 4-5 vs
            negative 1-2) beside the majority class and TF-IDF + logistic regression fit on the training
            split (accuracy, macro-F1); category by Bayes' rule; 200 samples at 1 star and 200 at 5 stars
            judged by an independent TF-IDF + LR sentiment classifier fit on the real training reviews;
            the linear probe and the single sentiment unit on the Blitzer and amazon_cells held-out labels
            beside TF-IDF + LR; samples at 1, 3 and 5 stars and steered ones.

    .venv/bin/python -m bench.conditioning                  # both stages (~25 min on 2 cores)
    .venv/bin/python -m bench.conditioning --stage train    # the conditioned run only
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
MI_CSV = AMAZON / "Musical_instruments_reviews.csv.gz"
CONFIG = ROOT / "configs" / "cpu-conditioned.toml"
SHARED_QUALITY = ROOT.parent / "runs-shared" / "quality"  # bench.quality --out here: the team's quality run
RUNS = {"conditioned": [], "unconditioned": ["model.conditions=[]"]}
QUICK = ["train.max_steps=64", "train.eval_every=32", "train.warmup_steps=5", "train.sample_chars=50"]
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
    if steps:  # a shorter run (as the quality run's when the lock time is short; or development)
        overrides += [f"train.max_steps={steps}"]
        every = conditioned_config(overrides).train.eval_every
        if steps < 2 * every:  # still evaluate (and checkpoint) twice, at multiples of segment_windows
            overrides += [f"train.eval_every={max(64, steps // 2 // 64 * 64)}"]
    cfg = conditioned_config(overrides)
    shutil.rmtree(runs / name, ignore_errors=True)  # a run name that exists would be continued
    ensure_ray(num_cpus=4, include_dashboard=False, log_to_driver=True)
    res = train(cfg, storage=str(runs), name=name)
    wall = time.perf_counter() - t0
    metrics = read_metrics(res.run_dir)
    out = {
        "name": name,
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "sources": cfg.data.sources,
        "run_dir": res.run_dir,
        "best_checkpoint": res.best_checkpoint,
        "wall_s": wall,  # process start to the end of train(): Ray, prepare, training, evals, samples
        "steps": max((int(m.get("step", 0)) for m in metrics), default=0),
        "best_val_bpc": res.best_metrics.get("val_bpc"),
    }
    base.mkdir(parents=True, exist_ok=True)
    (base / f"run-{name}.json").write_text(json.dumps(out, indent=2))
    return out


def register_run(out_dir: Path, run_dir: Path, started: float | None) -> dict[str, Any]:
    """run-conditioned.json for a run stopped at its deadline (the lock's end) before max_steps: its best
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
        "name": "conditioned",
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": [],
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
    (base / "run-conditioned.json").write_text(json.dumps(out, indent=2))
    return out


def shared_run(run_dir: Path) -> dict[str, Any]:
    """The unconditioned model from a run trained elsewhere (the team's cpu-quality run)."""
    from raylstm.checkpoint import load_checkpoint
    from raylstm.train import read_metrics

    ckpt = load_checkpoint(run_dir)
    if ckpt.conditions is not None:
        raise ValueError(f"{run_dir}: the unconditioned baseline is conditioned on {ckpt.conditions.fields}")
    metrics = read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").exists() else []
    readme = Path(str(run_dir) + ".README")
    return {
        "name": "unconditioned",
        "config": "configs/cpu-quality.toml (the quality run, bench.quality)",
        "overrides": [],
        "sources": ckpt.config.data.sources,
        "run_dir": str(run_dir),
        "best_checkpoint": str(ckpt.path),
        "wall_s": None,
        "steps": max((int(m.get("step", 0)) for m in metrics), default=ckpt.step or 0),
        "best_val_bpc": ckpt.metrics.get("val_bpc"),
        "readme": readme.read_text() if readme.exists() else None,
    }


def train_stage(
    out_dir: Path, quick: bool, steps: int | None = None, unconditioned: Path | None = None
) -> dict[str, Any]:
    base, _ = out_paths(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    names = list(RUNS) if unconditioned is None else ["conditioned"]
    results = {}
    for name in names:
        cmd = [sys.executable, "-m", "bench.conditioning", "--one-run", name, "--out", str(out_dir)]
        cmd += ["--quick"] if quick else []
        cmd += ["--steps", str(steps)] if steps else []
        print(f"[conditioning] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        results[name] = json.loads((base / f"run-{name}.json").read_text())
    if unconditioned is not None:
        results["unconditioned"] = shared_run(unconditioned)
        (base / "run-unconditioned.json").write_text(json.dumps(results["unconditioned"], indent=2))
    return results


def default_unconditioned() -> Path | None:
    """The newest full (not --quick) run under ../runs-shared/quality that reached a best checkpoint."""
    runs = sorted(
        (d for d in (SHARED_QUALITY / "runs").glob("quality-*") if not d.name.endswith("-quick")),
        key=lambda d: d.name,
    )
    done = [d for d in runs if (d / "best.json").exists()]
    return done[-1] if done else None


# --- stage 2: the figures -----------------------------------------------------------------------------
def run(out_dir: Path, quick: bool = False) -> str:
    """run_all's entry: both stages, then the Markdown section."""
    train_stage(out_dir, quick, unconditioned=None if quick else default_unconditioned())
    from bench.conditioning_eval import eval_stage, to_markdown

    figures = eval_stage(out_dir, quick)
    return to_markdown(figures, ".venv/bin/python -m bench.conditioning" + (" --quick" if quick else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--stage",
        choices=["all", "train", "eval", "report"],
        default="all",
        help="report: the Markdown again from figures.json (no Ray), the unconditioned held-out figure "
        "filled from the quality run's quality.json when the eval stage had none",
    )
    ap.add_argument("--quick", action="store_true", help="tiny runs: check the path, not the figures")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--steps", type=int, help="train.max_steps of the run(s) (shorter, for development)")
    ap.add_argument(
        "--unconditioned",
        help="run dir of the same model without conditions (default: ../runs-shared/quality if it exists; "
        "'train' trains one here)",
    )
    ap.add_argument("--one-run", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--register-run", help="a conditioned run dir stopped at its deadline: its best so far")
    ap.add_argument("--started", type=float, help="with --register-run: the epoch second the run started")
    args = ap.parse_args()
    out = Path(args.out)
    if args.register_run:
        print(json.dumps(register_run(out, Path(args.register_run), args.started), indent=2))
        return
    if args.one_run:
        print(json.dumps(train_one(args.one_run, out, args.quick, args.steps), indent=2))
        return
    if args.stage in ("all", "train"):
        plain = None if args.unconditioned == "train" else args.unconditioned or default_unconditioned()
        train_stage(out, args.quick, args.steps, Path(plain) if plain else None)
    if args.stage in ("all", "eval", "report"):
        from bench.conditioning_eval import eval_stage, fill_from_quality, to_markdown

        base, _ = out_paths(out)
        if args.stage == "report":
            figures = json.loads((base / "figures.json").read_text())
        else:
            plain = None if args.unconditioned in (None, "train") else Path(args.unconditioned)
            figures = eval_stage(out, args.quick, plain)
        if not args.quick and fill_from_quality(figures, SHARED_QUALITY / "quality.json"):
            (base / "figures.json").write_text(json.dumps(figures, indent=2))
        md = to_markdown(figures, "python -m bench.conditioning")
        (base / "conditioning.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
