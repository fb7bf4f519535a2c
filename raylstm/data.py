"""Review sources -> cleaned, deduplicated, split text -> vocabulary -> encoded training windows.

    sources.read_reviews          rows {text, title, key, rating, verified, category, source, row, reason}
      -> clean (map_batches)      text.clean_text; too short / unverified rows get a reason
      -> dedupe (groupby text)    one row per distinct cleaned text: the smallest (key, source, row)
      -> split (map_batches)      split_of(key): a stable hash, so the same on every run and block count
      -> vocab                    per-block char counts of the train split, summed; CharVocab.from_counts
      -> window_dataset           encode + "\\n" per review, concatenate, cut seq_len+1 windows

Counts (manifest) are aggregated from per-block summaries computed by Ray tasks, so they are exact and the
corpus is never collected on the driver. A directory written by `raylstm prepare` (it has manifest.json)
is read back as Parquet + vocab.json with no re-cleaning.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.aggregate import Min

from raylstm import storage
from raylstm.config import DataConfig
from raylstm.ray_env import task_based_shuffle
from raylstm.sources import BAD_REASONS, DataError, ReadOptions, read_parquet, read_reviews
from raylstm.text import EOR, clean_text, join_title, reject_reason
from raylstm.vocab import CharVocab

DEMO_CORPUS = Path(__file__).resolve().parent / "demo" / "reviews_demo.json.gz"
SPLITS = ("train", "val", "test")
# Columns of the split datasets and the prepared shards: the text and its key (the split), and what later
# stages condition or group on: rating and category (a conditioned model), verified, and source (the file a
# review came from: per-file figures are a group-by over a split already read, raylstm.evaluate).
OUT_COLUMNS = ["text", "key", "rating", "verified", "category", "source"]
OUT_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("key", pa.string()),
        ("rating", pa.float64()),
        ("verified", pa.bool_()),
        ("category", pa.string()),
        ("source", pa.string()),
    ]
)
BATCH_ROWS = 4096  # large batches: on 2 cores, per-task overhead dominates small ones


@dataclass
class ReviewSplits:
    train: ray.data.Dataset  # rows of OUT_COLUMNS: cleaned review text, its key, rating, verified, ...
    val: ray.data.Dataset
    test: ray.data.Dataset
    vocab: CharVocab  # from the train split's aggregated char counts (cfg.min_char_count), "\n" included
    # {"splits": {split: {"rows", "chars"}}, "skipped": {reason: n}, "rows": {"records", "parsed",
    #  "cleaned", "kept"}, "files": [{"path", "size"}], "config": {...}}
    manifest: dict


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """ "train" | "val" | "test" from a stable hash of the review key (blake2b, not Python's salted hash)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    u = h / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# --- per-batch functions (run in Ray tasks) ------------------------------------------------------------
def _clean_batch(batch: pa.Table, cfg: DataConfig) -> pa.Table:
    texts = batch.column("text").to_pylist()
    titles = batch.column("title").to_pylist()
    verified = batch.column("verified").to_pylist()
    reasons = batch.column("reason").to_pylist()
    out_text = []
    for i, raw in enumerate(texts):
        if reasons[i] is not None:
            out_text.append(None)
            continue
        text = clean_text(raw, cfg.lowercase, cfg.ascii_only)
        if cfg.include_title and titles[i]:
            text = join_title(clean_text(titles[i], cfg.lowercase, cfg.ascii_only), text)
        reason = reject_reason(text, cfg.min_chars)
        if reason is None and cfg.verified_only and verified[i] is False:
            reason = "unverified"  # rows whose format records no verified flag are kept
        reasons[i] = reason
        out_text.append(text if reason is None else None)
    batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(out_text, pa.string()))
    return batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))


def _reason_summary(batch: pa.Table) -> dict[str, list]:
    """One summary row per block: counts of rows by reason ("" = good) and by source file."""
    reasons = Counter(r or "" for r in batch.column("reason").to_pylist())
    sources = Counter(batch.column("source").to_pylist())
    return {"reasons": [json.dumps(reasons)], "sources": [json.dumps(sources)]}


def _only_good(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("reason")))


_SEP = "\x1f"  # ASCII unit separator: joins the fields of a dedupe candidate into one sortable string


