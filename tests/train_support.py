"""Helpers shared by the training tests: real review text (or the demo corpus) as ready window datasets."""

from __future__ import annotations

import csv
import functools
import gzip
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ray

from raylstm.config import Config, load_config
from raylstm.vocab import CharVocab

ROOT = Path(__file__).resolve().parents[1]
AMAZON_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"


def review_sources(tmp: Path | None = None, n_reviews: int = 1500) -> list[str]:
    """The first n reviews of the shared Musical Instruments CSV, written to a temp dir (the shared data is
    read, never copied into the project); [] (the bundled demo corpus) where the shared data is absent.
    Cached per n so every test module trains on the same file (and the same cached windows)."""
    return list(_review_sources(n_reviews))


@functools.lru_cache(maxsize=4)
def _review_sources(n_reviews: int) -> tuple[str, ...]:
    if not AMAZON_CSV.exists():
        return ()
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="raylstm-reviews-")) / "reviews.csv"
    with gzip.open(AMAZON_CSV, "rt", newline="") as f, open(out, "w", newline="") as g:
        reader, writer = csv.reader(f), csv.writer(g)
        for i, row in enumerate(reader):
            writer.writerow(row)
            if i >= n_reviews:
                break
    return (str(out),)


@dataclass
class Windows:
    cfg: Config
    vocab: CharVocab
    train: ray.data.Dataset  # rows {"ids"}: segments of segment_windows windows of seq_len + 1 ids
    val: ray.data.Dataset  # rows {"text"}: the val reviews, scored whole during training
    val_windows: ray.data.Dataset  # the val reviews as windows (what seed mode validates on)
    n_train: int
    n_val_chars: int  # characters the val reviews give predictions for (each review + "\\n")
    unigram_bits: float  # entropy of the val text's own character distribution (bits per char)


def make_windows(sources: list[str], seq_len: int = 64, segment_windows: int = 1) -> Windows:
    """Splits + materialized training rows; cached per session (tests share them across modules)."""
    return _make_windows(tuple(sources), seq_len, segment_windows)


@functools.lru_cache(maxsize=4)
def _make_windows(sources: tuple[str, ...], seq_len: int, segment_windows: int) -> Windows:
    from raylstm.data import load_splits, window_dataset

    # Dedupe is off: the subset has no repeated texts and the group-by costs tens of seconds on 2 cores.
    cfg = tiny_config(sources=sources, seq_len=seq_len)
    cfg.data.segment_windows = segment_windows
    splits = load_splits(cfg.data)
    train = window_dataset(splits.train, splits.vocab, cfg.data).materialize()
    val = splits.val.select_columns(["text"]).materialize()
    val_windows = window_dataset(splits.val, splits.vocab, tiny_config(seq_len=seq_len).data).materialize()
    counts = Counter()
    for row in val.take_all():
        counts.update(row["text"] + "\n")
    total = sum(counts.values())
    h = -sum(n / total * math.log2(n / total) for n in counts.values())
    return Windows(cfg, splits.vocab, train, val, val_windows, train.count(), total, h)


def tiny_config(
    sources: list[str] | None = None, seq_len: int = 64, segment_windows: int = 1, **train: object
) -> Config:
    """A small, fast model: one 128-unit layer, 64-char windows, 2 workers of 0.5 CPU."""
    cfg = load_config(
        None,
        [
            f"data.seq_len={seq_len}",
            "data.dedupe=false",
            "data.shuffle_buffer=256",
            "model.embed_dim=32",
            "model.hidden_size=128",
            "model.num_layers=1",
            "model.dropout=0.0",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.batch_size=32",
            "train.lr=5e-3",
            "train.warmup_steps=10",
            "train.max_steps=150",
            "train.log_every=10",
            "train.eval_every=50",
            "train.sample_chars=60",
            "train.max_failures=0",
        ],
    )
    cfg.data.sources = list(sources or [])
    cfg.data.segment_windows = segment_windows
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def tiny_cli_sets(steps: int, **extra: object) -> list[str]:
    """`--set` flags for a tiny `raylstm train` run through the CLI (cluster-path tests: jobs, `ray up`),
    where the path is under test, not learning: a 32-unit LSTM, 32-char windows, 2 evaluations."""
    sets = {
        "model.hidden_size": 32,
        "model.embed_dim": 16,
        "model.num_layers": 1,
        "data.seq_len": 32,
        "train.batch_size": 8,
        "train.cpus_per_worker": 0.5,
        "train.max_steps": steps,
        "train.eval_every": steps // 2,
        "train.warmup_steps": 2,
        "train.sample_chars": 40,
        **extra,
    }
    return [flag for k, v in sets.items() for flag in ("--set", f"{k}={v}")]


def wait_for(pred, timeout: float, what: str, poll: float = 0.1):
    """Poll pred() until it returns something truthy; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def metrics_lines(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    # The callback may be mid-write: ignore a partial last line.
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
