"""Data pipeline benchmark: `prepare` (Ray Data) vs a plain single-process Python read-and-clean.

Both sides do the same work on the same file (the Musical Instruments CSV, 10,261 reviews): read and
gunzip, parse CSV, clean every review (text.clean_text), drop short ones, drop exact duplicates, assign the
stable-hash split, count characters for the vocabulary, and write one Parquet file set per split. The Ray
side is `raylstm.prepare.prepare` itself (Ray already started, so process start-up is not counted; the
first, cold run is reported separately). Rerun: `.venv/bin/python -m bench.bench_data`.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MI_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"


def plain_python(path: Path, out_dir: Path, min_chars: int, val: float, test: float) -> dict:
    """The single-process baseline: stdlib csv + the same cleaning and split functions, pyarrow write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylstm.data import split_of
    from raylstm.text import clean_text

    seen: set[str] = set()
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    chars: Counter = Counter()
    records = 0
    with gzip.open(path, "rb") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        for rec in reader:
            records += 1
            text = clean_text(rec["reviewText"] or "")
            if len(text) < max(min_chars, 1) or text in seen:
                continue
            seen.add(text)
            key = f"{rec['reviewerID']}|{rec['asin']}"
            split = split_of(key, val, test)
            rows[split].append((text, key))
            if split == "train":
                chars.update(text)
    for split, items in rows.items():
        d = out_dir / split
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"text": [t for t, _ in items], "key": [k for _, k in items]}), d / "0.parquet"
        )
    return {"records": records, "kept": sum(len(v) for v in rows.values()), "vocab_chars": len(chars)}


def run(out_dir: Path, quick: bool = False) -> str:
    from raylstm.config import DataConfig
    from raylstm.prepare import prepare
    from raylstm.ray_env import ensure_ray

    if not MI_CSV.is_file():
        return f"## Data pipeline\n\nSkipped: {MI_CSV} is not present.\n"
    repeats = 1 if quick else 3
    stored = MI_CSV.stat().st_size
    with gzip.open(MI_CSV, "rb") as f:
        raw_bytes = len(f.read())
    cfg = DataConfig(sources=[str(MI_CSV)])
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        t0 = time.perf_counter()
        ensure_ray()
        ray_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = prepare(cfg, tmp / "cold")
        cold = time.perf_counter() - t0
        ray_times, py_times = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            manifest = prepare(cfg, tmp / f"ray{i}")
            ray_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            base = plain_python(MI_CSV, tmp / f"py{i}", cfg.min_chars, cfg.val_fraction, cfg.test_fraction)
            py_times.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import ray

    records = manifest["rows"]["records"]
    r_med, p_med = statistics.median(ray_times), statistics.median(py_times)
    cpus = int(ray.cluster_resources().get("CPU", 0))

    def line(name: str, s: float) -> str:
        return (
            f"| {name} | {s:.2f} | {raw_bytes / 1e6 / s:.2f} | {stored / 1e6 / s:.2f} | {records / s:,.0f} |"
        )

    same = "yes" if (base["kept"] == manifest["rows"]["kept"] and base["records"] == records) else "NO"
    return "\n".join(
        [
            "## Data pipeline: `prepare` vs plain Python",
            "",
            f"File: `Musical_instruments_reviews.csv.gz` ({records:,} reviews, {raw_bytes / 1e6:.2f} MB CSV, "
            f"{stored / 1e6:.2f} MB gzipped). Both sides read, parse, clean, drop short and duplicate reviews, "
            "split by key hash, count vocabulary characters and write Parquet per split. "
            f"Median of {repeats} run(s); machine: {os.cpu_count()} cores ({platform.machine()}), "
            f"Ray with {cpus} logical CPUs, started beforehand ({ray_start:.1f} s, not counted).",
            "",
            "| pipeline | seconds | MB/s (CSV) | MB/s (gz) | rows/s |",
            "|---|---:|---:|---:|---:|",
            line("`raylstm prepare` (Ray Data)", r_med),
            line("plain single-process Python", p_med),
            line("`prepare`, first (cold) run", cold),
            "",
            f"Ratio prepare / plain: **{r_med / p_med:.2f}x** the time. Same rows kept on both sides: {same} "
            f"({manifest['rows']['kept']:,} vs {base['kept']:,}).",
            "",
            "Reading: a 6 MB file is one read task, so Ray's per-stage scheduling, the shuffle for the global "
            "dedupe and the materialisations are fixed costs that a single process does not pay; the Ray "
            "pipeline's value is that the same code streams corpora that do not fit one process (many files "
            "read in parallel, s3:// sources, several nodes), not speed on one small file.",
            "",
            "Rerun: `.venv/bin/python -m bench.bench_data`",
            "",
        ]
    )


if __name__ == "__main__":
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    text = run(out, quick=bool(os.environ.get("BENCH_QUICK")))
    (out / "data.md").write_text(text)
    print(text)