def _dedupe_candidates(batch: pa.Table) -> pa.Table:
    """Rows -> {text, w}: w = "key<US>source<US>row<US>rating<US>verified<US>category", so min(w) per text
    picks the smallest (key, source, row) whichever block or order it arrives in, using a vectorised Ray
    aggregation, and the winner's other columns come with it. Only the key may hold a <US> (it is split off
    from the right); one in a source or category becomes a space."""
    row = pc.utf8_lpad(pc.cast(batch.column("row"), pa.string()), 12, "0")
    rating = pc.fill_null(pc.cast(batch.column("rating"), pa.string()), "")
    verified = pc.fill_null(pc.cast(pc.cast(batch.column("verified"), pa.int8()), pa.string()), "")
    source = pc.replace_substring(batch.column("source"), _SEP, " ")
    category = pc.fill_null(pc.replace_substring(batch.column("category"), _SEP, " "), "")
    w = pc.binary_join_element_wise(batch.column("key"), source, row, rating, verified, category, _SEP)
    return pa.table({"text": batch.column("text"), "w": w})


def _dedupe_winners(batch: pa.Table) -> pa.Table:
    cols: dict[str, list] = {"key": [], "rating": [], "verified": [], "category": [], "source": []}
    for w in batch.column(batch.column_names[1]).to_pylist():
        key, source, _row, rating, verified, category = w.rsplit(_SEP, 5)  # a key may hold anything
        cols["key"].append(key)
        cols["rating"].append(float(rating) if rating else None)
        cols["verified"].append(verified == "1" if verified else None)
        cols["category"].append(category or None)
        cols["source"].append(source)
    return pa.Table.from_pydict({"text": batch.column("text"), **cols}, schema=OUT_SCHEMA)


def _assign_split(batch: pa.Table, val_fraction: float, test_fraction: float) -> pa.Table:
    keys = batch.column("key").to_pylist()
    splits = [split_of(k, val_fraction, test_fraction) for k in keys]
    table = batch.select(OUT_COLUMNS)
    return table.append_column("split", pa.array(splits, pa.string()))


def _split_summary(batch: pa.Table) -> dict[str, list]:
    """Rows and chars per split, and the train split's character counts, for one block."""
    stats: dict[str, Any] = {}
    texts = batch.column("text").to_pylist()
    splits = batch.column("split").to_pylist()
    for s in SPLITS:
        stats[s] = {"rows": 0, "chars": 0}
    for t, s in zip(texts, splits):
        stats[s]["rows"] += 1
        stats[s]["chars"] += len(t)
    train_text = "".join(t for t, s in zip(texts, splits) if s == "train")
    return {"stats": [json.dumps(stats)], "chars": [json.dumps(char_counts(train_text))]}


def char_counts(text: str) -> dict[str, int]:
    """Character -> count, vectorised (bincount over code points; ~20x faster than Counter(str))."""
    if not text:
        return {}
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    counts = np.bincount(codes)
    nz = np.flatnonzero(counts)
    return {chr(int(c)): int(counts[c]) for c in nz}


def _select_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.filter(pc.equal(batch.column("split"), split)).select(OUT_COLUMNS)


def _sum_json(rows: list[dict], column: str) -> Counter:
    total: Counter = Counter()
    for r in rows:
        total.update(json.loads(r[column]))
    return total


# --- building splits -----------------------------------------------------------------------------------
def build_vocab(char_counts: dict[str, int], n_train_reviews: int, min_count: int) -> CharVocab:
    """CharVocab from aggregated counts; the end-of-review marker "\\n" is counted once per review and
    always included (the model must learn where reviews end)."""
    counts = dict(char_counts)
    counts[EOR] = counts.get(EOR, 0) + n_train_reviews
    vocab = CharVocab.from_counts(counts, min_count)
    if EOR not in vocab:
        vocab = CharVocab([*vocab.chars, EOR], {**vocab.counts, EOR: counts[EOR]})
    return vocab


