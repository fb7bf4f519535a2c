"""Training streamed from a prepared corpus larger than the object store: `raylstm train` on a 4 GB
prepared corpus and on a 10 MB one, the same small model, side by side in one run.

Each side is `raylstm train --data PREPARED ...` (raylstm.cli.main, the real command) in a fresh process
that first starts its own local Ray with `object_store_memory` = 1 GiB (what `raylstm train` would start,
with the store capped), while this process samples the PSS of that process and all its descendants
(bench_scale's sampler: driver, raylet, GCS, the Train controller and worker, Ray Data's tasks; the object
store counted once). The big side keeps the default `data.materialize = true`, which raylstm refuses for
windows that do not fit the store (train.materialize_refusal) and streams; the small side asks for
streaming (`data.materialize=false`), so both read the same pipeline and only the corpus differs.

Per side: chars/s over steps 200..2000 (metrics.jsonl intervals, evaluations excluded, as the progress line
counts them) and per quarter of that range; memory (PSS) at steps ~500 and ~2000 and its peak over the
steps; Ray's object-spilling counter; Ray Data's stats of the training shard (train_data_stats.txt, rank 0):
the operators' estimated single-task throughput (rows/s of task time: what the pipeline could feed at most
on the CPU Ray Data has) against the rows/s training consumed, and the time the loop was blocked on data.

Rerun (replaces the "### Training streamed" subsection of bench/REPORT.md's "Scale" section):
    .venv/bin/python -m bench.bench_stream --big /work/scale-corpora/out-4GB-prepare \\
        --small /work/scale-corpora/out-10MB-prepare
(the prepared corpora: `bench.bench_scale --corpora /work/scale-corpora --keep-prepared 10MB 4GB`)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.bench_scale import OBJECT_STORE, ROOT, _pss_kib, _tree, provenance

RERUN = ".venv/bin/python -m bench.bench_stream"
STEPS = 2000
FROM_STEP = 200  # chars/s from here on (start-up, warm-up and the first blocks are behind)
BATCH, SEQ_LEN = 64, 128


# The same small model for both sides: one 128-unit layer (the seed's size), one worker on one of the two
# cores (Ray Data has the other), small evaluations (one batch of 512 val reviews every 500 steps).
def overrides(steps: int) -> list[str]:
    return [
        "model.embed_dim=32",
        "model.hidden_size=128",
        "model.num_layers=1",
        "model.dropout=0.0",
        f"data.seq_len={SEQ_LEN}",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        f"train.batch_size={BATCH}",
        f"train.max_steps={steps}",
        "train.warmup_steps=100",
        "train.log_every=50",
        "train.eval_every=500",
        "train.max_val_batches=1",
        "train.sample_every_eval=false",
        "train.max_failures=0",
    ]


SUBSECTION = "### Training streamed from a corpus larger than the object store"


def child(prepared: str, storage: str, name: str, extra: str, steps: str) -> None:
    import ray
    from ray._private.internal_api import memory_summary

    from raylstm.cli import main

    ray.init(
        address="local",
        object_store_memory=OBJECT_STORE,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    sets = [a for o in [*overrides(int(steps)), *json.loads(extra)] for a in ("--set", o)]
    print("TIMED_START", flush=True)
    rc = main(["train", "--data", prepared, "--storage", storage, "--name", name, *sets])
    spilled = re.search(r"Spilled ([0-9.]+) MiB", memory_summary(stats_only=True))
    restored = re.search(r"Restored ([0-9.]+) MiB", memory_summary(stats_only=True))
    print(
        "RESULT "
        + json.dumps(
            {
                "rc": rc,
                "spilled_mib": float(spilled.group(1)) if spilled else 0.0,
                "restored_mib": float(restored.group(1)) if restored else 0.0,
            }
        ),
        flush=True,
    )


def run_side(label: str, prepared: Path, storage: Path, extra: list[str], steps: int = STEPS) -> dict:
    """One `raylstm train` in a child process, its process tree's PSS sampled every 0.5 s."""
    name = f"stream-{label}"
    shutil.rmtree(storage / name, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.bench_stream", "--child", str(prepared), str(storage), name]
    proc = subprocess.Popen(
        [*cmd, json.dumps(extra), str(steps)],
        cwd=ROOT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    samples: list[tuple[float, int]] = []  # (time.time(), PSS bytes of the tree)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), 1024 * sum(_pss_kib(p) for p in _tree(proc.pid))))
            done.wait(0.5)

    threading.Thread(target=sample, daemon=True).start()
    result, tail, said = None, [], []
    t0 = time.time()
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("[raylstm] data.materialize"):
            said.append(line.strip())
        tail = (tail + [line])[-40:]
    proc.wait()
    done.set()
    if proc.returncode != 0 or not result or result["rc"] != 0:
        raise RuntimeError(f"{label}: raylstm train failed (exit {proc.returncode}):\n{''.join(tail)}")
    run_dir = storage / name
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    stats = (run_dir / "train_data_stats.txt").read_text()
    config = json.loads((run_dir / "config.json").read_text())
    return {
        "label": label,
        "prepared": str(prepared),
        "manifest": json.loads((prepared / "manifest.json").read_text()),
        "wall_seconds": time.time() - t0,
        "materialize_notice": said,
        "materialized": config["data"]["materialize"],
        **result,
        **summarize(metrics, samples, stats, steps),
        "data_stats": stats,
    }


def summarize(metrics: list[dict], samples: list[tuple[float, int]], stats: str, steps: int = STEPS) -> dict:
    """chars/s over the steps, memory at steps ~500 / ~2000, and the pipeline's figures from Ray Data."""
    rows = sorted((m for m in metrics if "chars_per_s" in m), key=lambda m: m["step"])
    intervals = []  # (first step, last step, chars, seconds) of each report's interval
    prev = 0
    for m in rows:
        chars = (m["step"] - prev) * BATCH * SEQ_LEN
        intervals.append((prev + 1, m["step"], chars, chars / m["chars_per_s"]))
        prev = m["step"]

    def rate(lo: int, hi: int) -> float:
        sel = [(c, s) for a, b, c, s in intervals if a > lo and b <= hi]
        return sum(c for c, _ in sel) / sum(s for _, s in sel) if sel else float("nan")

    first = steps * FROM_STEP // STEPS
    edges = [first + (steps - first) * k // 4 for k in range(5)]
    at = {m["step"]: m["time"] for m in rows}

    def pss_at(step: int) -> int:
        t = at[min(at, key=lambda s: abs(s - step))]
        return min(samples, key=lambda x: abs(x[0] - t))[1] if samples else 0

    t_from, t_end = at[min(at, key=lambda s: abs(s - first))], max(at.values())
    in_steps = [p for t, p in samples if t_from <= t <= t_end]
    single_task = [float(x) for x in re.findall(r"Estimated single task throughput: ([0-9.]+) rows/s", stats)]
    # Per operator (before the split): its tasks' total wall time, and the rows the last one put out
    ops = [b for b in re.split(r"^Operator \d+ ", stats, flags=re.M)[1:] if "Remote wall time" in b]
    task_seconds = [_seconds(re.search(r"Remote wall time: .*?, ([0-9.]+)(\w+) total", b)) for b in ops]
    out_rows = re.findall(r"Total output num rows: (\d+) rows", ops[-1]) if ops else []
    blocked = re.search(r"blocked by Ray Data iter_batches: ([0-9.]+)(\w+)", stats)
    user = re.search(r"Total execution time for user thread: ([0-9.]+)(\w+)", stats)
    train_seconds = sum(s for *_, s in intervals)
    return {
        "chars_per_s": rate(first, steps),
        "chars_per_s_quarters": [rate(a, b) for a, b in zip(edges[:-1], edges[1:])],
        "interval_min_max": [
            min(c / s for a, b, c, s in intervals if a > first),
            max(c / s for a, b, c, s in intervals if a > first),
        ],
        "last_step": rows[-1]["step"],
        "pss_at_500": pss_at(steps // 4),
        "pss_at_2000": pss_at(steps),
        "pss_peak_steps": max(in_steps, default=0),
        "pss_peak_all": max((p for _, p in samples), default=0),
        "rows_consumed_per_s": rows[-1]["step"] * BATCH / train_seconds,
        # what the input pipeline can feed at most: the training rows it made over the task time all its
        # operators took (they share the one CPU Ray Data has beside the training worker)
        "feed_rows_per_s": int(out_rows[0]) / sum(task_seconds)
        if out_rows and task_seconds
        else float("nan"),
        "op_task_seconds": task_seconds,
        "single_task_rows_per_s": single_task,
        "blocked_s": _seconds(blocked),
        "user_s": _seconds(user),
    }


def _seconds(m: re.Match | None) -> float:
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}.get(unit, 1.0)


def markdown(sides: list[dict], run: dict) -> str:
    g = 2**30
    lines = [
        SUBSECTION,
        "",
        f"Rerun: `{run['command']}` (it rewrites this subsection; the prepared corpora are bench_scale's "
        "`--keep-prepared 10MB 4GB` outputs). Each side is `raylstm train --data PREPARED` "
        "(`raylstm.cli.main`) in a fresh process under `ray.init(object_store_memory="
        f"{OBJECT_STORE >> 20} MiB)` on this 2-core machine, the same small model for both: "
        f"`{' '.join('--set ' + o for o in overrides(STEPS))}`. The 4 GB side keeps the default "
        "`data.materialize = true`, which raylstm refuses (prints why) and streams; the 10 MB side "
        "streams by `data.materialize=false`, so only the corpus differs. chars/s = training characters "
        f"over the steps' own time (evaluations excluded), steps {FROM_STEP}-{STEPS}. Memory = PSS of the "
        "side's whole process tree (bench_scale's sampler). Feed = from Ray Data's stats of the training "
        "shard (rank 0's `train_data_stats.txt`): the training rows (windows) the pipeline made over the "
        "summed task time of its operators (read + encode), i.e. what it can feed at most on the one CPU "
        "Ray Data has beside the worker, against the rows/s training took; blocked = the iterator's "
        "'time user thread is blocked by Ray Data iter_batches' against its 'execution time for user "
        "thread'.",
        "",
        f"This run: at commit {run['commit']}, {run['start']} to {run['end']}.",
        "",
        "| corpus | train text | chars/s | per quarter | PSS step ~500 | PSS step ~2000 | peak (steps) "
        "| spilled | feed rows/s max | consumed rows/s | blocked on data |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sides:
        train_gb = s["manifest"]["splits"]["train"]["chars"] / 1e9
        q = " / ".join(f"{x / 1000:.1f}k" for x in s["chars_per_s_quarters"])
        lines.append(
            f"| {s['label']} | {train_gb:.2f} G chars | {s['chars_per_s']:,.0f} | {q} | "
            f"{s['pss_at_500'] / g:.2f} GiB | {s['pss_at_2000'] / g:.2f} GiB | {s['pss_peak_steps'] / g:.2f} GiB "
            f"| {s['spilled_mib']:.0f} MiB | {s['feed_rows_per_s']:,.0f} | {s['rows_consumed_per_s']:,.0f} | "
            f"{s['blocked_s']:.1f} s of {s['user_s']:.0f} s |"
        )
    by = {s["label"]: s for s in sides}
    if "4GB" in by and "10MB" in by:
        big, small = by["4GB"], by["10MB"]
        r = big["chars_per_s"] / small["chars_per_s"]
        growth = big["pss_at_2000"] / big["pss_at_500"] - 1
        lines += [
            "",
            f"- Steady chars/s: 4 GB at {r:.2f}x the 10 MB run ({big['chars_per_s']:,.0f} vs "
            f"{small['chars_per_s']:,.0f}; target within 10%): {'met' if abs(r - 1) <= 0.10 else 'missed'}.",
            f"- Flat memory: the 4 GB run's PSS {big['pss_at_500'] / g:.2f} GiB at step ~500, "
            f"{big['pss_at_2000'] / g:.2f} GiB at step ~2000 ({growth:+.0%}); peak over the steps "
            f"{big['pss_peak_steps'] / g:.2f} GiB (10 MB: {small['pss_peak_steps'] / g:.2f} GiB).",
            f"- materialize on 4 GB: {'; '.join(big['materialize_notice']) or 'no notice printed'} "
            f"(its config.json: data.materialize = {str(big['materialized']).lower()}).",
        ]
    lines.append("")
    return "\n".join(lines)


def replace_subsection(report: Path, text: str) -> None:
    """Put `text` in place of the report's SUBSECTION (up to the next heading of level 2 or 3), or at the
    end of its "## Scale" section."""
    doc = report.read_text() if report.exists() else ""
    sub = re.compile(rf"^{re.escape(SUBSECTION)}\n.*?(?=^##+ |\Z)", re.S | re.M)
    if sub.search(doc):
        doc = sub.sub(lambda _: text.rstrip() + "\n\n", doc)
    else:
        scale = re.compile(r"^## Scale\b.*?(?=^## |\Z)", re.S | re.M)
        m = scale.search(doc)
        if m is None:
            doc = doc.rstrip() + "\n\n" + text
        else:
            doc = doc[: m.end()].rstrip() + "\n\n" + text.rstrip() + "\n\n" + doc[m.end() :]
    report.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", required=False, help="the 4 GB prepared corpus (bench_scale --keep-prepared)")
    ap.add_argument("--small", required=False, help="the 10 MB prepared corpus")
    ap.add_argument("--storage", default="/tmp/raylstm-bench-stream", help="run storage (deleted per side)")
    ap.add_argument("--report", default=str(ROOT / "bench" / "REPORT.md"))
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per side (a quick check: 100)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if not (args.big and args.small):
        ap.error("--big and --small are required")
    run = {**provenance(), "command": " ".join([RERUN, *(argv if argv is not None else sys.argv[1:])])}
    storage = Path(args.storage)
    storage.mkdir(parents=True, exist_ok=True)
    sides = []
    for label, prepared, extra in (
        ("10MB", args.small, ["data.materialize=false"]),
        ("4GB", args.big, []),
    ):
        s = run_side(label, Path(prepared), storage, extra, args.steps)
        print(
            f"[stream] {label}: {s['chars_per_s']:,.0f} chars/s, peak {s['pss_peak_steps'] / 2**30:.2f} GiB"
        )
        sides.append(s)
    run["end"] = time.strftime("%H:%M UTC", time.gmtime())
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream.json").write_text(json.dumps(sides, indent=2))
    text = markdown(sides, run)
    replace_subsection(Path(args.report), text)
    print(text)
    for s in sides:
        print(f"--- {s['label']}: Ray Data stats of the training shard ---\n{s['data_stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
