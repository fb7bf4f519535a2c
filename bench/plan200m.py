"""The seed project's whole plan, end to end: 200,000,000 supervised next-character predictions with its
architecture (Embedding(128) -> LSTM(128) -> Dense(256, ReLU) -> Dropout(0.5) -> softmax over lowercase
ASCII), a prediction at every position, through `raylstm train` (Ray Data + Ray Train) on this machine,
against the bare-PyTorch ceiling measured in the same invocation.

One invocation does, in order:

  1. the ceiling (bench/ceiling.py): a short grid of batch x window length, two concurrent 1-thread
     processes ("2x1", what 2 Ray Train workers of 1 thread do) and one 2-thread process ("1x2");
  2. the choice: the fastest 2x1 shape whose batch x seq_len x 2 workers divides the prediction count
     exactly (so the run is exactly 200M predictions, no partial step); 1x2 is measured for the record,
     but one 2-thread worker on a 2-CPU Ray leaves Ray Data no CPU (the 2-core hang in RAY-NOTES);
     the chosen shape re-measured RECHECKS times bare and with DDP (gloo, no Ray), before step 3 and
     again after it (medians: the best of single short runs can be biased upward by the host's noise);
  3. `raylstm train` as a subprocess (the real CLI path) on the Musical Instruments reviews with
     configs/seed.toml, switched to full-window, stateful supervision, for exactly that many predictions;
  4. the best checkpoint on the held-out test split: `raylstm.evaluate` (every char of each review from
     a zero state, what `raylstm evaluate` prints) and the original's own scoring (each char from position
     40 on, from the 40 chars before it) beside the published weights (../shared/seed/model.h5) scored
     that way on the same reviews; the samples at 0.2/0.5/1.0/1.2 from `raylstm train`'s samples.txt;
  5. plan200m.json and plan200m.md (the bench/REPORT.md section) in --out.

    .venv/bin/python -m bench.plan200m                         # ~35 min on 2 cores: the 200M run
    .venv/bin/python -m bench.plan200m --predictions 2000000   # ~3 min: checks the whole path
    .venv/bin/python -m bench.run_all --only plan200m          # the same, as a piece of the report

Figures: wall time from `raylstm train` start to the best checkpoint (its metrics line's time) and to
the command's exit; chars/s over the whole run = predictions up to the best checkpoint / that wall time
(start-up, data, evaluations and checkpoints included); the ratio of that to the best ceiling of the grid,
and to the chosen shape's medians, bare and with DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AMAZON_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"
CONFIG = ROOT / "configs" / "seed.toml"
PREDICTIONS = 200_000_000  # the original project's plan ("200 million samples"); it managed 30 million
WORKERS = 2  # Ray Train workers of 1 torch thread each: the 2x1 layout of the ceiling
# The ceiling's grid: window lengths and batches whose products with 2 workers divide 200M (2^9 * 5^8),
# plus 64 x 40 (the reference shape, which does not divide it: measured, never chosen).
GRID_2X1 = [(b, t) for t in (25, 50, 100) for b in (32, 64, 128) if (b, t) != (128, 100)] + [(64, 40)]
GRID_1X2 = [(64, 50), (128, 50)]
QUICK_2X1 = [(32, 50), (64, 50)]  # --quick: 2M predictions divide into steps of 32 x 50 x 2 only
MAX_CONTEXT = 512  # chars a stateful segment spans at most (segment_windows x seq_len)
TRAIN_JSON = "plan200m.train.json"  # the ceiling and training figures, written before the scoring
EVALS = 8  # evaluations + checkpoints over the run: enough to pick a best, few enough to cost ~1%
# The grid's best is the max of single short runs, which the host's noise can bias upward: the chosen shape is
# measured again, RECHECKS times bare and with DDP (gloo, no Ray) in turn, before and after the training
# run, so the run also compares with a median of the same shape and the all-reduce's own cost shows.
RECHECKS = 3
RECHECK_SECONDS = 8.0


def measure_ceiling(grid_2x1: list[tuple[int, int]], grid_1x2: list[tuple[int, int]], seconds: float,
                    optimizer: str, vocab: int, hidden: int = 128) -> list[dict[str, Any]]:  # fmt: skip
    """bench.ceiling's measurement of each (batch, seq_len) in its layout, one after another."""
    from bench.ceiling import Shape, measure

    rows = []
    for layout, grid in (("2x1", grid_2x1), ("1x2", grid_1x2)):
        for batch, seq_len in grid:
            shape = Shape(batch=batch, seq_len=seq_len, layout=layout, hidden=hidden, optimizer=optimizer,
                          vocab=vocab)  # fmt: skip
            r = measure(shape, seconds)
            print(f"[plan200m] ceiling {layout} batch {batch} x {seq_len}: {r['chars_per_s']:,.0f} chars/s "
                  f"{r['per_process']}", flush=True)  # fmt: skip
            rows.append(r)
    return rows