def _unwrap_data_error(e: BaseException) -> BaseException | None:
    """Ray wraps errors raised in tasks; find our DataError (it names file and line) in the chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError keeps the original exception here
        if isinstance(cause, DataError) and type(cause) is DataError:
            return DataError(*cause.args)
        if type(e) is DataError:
            return e
        if isinstance(e, DataError):  # a Ray wrapper class derived from DataError
            m = re.search(r"DataError: (.+)", str(e))
            if m:
                return DataError(m.group(1))
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def is_prepared_dir(sources: list[str]) -> bool:
    """One source that is a directory written by `raylstm prepare` (it has manifest.json), local or URI."""
    return len(sources) == 1 and storage.exists(storage.join(sources[0], "manifest.json"))


def _load_prepared(root: str) -> ReviewSplits:
    manifest = storage.read_json(storage.join(root, "manifest.json"))
    vocab = CharVocab.from_dict(storage.read_json(storage.join(root, "vocab.json")))
    parts = {}
    for split in SPLITS:
        if manifest["splits"][split]["rows"] == 0:
            parts[split] = ray.data.from_arrow(OUT_SCHEMA.empty_table())
        else:
            parts[split] = read_parquet(storage.join(root, split))
    return ReviewSplits(parts["train"], parts["val"], parts["test"], vocab, manifest)


def load_splits(cfg: DataConfig, override_num_blocks: int | None = None) -> ReviewSplits:
    """Read, clean, dedupe and split `cfg.sources` (or read back a prepared dir, or the demo corpus).

    The returned split datasets are lazy views over one materialized, split-annotated dataset, so
    iterating them does not re-read or re-clean the sources.
    """
    sources = list(cfg.sources) or [str(DEMO_CORPUS)]
    if is_prepared_dir(sources):
        return _load_prepared(sources[0])
    try:
        with task_based_shuffle():
            return _build_splits(cfg, sources, override_num_blocks)
    except Exception as e:
        err = _unwrap_data_error(e)
        if err is not None and err is not e:
            raise err from None
        raise


def _build_splits(cfg: DataConfig, sources: list[str], override_num_blocks: int | None) -> ReviewSplits:
    rows, files = read_reviews(sources, ReadOptions.from_config(cfg), override_num_blocks)
    cleaned = rows.map_batches(
        _clean_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=BATCH_ROWS
    ).materialize()
    summaries = cleaned.map_batches(_reason_summary, batch_format="pyarrow", batch_size=None).take_all()
    reasons = _sum_json(summaries, "reasons")
    per_source = _sum_json(summaries, "sources")

    cleaned_rows_hint = reasons.get("", 0)
    good = cleaned.map_batches(_only_good, batch_format="pyarrow", batch_size=None)
    if cfg.dedupe:
        # Global exact dedupe: shuffle by text, keep min(candidate) per text. A vectorised aggregate, not
        # map_groups: one Python call per group cost ~4x more on 10k reviews.
        good = (
            good.map_batches(_dedupe_candidates, batch_format="pyarrow", batch_size=None)
            .groupby("text", num_partitions=_partitions(cleaned_rows_hint))
            .aggregate(Min("w"))
            .map_batches(_dedupe_winners, batch_format="pyarrow", batch_size=BATCH_ROWS)
        )
    split = good.map_batches(
        _assign_split,
        fn_kwargs={"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction},
        batch_format="pyarrow",
        batch_size=BATCH_ROWS,
    ).materialize()
    del cleaned  # the split dataset holds everything downstream needs

    sums = split.map_batches(_split_summary, batch_format="pyarrow", batch_size=None).take_all()
    split_stats = {s: {"rows": 0, "chars": 0} for s in SPLITS}
    for r in sums:
        for s, v in json.loads(r["stats"]).items():
            split_stats[s]["rows"] += v["rows"]
            split_stats[s]["chars"] += v["chars"]
    char_counts = _sum_json(sums, "chars")
    vocab = build_vocab(char_counts, split_stats["train"]["rows"], cfg.min_char_count)

    records = sum(reasons.values())
    parsed = records - sum(n for r, n in reasons.items() if r in BAD_REASONS)
    cleaned_rows = reasons.get("", 0)
    kept = sum(v["rows"] for v in split_stats.values())
    skipped = {r: n for r, n in sorted(reasons.items()) if r}
    if cleaned_rows - kept:
        skipped["duplicate"] = cleaned_rows - kept
    manifest = {
        "splits": split_stats,
        "skipped": skipped,
        "rows": {"records": records, "parsed": parsed, "cleaned": cleaned_rows, "kept": kept},
        "files": [
            {"path": f["path"], "size": f["size"], "records": per_source.get(f["source"], 0)} for f in files
        ],
        "vocab_size": len(vocab),
        "config": _config_dict(cfg),
    }
    parts = {
        s: split.map_batches(_select_split, fn_kwargs={"split": s}, batch_format="pyarrow", batch_size=None)
        for s in SPLITS
    }
    return ReviewSplits(parts["train"], parts["val"], parts["test"], vocab, manifest)


def _partitions(rows: int) -> int:
    # One shuffle partition per ~250k reviews: the default (hundreds) makes hundreds of tiny tasks,
    # which on a 2-core machine costs far more than the dedupe itself.
    return max(1, min(64, -(-rows // 250_000)))


def _config_dict(cfg: DataConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


# --- windows -------------------------------------------------------------------------------------------
def window_shape(cfg: DataConfig) -> tuple[int, int]:
    """(width, stride) in ids of one training row for `cfg`.

    full:  a row is a segment of segment_windows consecutive windows of seq_len+1 ids (each window shares
           its last id with the next): width segment_windows * seq_len + 1, stride segment_windows * seq_len.
    seed:  the original's windows of seed_context+1 ids every seed_step ids.
    """
    if cfg.window_mode == "full":
        if cfg.segment_windows < 1:
            raise ValueError(f"data.segment_windows must be >= 1, got {cfg.segment_windows}")
        return cfg.segment_windows * cfg.seq_len + 1, cfg.segment_windows * cfg.seq_len
    if cfg.window_mode == "seed":
        if cfg.segment_windows != 1:
            raise ValueError(
                "data.segment_windows > 1 (stateful BPTT) needs data.window_mode = 'full': seed windows "
                "overlap, so there is no stream to carry the state along"
            )
        return cfg.seed_context + 1, cfg.seed_step
    raise ValueError(f"data.window_mode must be 'full' or 'seed', got {cfg.window_mode!r}")


def stream_rows(texts: list[str], vocab: CharVocab, width: int, stride: int) -> np.ndarray:
    """Reviews -> one stream (each review + "\\n") -> rows of `width` ids every `stride` ids, int32 [N, width].

    The tail shorter than a row is dropped. Pure numpy: the Ray Data map below and the benchmarks call it.
    """
    ids = vocab.encode(EOR.join(texts) + EOR) if texts else np.zeros(0, np.int32)
    if ids.size < width:
        return np.zeros((0, width), np.int32)
    view = np.lib.stride_tricks.sliding_window_view(ids, width)[::stride]
    return np.ascontiguousarray(view, dtype=np.int32)


def _windows(batch: pa.Table, vocab: CharVocab, width: int, stride: int) -> dict[str, np.ndarray]:
    return {"ids": stream_rows(batch.column("text").to_pylist(), vocab, width, stride)}


def window_dataset(
    text_ds: ray.data.Dataset, vocab: CharVocab, cfg: DataConfig, batch_rows: int = BATCH_ROWS
) -> ray.data.Dataset:
    """Encoded training rows, streamed: rows {"ids": int32[width]} (see `window_shape`).

    full:  each review + "\\n", concatenated within a batch of reviews, cut into segments of
           segment_windows windows; x = ids[:-1], y = ids[1:] (every position supervised). The tail of each
           batch shorter than a segment is dropped (under one segment per 4096 reviews).

           reviews   |I loved it.\\n|Broke in a week.\\n|Works.\\n|Too loud.\\n| ...
           segment   [0 ...... T][T ...... 2T] ... [(n-1)T ..... nT]     n = segment_windows
           windows    window 0    window 1          window n-1    (each shares its last id with the next)

           A batch row of the training loop is one segment: its n windows are n consecutive optimizer
           steps, and the LSTM state at the end of window j is the initial state of window j+1.
           segment_windows = 1 gives independent windows.

    seed:  the original Keras samples: windows of seed_context+1 ids every seed_step ids; the model
           reads the first seed_context ids and predicts only the last one.
    """
    width, stride = window_shape(cfg)
    return text_ds.map_batches(
        _windows,
        fn_kwargs={"vocab": vocab, "width": width, "stride": stride},
        batch_format="pyarrow",
        batch_size=batch_rows,
    )
