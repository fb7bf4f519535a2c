"""Parse-stage benchmark: one process, no Ray, the reader functions of `raylstm.sources` on one file.

The read stage of `prepare` is these functions run in Ray read tasks (one per file or block), so their
single-process throughput is its ceiling per core. Each file is parsed into `ROW_SCHEMA` Arrow tables, as
the datasource does, beside a bare floor in the same run: split the lines and parse each with the
standard library (`json.loads`, `bytes.split(b"\\t")`), with no field mapping, checks or Arrow tables.

Rerun (a few hundred MB of JSON lines / TSV; `--make` writes them from ../shared/data/amazon), with
another checkout's reader timed beside ours in the same process (`--baseline its/raylstm/sources.py`):
    .venv/bin/python -m bench.bench_parse --make /tmp/parse-bench
    git show <rev>:raylstm/sources.py > /tmp/parse-bench/baseline_sources.py
    flock /work/.cpu.lock .venv/bin/python -m bench.bench_parse /tmp/parse-bench/big.jsonl \
        /tmp/parse-bench/big.tsv --baseline /tmp/parse-bench/baseline_sources.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "RAY_AUTH_MODE", "disabled"
)  # the datasource's set-up may start Ray: never touch ~/.ray

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon"


def make_corpus(out: Path, target_bytes: float = 300e6) -> list[Path]:
    """JSON lines (2014 + 2018 layouts) and TSV built by repeating the real reviews with distinct ids."""
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(SHARED / "Musical_Instruments_5.reconstructed.json.gz").read().splitlines()
    lines += gzip.open(SHARED / "All_Beauty_5.json.gz").read().splitlines()
    with open(out / "big.jsonl", "wb") as f:
        size, rep = 0, 0
        while size < target_bytes:
            for ln in lines:
                obj = json.loads(ln)
                obj["reviewerID"] = f"{obj['reviewerID']}-{rep}"
                b = json.dumps(obj).encode() + b"\n"
                f.write(b)
                size += len(b)
            rep += 1
    tsv = (SHARED / "amazon_reviews_us_Gift_Card_v1_00.tsv").read_bytes().split(b"\n")
    header, rows = tsv[0], [r for r in tsv[1:] if r.strip()]
    with open(out / "big.tsv", "wb") as f:
        f.write(header + b"\n")
        size, rep = 0, 0
        while size < target_bytes:
            for r in rows:
                p = r.split(b"\t")
                p[2] += b"-%d" % rep
                b = b"\t".join(p) + b"\n"
                f.write(b)
                size += len(b)
            rep += 1
    return [out / "big.jsonl", out / "big.tsv"]


def bare_floor(path: Path) -> int:
    """Lines parsed with the standard library alone: the least any line reader does."""
    n = 0
    tsv = path.suffix == ".tsv"
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(1 << 20):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if line:
                    (line.split(b"\t") if tsv else json.loads(line))
                    n += 1
    return n


def reader_of(sources_module, any_file: Path):
    """A `sources` module's own per-file parse (what one Ray read task runs), Arrow tables built, as a
    callable path -> rows; setting up the datasource (which may start Ray) is not timed."""
    parse_file = getattr(sources_module, "parse_file", None)
    opts = sources_module.ReadOptions()
    if parse_file is None:  # before formats.py: only the datasource's _read_stream
        ds = sources_module.ReviewDatasource([str(any_file)], opts)
        parse_file = lambda f, path, _opts: ds._read_stream(f, path)  # noqa: E731

    def parse(path: Path) -> int:
        n = 0
        with open(path, "rb") as f:
            for table in parse_file(f, str(path), opts):
                n += table.num_rows
        return n

    return parse


def load_baseline(path: Path):
    """Another checkout's raylstm/sources.py, imported under its own name beside ours."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_sources", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def best_of(fn, path: Path, repeats: int) -> tuple[float, int]:
    best, rows = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = fn(path)
        best = min(best, time.perf_counter() - t0)
    return best, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="uncompressed .jsonl / .tsv files to parse")
    p.add_argument("--make", type=Path, help="write big.jsonl and big.tsv (~300 MB each) here first")
    p.add_argument("--baseline", type=Path, help="a sources.py from another checkout, timed beside ours")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per side (noise)")
    args = p.parse_args()
    files = make_corpus(args.make) if args.make else args.files
    import raylstm.sources

    sides = [("stdlib floor", bare_floor)]
    if args.baseline:
        sides.append(("baseline", reader_of(load_baseline(args.baseline), files[0])))
    sides.append(("raylstm reader", reader_of(raylstm.sources, files[0])))
    print(f"raylstm.sources from {os.path.dirname(raylstm.sources.__file__)}; baseline {args.baseline}")
    print(f"{'file':<16} {'MB':>7} {'side':<16} {'s':>7} {'MB/s':>7} {'rows/s':>10} {'rows':>10}")
    for path in files:
        mb = path.stat().st_size / 1e6
        for name, fn in sides:
            s, rows = best_of(fn, path, args.repeats)
            print(f"{path.name:<16} {mb:7.1f} {name:<16} {s:7.2f} {mb / s:7.1f} {rows / s:10,.0f} {rows:10,}")


if __name__ == "__main__":
    main()