def recheck_shape(plan: dict[str, Any], hidden: int, phase: str, repeats: int = RECHECKS) -> list[dict]:
    """The chosen shape, bare and with DDP in turn, `repeats` times each (bench.ceiling)."""
    from bench.ceiling import Shape, measure

    rows = []
    for i in range(repeats):
        for ddp in (False, True):
            shape = Shape(batch=plan["batch"], seq_len=plan["seq_len"], layout="2x1", hidden=hidden,
                          optimizer="adamw", vocab=60, ddp=ddp)  # fmt: skip
            r = {**measure(shape, RECHECK_SECONDS), "phase": phase, "repeat": i}
            print(f"[plan200m] recheck {phase} {'ddp' if ddp else 'bare'} {i}: {r['chars_per_s']:,.0f} "
                  f"chars/s", flush=True)  # fmt: skip
            rows.append(r)
    return rows


def segment_plan(steps: int, seq_len: int) -> tuple[int, int]:
    """(segment_windows, eval_every): the longest stateful segment within MAX_CONTEXT chars that divides
    the step count, and an evaluation cadence that is a multiple of it and divides the steps too (so the
    last step is an evaluation and every checkpoint falls on a segment boundary)."""
    seg = max(n for n in range(1, MAX_CONTEXT // seq_len + 1) if steps % n == 0)
    for evals in range(EVALS, 0, -1):
        every = steps // evals
        if steps % evals == 0 and every % seg == 0:
            return seg, every
    return seg, steps


def choose(rows: list[dict[str, Any]], predictions: int) -> dict[str, Any]:
    """The fastest 2x1 shape that makes the run exactly `predictions` long, and its training plan."""
    usable = [
        r for r in rows if r["layout"] == "2x1" and predictions % (r["batch"] * r["seq_len"] * WORKERS) == 0
    ]
    if not usable:
        raise ValueError(f"no measured 2x1 shape divides {predictions:,} predictions into whole steps")
    best = max(usable, key=lambda r: r["chars_per_s"])
    steps = predictions // (best["batch"] * best["seq_len"] * WORKERS)
    seg, every = segment_plan(steps, best["seq_len"])
    return {
        "batch": best["batch"],
        "seq_len": best["seq_len"],
        "workers": WORKERS,
        "threads_per_worker": 1,
        "steps": steps,
        "segment_windows": seg,
        "eval_every": every,
        "ceiling_of_shape": best["chars_per_s"],
    }


def overrides(plan: dict[str, Any], lr: float, hidden: int = 128) -> list[str]:
    """configs/seed.toml's model and text, trained with a prediction at every position (stateful
    windows) by AdamW with warm-up, cosine decay and clipping instead of Keras' constant-LR RMSprop.
    hidden: the LSTM's units (128 as the original's README says; 256 as its published weights have)."""
    warmup = min(500, plan["steps"] // 10)
    return [
        f"model.hidden_size={hidden}",
        "data.window_mode=full",
        f"data.seq_len={plan['seq_len']}",
        f"data.segment_windows={plan['segment_windows']}",
        f"train.batch_size={plan['batch']}",
        f"train.num_workers={plan['workers']}",
        "train.cpus_per_worker=0.5",  # 1 torch thread each; 2 x 0.5 leaves Ray Data a CPU (RAY-NOTES)
        f"train.max_steps={plan['steps']}",
        f"train.eval_every={plan['eval_every']}",
        "train.log_every=200",
        "train.optimizer=adamw",
        f"train.lr={lr}",
        f"train.warmup_steps={warmup}",
        "train.min_lr_ratio=0.05",
        "train.weight_decay=0.01",
        "train.grad_clip=1.0",
        "train.max_val_batches=0",
        "train.keep_checkpoints=2",
    ]


def train_command(source: Path, storage: Path, name: str, sets: list[str]) -> list[str]:
    cmd = [str(ROOT / ".venv" / "bin" / "raylstm"), "train", "--config", str(CONFIG), "--data", str(source)]
    cmd += ["--storage", str(storage), "--name", name]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_train(cmd: list[str], log_path: Path) -> tuple[float, float, int]:
    """(start time.time(), wall seconds to exit, exit code): `raylstm train`, its output to the console
    and `log_path`."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[raylstm]") and "sample step" not in line:
                print(line.rstrip()[:200], flush=True)
        rc = proc.wait()
    return start, time.time() - start, rc


def held_out_figures(run_dir: Path, max_reviews: int = 0) -> dict[str, Any]:
    """The best checkpoint's test bpc both ways, and the published weights' on the same reviews (the
    first `max_reviews` of them for the 40-char scoring when > 0: a quick check of the path)."""
    from bench.seed_peer import heldout_reviews, review_windows, score_windows, seed_peer_figure
    from raylstm.checkpoint import load_checkpoint
    from raylstm.evaluate import evaluate
    from raylstm.ray_env import ensure_ray

    ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ev = evaluate(run_dir, compressors=False)  # what `raylstm evaluate --checkpoint RUN` scores
    texts = heldout_reviews(AMAZON_CSV)  # the same split, cleaned the same way (lowercase ASCII)
    texts = texts[:max_reviews] if max_reviews else texts
    ckpt = load_checkpoint(run_dir)
    x, y = review_windows(texts, ckpt.vocab)
    t0 = time.perf_counter()
    bits = score_windows(ckpt.model.eval(), x, y)
    ours_40 = {"bpc": bits / len(y), "predictions": int(len(y)), "seconds": time.perf_counter() - t0}
    seed = seed_peer_figure(texts)
    return {"evaluate": ev, "ours_40_context": ours_40, "seed_weights": seed}


def run_plan(out_dir: Path, predictions: int = PREDICTIONS, seconds: float = 6.0, quick: bool = False,
             lr: float = 3e-3, source: Path = AMAZON_CSV, command: str = "",
             hidden: int = 128) -> dict[str, Any]:  # fmt: skip
    """The ceiling grid, the choice, `raylstm train`, then `finish` (the held-out scoring)."""
    from raylstm.train import read_metrics

    if not source.exists():
        raise FileNotFoundError(f"the plan trains on the real reviews at {source} (../shared/data/amazon)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_bench = time.time()
    grid_2x1, grid_1x2 = (QUICK_2X1, []) if quick else (GRID_2X1, GRID_1X2)
    ceiling = measure_ceiling(grid_2x1, grid_1x2, seconds, optimizer="adamw", vocab=60, hidden=hidden)
    ceiling_s = time.time() - t_bench
    best_ceiling = max(ceiling, key=lambda r: r["chars_per_s"])
    plan = choose(ceiling, predictions)
    recheck = [] if quick else recheck_shape(plan, hidden, "before")
    sets = overrides(plan, lr, hidden)
    name = f"plan200m-{time.strftime('%Y%m%d-%H%M%S')}-{predictions}"
    storage = out_dir / "runs"
    cmd = train_command(source, storage, name, sets)
    print(f"[plan200m] plan {json.dumps(plan)}\n[plan200m] {shlex.join(cmd)}", flush=True)
    start, train_wall, rc = run_train(cmd, out_dir / f"{name}.log")
    if rc != 0:
        raise RuntimeError(f"raylstm train exited with {rc}; see {out_dir / (name + '.log')}")
    run_dir = storage / name
    recheck += [] if quick else recheck_shape(plan, hidden, "after")
    metrics = read_metrics(run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    best_line = next(m for m in metrics if m.get("checkpoint") == best["checkpoint"])
    best_step = int(best_line["step"])
    per_step = plan["batch"] * plan["seq_len"] * plan["workers"]
    best_preds = best_step * per_step
    to_best = best_line["time"] - start
    steady = [m["chars_per_s_total"] for m in metrics if "val_bpc" not in m and m.get("chars_per_s_total")]
    first_step_time = min((m["time"] for m in metrics), default=start)
    fig = {
        "predictions": predictions,
        "hidden": hidden,
        "predictions_done": int(max(m["step"] for m in metrics)) * per_step,
        "ceiling": ceiling,
        "ceiling_seconds": ceiling_s,
        "best_ceiling": best_ceiling,
        "plan": plan,
        "overrides": sets,
        "train_command": shlex.join(cmd),
        "run_dir": str(run_dir),
        "train_wall_s": train_wall,
        "wall_to_best_s": to_best,
        "start_to_first_report_s": first_step_time - start,
        "best_checkpoint": best["checkpoint"],
        "best_step": best_step,
        "best_predictions": best_preds,
        "best_val_bpc": best_line.get("val_bpc"),
        "chars_per_s_whole_run": best_preds / to_best,
        "ratio_whole_run": best_preds / to_best / best_ceiling["chars_per_s"],
        "chars_per_s_steady_median": statistics.median(steady) if steady else None,
        "ratio_steady": statistics.median(steady) / best_ceiling["chars_per_s"] if steady else None,
        "recheck": recheck,
        "curve": [(m.get("step"), m.get("val_bpc")) for m in metrics if m.get("val_bpc") is not None],
        "samples_txt": (run_dir / "samples.txt").read_text() if (run_dir / "samples.txt").exists() else "",
        "quick": quick,
        "bench_start": t_bench,
        "bench_command": command,
    }
    # The training figures first: if scoring fails, `--finish` redoes only that part from this file.
    (out_dir / TRAIN_JSON).write_text(json.dumps(fig, indent=2, default=str))
    return finish(out_dir)


def finish(out_dir: Path) -> dict[str, Any]:
    """The held-out figures of a run whose training figures are in out_dir/TRAIN_JSON; plan200m.json."""
    fig = json.loads((Path(out_dir) / TRAIN_JSON).read_text())
    fig.update(held_out_figures(Path(fig["run_dir"]), max_reviews=60 if fig["quick"] else 0))
    fig["bench_wall_s"] = time.time() - fig["bench_start"]
    (Path(out_dir) / "plan200m.json").write_text(json.dumps(fig, indent=2, default=str))
    return fig


def recheck_lines(f: dict[str, Any]) -> list[str]:
    """The chosen shape re-measured before and after the run, and the run's rate against its medians."""
    rows = f.get("recheck") or []
    if not rows:
        return []
    bare = [r["chars_per_s"] for r in rows if not r["ddp"]]
    ddp = [r["chars_per_s"] for r in rows if r["ddp"]]
    run = f["chars_per_s_whole_run"]
    steady = f.get("chars_per_s_steady_median") or float("nan")

    def cell(phase: str, is_ddp: bool) -> str:
        return ", ".join(
            f"{r['chars_per_s']:,.0f}" for r in rows if r["phase"] == phase and r["ddp"] == is_ddp
        )

    bm, dm = statistics.median(bare), statistics.median(ddp)
    return [
        f"The chosen shape again, {RECHECKS} x {RECHECK_SECONDS:.0f} s each bare and with DDP (two processes "
        "in one gloo process group, DistributedDataParallel, no Ray; `bench/ceiling.py --ddp`) in turn, "
        "before and after the run:",
        "",
        "| chosen shape | before | after | median |",
        "|---|---|---|---:|",
        f"| bare (2x1) | {cell('before', False)} | {cell('after', False)} | {bm:,.0f} |",
        f"| DDP, no Ray | {cell('before', True)} | {cell('after', True)} | {dm:,.0f} |",
        "",
        f"Against these medians: the whole run {run / bm:.3f} of bare and {run / dm:.3f} of DDP without "
        f"Ray; its steady state {steady / bm:.3f} and {steady / dm:.3f}; DDP's own cost {1 - dm / bm:.1%} "
        f"of bare. The grid's best single run ({f['best_ceiling']['chars_per_s']:,.0f}) is "
        f"{f['best_ceiling']['chars_per_s'] / bm:.2f}x the chosen shape's bare median.",
        "",
    ]


def markdown(f: dict[str, Any], command: str) -> str:
    p, bc = f["plan"], f["best_ceiling"]
    lines = [
        f"## The seed's plan: {f['predictions']:,} predictions end to end"
        + (f", LSTM {f['hidden']}" if f.get("hidden", 128) != 128 else ""),
        "",
        f"Command: `{command}` (one invocation: the ceiling grid, then `raylstm train`, then the held-out "
        f"scoring). The original's architecture (Embedding 128 -> LSTM {f.get('hidden', 128)} -> Dense 256 "
        "ReLU -> Dropout 0.5 -> softmax over lowercase ASCII; its README says LSTM 128, its published "
        "weights have 256) with a prediction at every position, on the Musical Instruments reviews, 2 CPU "
        "cores.",
        "",
        "### Ceiling (bare PyTorch, bench/ceiling.py, measured first in the same run)",
        "",
        "| layout | batch | seq_len | chars/s | per process |",
        "|---|---:|---:|---:|---|",
    ]
    for r in sorted(f["ceiling"], key=lambda r: -r["chars_per_s"]):
        lines.append(f"| {r['layout']} | {r['batch']} | {r['seq_len']} | {r['chars_per_s']:,.0f} "
                     f"| {', '.join(f'{x:,}' for x in r['per_process'])} |")  # fmt: skip
    lines += [
        "",
        f"Best: {bc['layout']} batch {bc['batch']} x {bc['seq_len']}, **{bc['chars_per_s']:,.0f} chars/s** "
        f"(the bar below). Grid time {f['ceiling_seconds']:.0f} s.",
        "",
        f"Choice: {p['workers']} workers x {p['threads_per_worker']} thread, batch {p['batch']} x "
        f"{p['seq_len']} per worker (the fastest 2x1 shape whose step divides {f['predictions']:,} exactly; "
        f"its ceiling {p['ceiling_of_shape']:,.0f} chars/s), stateful segments of {p['segment_windows']} "
        f"windows ({p['segment_windows'] * p['seq_len']} chars of carried context), {p['steps']:,} steps, "
        f"an evaluation and checkpoint every {p['eval_every']:,}.",
        "",
        *recheck_lines(f),
        "### The run",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| predictions trained | {f['predictions_done']:,} |",
        f"| wall time, `raylstm train` start to best checkpoint ({f['best_checkpoint']}) "
        f"| {f['wall_to_best_s']:,.0f} s ({f['wall_to_best_s'] / 60:.1f} min) |",
        f"| wall time, `raylstm train` start to exit | {f['train_wall_s']:,.0f} s |",
        f"| start-up (command start to the first metrics report) | {f['start_to_first_report_s']:.0f} s |",
        f"| chars/s over the whole run (predictions to best / wall to best) "
        f"| {f['chars_per_s_whole_run']:,.0f} |",
        f"| **ratio to the ceiling** (target >= 0.9) | **{f['ratio_whole_run']:.3f}** |",
        f"| steady-state chars/s (median of the reports between evaluations) "
        f"| {f['chars_per_s_steady_median']:,.0f} ({f['ratio_steady']:.3f} of the ceiling) |",
        f"| best val bpc | {f['best_val_bpc']:.4f} |",
    ]
    if f["predictions"] != PREDICTIONS:
        # This run's start-up once, then its rate after start-up (training, evaluations, checkpoints).
        startup = f["start_to_first_report_s"]
        per_pred = (f["wall_to_best_s"] - startup) / f["best_predictions"]
        lines.append(
            f"| {PREDICTIONS:,} predictions projected (this run's start-up + its rate after start-up) "
            f"| {(startup + PREDICTIONS * per_pred) / 60:.0f} min (at the ceiling: "
            f"{PREDICTIONS / bc['chars_per_s'] / 60:.0f} min) |"
        )
    lines += ["", "### Held-out test split (the same reviews for every row)", ""]
    if "evaluate" in f:
        ev, ours40, seed = f["evaluate"]["model"], f["ours_40_context"], f["seed_weights"]
        lines += [
            "| model | scoring | predictions | bits/char |",
            "|---|---|---:|---:|",
            f"| this run, {f['best_checkpoint']} | each review whole from a zero state (`raylstm evaluate`) "
            f"| {ev['chars']:,} | **{ev['bpc']:.3f}** |",
            f"| this run, {f['best_checkpoint']} | the original's: each char from position 40 from the 40 "
            f"before | {ours40['predictions']:,} | **{ours40['bpc']:.3f}** |",
            f"| the original's published weights (model.h5, LSTM 256) | the original's | "
            f"{seed['predictions']:,} | {seed['bpc']:.3f} |",
        ]
    else:
        seed = None
        lines.append(f"Not scored yet: `{f.get('bench_command', '')} --finish` scores the best checkpoint.")
    lines += [
        "",
        "Samples from the best checkpoint (`raylstm train`'s samples.txt, prime then 500 chars):",
        "",
        "```",
        f["samples_txt"].strip(),
        "```",
        "",
    ]
    if seed:
        lines += [
            "The published weights' samples from the same prime (each char from the last 40, as it sampled):"
        ]
        lines.append("")
        for t, text in seed["samples"].items():
            shown = (seed["prime"] + text).replace("\n", " / ").replace("`", "'")
            lines.append(f"- T={t}: `{shown}`")
    lines += ["", f"`raylstm train` as run: `{f['train_command']}`", ""]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False) -> str:
    """bench.run_all's entry point (quick: a 2M-prediction run on a two-shape grid)."""
    predictions = 2_000_000 if quick else PREDICTIONS
    command = ".venv/bin/python -m bench.plan200m" + (" --quick" if quick else "")
    fig = run_plan(Path(out_dir), predictions, seconds=4.0 if quick else 6.0, quick=quick, command=command)
    return markdown(fig, command)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", type=int, default=PREDICTIONS, help="supervised predictions to train")
    ap.add_argument("--quick", action="store_true", help="2M predictions on a two-shape ceiling grid")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds each ceiling shape is timed")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate")
    ap.add_argument("--hidden", type=int, default=128, help="LSTM units (the published weights have 256)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "plan200m"))
    ap.add_argument(
        "--finish", action="store_true", help=f"only the held-out scoring, of the run in --out/{TRAIN_JSON}"
    )
    ap.add_argument("--markdown", action="store_true", help="only plan200m.md, from --out/plan200m.json")
    args = ap.parse_args(argv)
    if args.quick and args.predictions == PREDICTIONS:
        args.predictions = 2_000_000
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    command = shlex.join(
        [".venv/bin/python", "-m", "bench.plan200m", *(argv if argv is not None else sys.argv[1:])]
    )
    if args.markdown:  # the scored figures, or the training ones where the scoring has not run
        done = Path(args.out) / "plan200m.json"
        fig = json.loads((done if done.exists() else Path(args.out) / TRAIN_JSON).read_text())
    elif args.finish:
        fig = finish(Path(args.out))
    else:
        fig = run_plan(
            Path(args.out),
            args.predictions,
            args.seconds,
            args.quick,
            args.lr,
            command=command,
            hidden=args.hidden,
        )
    md = markdown(fig, fig.get("bench_command") or command)
    (Path(args.out) / "plan200m.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
