"""Review sources -> cleaned, deduplicated, split Parquet shards + vocabulary -> encoded training windows.

Raw sources go through two passes that never hold the corpus in memory or in the object store:

    pass 1 (Ray Data, streaming)  sources.read_files -> per block of SPILL_BATCH_ROWS rows, in the read
              task itself (one per file) when there are at least as many files as CPUs (`_pass1_in_read`):
        clean    text.clean_column (Arrow kernels; clean_text for the rows that need it)
        reject   too short / empty / unverified rows get a reason; counts by reason and by file
        hash     64-bit blake2b of the cleaned text; fine bucket = its top 12 bits
        spill    the good rows, sorted by fine bucket, to one Arrow IPC file under OUT/_work/
        -> one small summary row per batch (the file, rows and text bytes per fine bucket, the counts)
    plan      contiguous fine-bucket ranges of ~GROUP_BYTES of text each = groups (as many as the corpus
              needs, so a group's memory does not grow with the corpus)
    pass 2 (one Ray task per group)  read its rows from every spill file (memory-mapped, copied out) ->
        dedupe   sort by (hash, key, source, row); keep the first of each run of equal hash whose texts
                 are equal (texts are compared, so a hash collision never drops a review): the smallest
                 (key, source, row) per distinct text wins, whatever the block or file order
        split    split_of(key): a stable hash, the same on every run, block count and machine
        write    OUT/{train,val,test}/part-GGGGG.parquet; rows/chars per split and the train split's
                 character counts come back to the driver
    vocab     CharVocab.from_counts of the summed counts

Counts (the manifest) are exact sums of per-batch and per-group figures. A directory with manifest.json
(written by `raylstm prepare`) is read back as Parquet + vocab.json with no re-cleaning; raw sources given
to `load_splits` are prepared into a work directory first and read back the same way.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from raylstm import storage
from raylstm.conditions import ConditionVocab, field_value
from raylstm.config import DataConfig
from raylstm.sources import BAD_REASONS, DataError, ReadOptions, read_files, read_parquet, resolve_files
from raylstm.text import EOR, clean_column, clean_text, join_title
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
# Pass 1 works on batches of this many rows (~20 MB of review text): each writes one spill file, and a
# pass-2 group reads a slice of every spill file, so fewer, larger files mean fewer reads.
SPILL_BATCH_ROWS = 32_768
FINE_BITS = 12  # 4096 fine buckets: groups are cut at fine-bucket boundaries to within ~1/4096 of the text
SPILL_CHUNK_ROWS = 8192  # record batches in a spill file: a remote (s3://) reader fetches only its slices
# Text per pass-2 group: its memory (the rows, their sort, the output tables) is a few times this, and
# does not grow with the corpus; several groups per core keep both cores busy. 24 MB: what MIN_GROUPS
# already gives a 100 MB corpus, so from 100 MB up every corpus is cut into groups of the same size and
# pass 2's two concurrent tasks hold the same memory (at 48 MB they held ~0.7 GiB each from 1 GB on, at
# 24 MB ~0.5 GiB, pass 2 no slower: bench/REPORT.md "Scale").
GROUP_BYTES = 24 << 20
MIN_GROUPS = 4
WORK_DIR = "_work"  # spill files, under the output directory (visible wherever the output is)
# Prepared shards: one Parquet file per split per group (~GROUP_BYTES of text, ~20 MB zstd), row groups of
# 16k reviews (~10 MB of text): a streaming reader holds one row group per read task, so a small object
# store feeds training; the rows are in hash order, i.e. already shuffled across files and categories.
SHARD_ROW_GROUP = 16_384
SHARD_COMPRESSION = "zstd"


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


def split_column(keys: list[str], val_fraction: float, test_fraction: float) -> np.ndarray:
    """`split_of` of every key, as a numpy array of "train" | "val" | "test": the same answers (the same
    blake2b, and numpy's uint64 -> float64 rounds as Python's int -> float does), without a Python call and
    three comparisons per key."""
    b2b = hashlib.blake2b
    digests = b"".join([b2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest() for k in keys])
    u = np.frombuffer(digests, dtype=">u8").astype(np.float64) / 2.0**64
    return np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))


# --- pass 1: clean, count, hash, spill (per batch, in Ray Data tasks) ----------------------------------
def _clean_batch(batch: pa.Table, cfg: DataConfig) -> tuple[pa.Table, Counter]:
    """(good rows with cleaned text, rows per reason: "" = good). Vectorised over the batch."""
    counts = Counter(batch.column("reason").drop_null().to_pylist())  # the reader's reasons (bad rows)
    parsed = pc.is_null(batch.column("reason"))
    good = batch.filter(parsed)
    text = clean_column(good.column("text"), cfg.lowercase, cfg.ascii_only)
    if cfg.include_title:
        titles = good.column("title").to_pylist()
        bodies = text.to_pylist()
        text = pa.array(
            [
                join_title(clean_text(t, cfg.lowercase, cfg.ascii_only), b) if t else b
                for t, b in zip(titles, bodies)
            ],
            pa.string(),
        )
    length = pc.utf8_length(text).to_numpy()
    why = np.where(length == 0, "empty_after_clean", np.where(length < cfg.min_chars, "too_short", ""))
    if cfg.verified_only:
        unverified = pc.fill_null(pc.equal(good.column("verified"), False), False).to_numpy(
            zero_copy_only=False
        )
        why = np.where((why == "") & unverified, "unverified", why)  # rows without the flag are kept
    values, n = np.unique(why, return_counts=True)  # the parsed rows' reasons ("" = kept)
    counts.update({str(v): int(c) for v, c in zip(values, n)})
    keep = pa.array(why == "")
    good = good.set_column(good.schema.get_field_index("text"), "text", text).filter(keep)
    return good, counts


def text_hash(texts: pa.Array) -> np.ndarray:
    """64-bit blake2b of each text's UTF-8 bytes (uint64): the dedupe and bucketing key."""
    binary = pc.cast(texts, pa.binary()).to_pylist()
    digests = b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in binary)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def _spill_batch(batch: pa.Table, cfg: DataConfig, work: str, fs: pafs.FileSystem) -> pa.Table:
    """Pass 1 for one batch: clean, count, hash; write the good rows sorted by fine bucket to one spill
    file; return one summary row."""
    good, counts = _clean_batch(batch, cfg)
    per_source = pc.value_counts(batch.column("source"))
    sources = dict(
        zip(per_source.field("values").to_pylist(), per_source.field("counts").to_pylist(), strict=True)
    )
    path = ""
    n_fine = 1 << FINE_BITS
    rows = np.zeros(n_fine, np.int64)
    text_bytes = np.zeros(n_fine, np.int64)
    if good.num_rows:
        h = text_hash(good.column("text"))
        fine = (h >> np.uint64(64 - FINE_BITS)).astype(np.int64)
        order = np.argsort(fine, kind="stable")
        keep = [c for c in good.column_names if c not in ("title", "reason")]
        table = good.select(keep).take(pa.array(order)).append_column("hash", pa.array(h[order]))
        fine = fine[order]
        rows = np.bincount(fine, minlength=n_fine)
        text_bytes = np.bincount(
            fine, weights=pc.binary_length(table.column("text")).to_numpy(), minlength=n_fine
        )
        path = f"{work}/{uuid.uuid4().hex}.arrow"
        with fs.open_output_stream(path) as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=SPILL_CHUNK_ROWS)
    return pa.table(
        {
            "path": [path],
            # per fine bucket, as raw int64 bytes: a list column would reach the driver as 4096 Python
            # ints per spill file (~0.3 MB each, ~70 MB at 4 GB of text), bytes as one 32 KB object
            "rows": [rows.astype(np.int64).tobytes()],
            "text_bytes": [np.asarray(text_bytes, np.int64).tobytes()],
            "reasons": [json.dumps(counts)],
            "sources": [json.dumps(sources)],
        }
    )


# --- plan: fine buckets -> groups ----------------------------------------------------------------------
def plan_groups(text_bytes: np.ndarray, target: int, min_groups: int = 1) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) fine-bucket ranges of about `target` text bytes each (at least `min_groups`
    when there are that many non-empty buckets). Depends only on the per-bucket totals, so on the corpus,
    never on how it was split into blocks."""
    total = int(text_bytes.sum())
    if total == 0:
        return []
    n = max(min_groups, -(-total // target))
    bounds = np.searchsorted(np.cumsum(text_bytes), [total * k / n for k in range(1, n)], side="left") + 1
    edges = sorted({0, *(int(b) for b in bounds), len(text_bytes)})
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if text_bytes[lo:hi].sum() > 0]


# --- pass 2: one group -> dedupe, split, write ---------------------------------------------------------
def _read_slices(fs: pafs.FileSystem, slices: list[tuple[str, int, int]]) -> pa.Table:
    """Rows [start, end) of each spill file, reading only the record batches that hold them. Each slice is
    copied out (take) and its file unmapped before the next: the pages a read touches in a memory-mapped
    file count in this process's memory until the map closes, and with zero-copy slices of every spill
    file held to the end, one 24 MB group's read had up to ~0.7 GiB of mapped pages at 4 GB of text
    (224 spill files; bench/REPORT.md "Scale"); copied, the group costs its own rows."""
    parts = []
    for path, start, end in slices:
        src = pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)
        with src:
            reader = pa.ipc.open_file(src)
            first, last = start // SPILL_CHUNK_ROWS, (end - 1) // SPILL_CHUNK_ROWS
            chunk = pa.Table.from_batches([reader.get_batch(i) for i in range(first, last + 1)])
            rows = pa.array(np.arange(start - first * SPILL_CHUNK_ROWS, end - first * SPILL_CHUNK_ROWS))
            parts.append(chunk.take(rows))
    return pa.concat_tables(parts)


def dedupe_sorted(table: pa.Table) -> pa.Table:
    """One row per distinct text of `table` (rows {text, hash, key, source, row, ...}): the smallest
    (key, source, row), compared as texts, so equal hashes of different texts (a collision) keep both."""
    table = table.take(
        pc.sort_indices(
            table,
            sort_keys=[
                ("hash", "ascending"),
                ("key", "ascending"),
                ("source", "ascending"),
                ("row", "ascending"),
            ],
        )
    )
    h = table.column("hash").to_numpy()
    same_hash = np.flatnonzero(h[1:] == h[:-1]) + 1  # rows whose predecessor has their hash
    if same_hash.size == 0:
        return table
    text = table.column("text")
    same_text = pc.equal(text.take(pa.array(same_hash)), text.take(pa.array(same_hash - 1)))
    drop = np.zeros(table.num_rows, bool)
    if pc.all(same_text).as_py():
        drop[same_hash] = True  # every run of equal hash is one text: keep its first (smallest) row
    else:
        # A collision somewhere: within each run of equal hash, keep the first row of each distinct text.
        run_start = np.concatenate([[True], h[1:] != h[:-1]])
        run_id = np.cumsum(run_start)
        texts = text.to_pylist()
        for run in np.unique(run_id[same_hash]):
            seen: set[str] = set()
            for i in np.flatnonzero(run_id == run):
                drop[i] = texts[i] in seen
                seen.add(texts[i])
    return table.filter(pa.array(~drop))


CHAR_COUNT_ROWS = 4096  # non-ASCII rows decoded at a time (4 bytes per character while counted)


def char_counts_column(texts: pa.Array) -> dict[str, int]:
    """Character -> count over a string array (no nulls). In UTF-8 a byte below 128 is always an ASCII
    character and never part of another, so one bincount over the array's own byte buffer (no copy) counts
    every ASCII character of every row; the rows holding other characters are then decoded a few thousand at
    a time to count those (code points >= 128) only."""
    if len(texts) == 0:
        return {}
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], width)[texts.offset : texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    body = (
        np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    )
    per_byte = np.bincount(body, minlength=256)
    counts: Counter = Counter({chr(c): int(per_byte[c]) for c in np.flatnonzero(per_byte[:128])})
    if per_byte[128:].any():
        rest = texts.filter(pc.invert(pc.string_is_ascii(texts)))
        for i in range(0, len(rest), CHAR_COUNT_ROWS):
            joined = "".join(rest.slice(i, CHAR_COUNT_ROWS).to_pylist())
            codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            per_code = np.bincount(codes[codes >= 128])
            counts.update({chr(int(c)): int(per_code[c]) for c in np.flatnonzero(per_code)})
    return dict(counts)


def _write_group(
    slices: list[tuple[str, int, int]], group: int, cfg: DataConfig, root: str, fs: pafs.FileSystem
) -> dict:
    """Pass 2 for one group: dedupe, split, write one shard per split; returns its counts."""
    import pyarrow.parquet as pq

    table = _read_slices(fs, slices)
    cleaned = table.num_rows
    if cfg.dedupe:
        table = dedupe_sorted(table)
    else:
        table = table.take(pc.sort_indices(table, sort_keys=[("hash", "ascending"), ("key", "ascending")]))
    splits = split_column(table.column("key").to_pylist(), cfg.val_fraction, cfg.test_fraction)
    out = {"cleaned": cleaned, "splits": {}, "chars": {}}
    for split in SPLITS:
        part = table.filter(pa.array(splits == split)).select(OUT_COLUMNS).cast(OUT_SCHEMA)
        n_chars = int(pc.sum(pc.utf8_length(part.column("text"))).as_py() or 0)
        out["splits"][split] = {"rows": part.num_rows, "chars": n_chars}
        if split == "train":
            out["chars"] = char_counts_column(part.column("text").combine_chunks())
        if part.num_rows:
            pq.write_table(
                part,
                f"{root}/{split}/part-{group:05d}.parquet",
                filesystem=fs,
                row_group_size=SHARD_ROW_GROUP,
                compression=SHARD_COMPRESSION,
                use_dictionary=False,  # unique texts and keys: a dictionary never pays
            )
    return out


def char_counts(text: str) -> dict[str, int]:
    """Character -> count, vectorised (bincount over code points; ~20x faster than Counter(str))."""
    if not text:
        return {}
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    counts = np.bincount(codes)
    nz = np.flatnonzero(counts)
    return {chr(int(c)): int(counts[c]) for c in nz}


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


def load_splits(
    cfg: DataConfig, override_num_blocks: int | None = None, work_dir: str | None = None
) -> ReviewSplits:
    """The train/val/test splits of `cfg.sources`: a prepared dir is read back as it is; raw sources (or
    the demo corpus) are prepared into `work_dir` first (default: a local temporary directory removed
    when this process exits; on a multi-node cluster give one every node sees, e.g. s3://...)."""
    from raylstm.prepare import prepare

    sources = list(cfg.sources) or [str(DEMO_CORPUS)]
    if is_prepared_dir(sources):
        return _load_prepared(sources[0])
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="raylstm-prepared-")
        atexit.register(shutil.rmtree, work_dir, True)
    prepare(dataclasses.replace(cfg, sources=sources), work_dir, override_num_blocks=override_num_blocks)
    return _load_prepared(work_dir)


def build_splits(
    cfg: DataConfig, sources: list[str], out_dir: str, override_num_blocks: int | None = None
) -> tuple[dict, CharVocab]:
    """Read, clean, dedupe and split `sources` into Parquet shards under out_dir/{train,val,test}/ (the
    two passes of the module docstring); returns (manifest, vocab). Nothing else is written."""
    try:
        return _build_splits(cfg, sources, out_dir, override_num_blocks)
    except Exception as e:
        err = _unwrap_data_error(e)
        if err is not None and err is not e:
            raise err from None
        raise


def _build_splits(
    cfg: DataConfig, sources: list[str], out_dir: str, override_num_blocks: int | None
) -> tuple[dict, CharVocab]:
    fs, root = storage.resolve(out_dir)
    work = f"{root}/{WORK_DIR}"
    fs.create_dir(work, recursive=True)
    for split in SPLITS:
        fs.create_dir(f"{root}/{split}", recursive=True)
    try:
        t0 = time.perf_counter()
        found = resolve_files(sources)
        opts = dataclasses.replace(ReadOptions.from_config(cfg), rows_per_block=SPILL_BATCH_ROWS)
        spill = functools.partial(_spill_batch, cfg=cfg, work=work, fs=fs)
        if _pass1_in_read(len(found)):
            # One read task per file (unless the caller asks otherwise), each spilling every block it
            # parses before it parses the next: only summary rows leave the task.
            n_blocks = override_num_blocks or len(found)
            pass1, files = read_files(found, opts, n_blocks, per_block=spill)
        else:
            rows, files = read_files(found, opts, override_num_blocks)
            pass1 = rows.map_batches(spill, batch_format="pyarrow", batch_size=SPILL_BATCH_ROWS)
        summaries = pass1.take_all()
        t1 = time.perf_counter()
        reasons = _sum_json(summaries, "reasons")
        per_source = _sum_json(summaries, "sources")
        spills = [
            {
                **s,
                "rows": np.frombuffer(s["rows"], np.int64),
                "text_bytes": np.frombuffer(s["text_bytes"], np.int64),
            }
            for s in summaries
            if s["path"]
        ]
        spills.sort(key=lambda s: s["path"])
        bucket_bytes = sum((s["text_bytes"] for s in spills), np.zeros(1 << FINE_BITS, np.int64))
        # At least MIN_GROUPS groups (both cores busy on a mid-sized corpus), but none under ~4 MB (a tiny
        # corpus is one group). Independent of the cluster, so the same corpus gives the same shards anywhere.
        min_groups = max(1, min(MIN_GROUPS, int(bucket_bytes.sum()) >> 22))
        groups = plan_groups(bucket_bytes, GROUP_BYTES, min_groups)
        offsets = [np.concatenate([[0], np.cumsum(s["rows"])]) for s in spills]
        task = ray.remote(num_cpus=1)(_write_group)
        refs = []
        for g, (lo, hi) in enumerate(groups):
            slices = [(s["path"], int(o[lo]), int(o[hi])) for s, o in zip(spills, offsets) if o[hi] > o[lo]]
            refs.append(task.remote(slices, g, cfg, root, fs))
        results = ray.get(refs)
        t2 = time.perf_counter()
        work_bytes = sum(i.size for i in fs.get_file_info(pafs.FileSelector(work)))
    finally:
        fs.delete_dir(work)

    split_stats = {s: {"rows": 0, "chars": 0} for s in SPLITS}
    train_chars: Counter = Counter()
    for r in results:
        for s, v in r["splits"].items():
            split_stats[s]["rows"] += v["rows"]
            split_stats[s]["chars"] += v["chars"]
        train_chars.update(r["chars"])
    vocab = build_vocab(dict(train_chars), split_stats["train"]["rows"], cfg.min_char_count)

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
        "work_bytes": work_bytes,  # written once to OUT/_work by pass 1, read once by pass 2, deleted
        "work_files": len(spills),  # one per block of SPILL_BATCH_ROWS rows holding a good row
        # where the time went: pass 1 (read, parse, clean, hash, spill), pass 2 (dedupe, split, write)
        "phase_seconds": {"read_clean_spill": round(t1 - t0, 3), "dedupe_split_write": round(t2 - t1, 3)},
        "config": _config_dict(cfg),
    }
    return manifest, vocab


def _pass1_in_read(n_files: int) -> bool:
    """Whether pass 1 runs inside the read tasks (`ReviewDatasource(per_block=...)`): each task cleans,
    hashes and spills every block of SPILL_BATCH_ROWS rows as it parses it, so a task holds one block and
    parsed rows never go through the object store. A separate map_batches cannot promise that in Ray
    2.60: a read is not fused with a map that asks for a batch size (`_can_fuse_map_ops`), nor with any
    map once Ray Data splits the read's output to reach read_op_min_num_blocks=200
    (`get_additional_split_factor() > 1`, operator_fusion.py; it did from ~100 MB, bench/REPORT.md
    "Scale"), and a fused read coalesces its blocks up to target_max_block_size (128 MiB) before the map
    sees them. With fewer files than CPUs, one task per file would leave CPUs idle (gzip is not
    splittable), so then the read and the spill map stay two stages that overlap. The output does not
    depend on the choice (pass 2 sorts)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return n_files >= cpus


def _config_dict(cfg: DataConfig) -> dict:
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


def window_bytes(cfg: DataConfig, split: dict, n_conditions: int = 0) -> int:
    """Bytes of the encoded rows `window_dataset` makes of a split of {"rows", "chars"} (the manifest's
    figures): the stream is every review + "\n", a row of `width` int32 ids every `stride` ids, and with
    conditions an int16 per id per field. What materializing them would hold in the object store."""
    width, stride = window_shape(cfg)
    stream = int(split["chars"]) + int(split["rows"])
    return (stream // stride) * width * (4 + 2 * n_conditions)


def stream_rows(texts: list[str], vocab: CharVocab, width: int, stride: int) -> np.ndarray:
    """Reviews -> one stream (each review + "\\n") -> rows of `width` ids every `stride` ids, int32 [N, width].

    The tail shorter than a row is dropped. Pure numpy: the Ray Data map below and the benchmarks call it.
    """
    ids = vocab.encode(EOR.join(texts) + EOR) if texts else np.zeros(0, np.int32)
    if ids.size < width:
        return np.zeros((0, width), np.int32)
    view = np.lib.stride_tricks.sliding_window_view(ids, width)[::stride]
    return np.ascontiguousarray(view, dtype=np.int32)


def stream_condition_rows(
    texts: list[str], cond_ids: np.ndarray, vocab: CharVocab, width: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """`stream_rows` plus, for every id of every row, the condition ids of the review it belongs to:
    (ids int32 [N, width], cond int16 [N, width, F]) from reviews and their condition ids [n_reviews, F].

    A review's characters and the "\\n" that ends it carry its conditions. The training loop reads a
    window's conditions beside its targets (cond[:, 1:], as y = ids[:, 1:]): the input "\\n" that ends one
    review is read with the conditions of the review it starts, whose first character it predicts.

        stream   |I loved it.\\n|Broke in a week.\\n|
        cond     |5 5 5 ... 5 5|1 1 1 .......... 1 1|
    """
    ids = stream_rows(texts, vocab, width, stride)
    F = cond_ids.shape[1] if cond_ids.ndim == 2 else 0
    if not len(ids):
        return ids, np.zeros((0, width, F), np.int16)
    lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    per_id = np.repeat(np.asarray(cond_ids, dtype=np.int16), lengths, axis=0)  # [stream length, F]
    view = np.lib.stride_tricks.sliding_window_view(per_id, width, axis=0)[::stride][: len(ids)]
    return ids, np.ascontiguousarray(view.transpose(0, 2, 1), dtype=np.int16)


def _windows(
    batch: pa.Table, vocab: CharVocab, width: int, stride: int, conditions: ConditionVocab | None = None
) -> dict[str, np.ndarray]:
    texts = batch.column("text").to_pylist()
    if conditions is None:
        return {"ids": stream_rows(texts, vocab, width, stride)}
    cond = conditions.encode_rows({f: batch.column(f).to_pylist() for f in conditions.fields})
    ids, cond_rows = stream_condition_rows(texts, cond, vocab, width, stride)
    return {"ids": ids, "cond": cond_rows}


def _condition_summary(batch: pa.Table, fields: tuple[str, ...]) -> dict[str, list]:
    """One summary row per block: counts of the joint condition values of its reviews."""
    cols = [[field_value(f, v) for v in batch.column(f).to_pylist()] for f in fields]
    counts = Counter(zip(*cols)) if cols else Counter()
    return {"counts": [json.dumps([[list(k), n] for k, n in counts.items()])]}


def condition_vocab(train_ds: ray.data.Dataset, fields: list[str] | tuple[str, ...]) -> ConditionVocab:
    """The condition vocabulary of a training split (its rating/category columns), from per-block counts
    summed on the driver: the corpus is never collected."""
    fields = tuple(fields)
    missing = [f for f in fields if f not in train_ds.schema().names]
    if missing:
        raise ValueError(
            f"model.conditions asks for {missing}, which the training split has no column for "
            f"(its columns: {train_ds.schema().names}); prepare the data again with this version"
        )
    rows = (
        train_ds.select_columns(list(fields))
        .map_batches(
            _condition_summary, fn_kwargs={"fields": fields}, batch_format="pyarrow", batch_size=None
        )
        .take_all()
    )
    joint: Counter = Counter()
    for r in rows:
        for k, n in json.loads(r["counts"]):
            joint[tuple(k)] += n
    return ConditionVocab.from_counts(fields, joint)


def window_dataset(
    text_ds: ray.data.Dataset,
    vocab: CharVocab,
    cfg: DataConfig,
    batch_rows: int = BATCH_ROWS,
    conditions: ConditionVocab | None = None,
) -> ray.data.Dataset:
    """Encoded training rows, streamed: rows {"ids": int32[width]} (see `window_shape`), and with
    `conditions` also {"cond": int16[width, F]}: each id's review's condition ids (`stream_condition_rows`).

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
        fn_kwargs={"vocab": vocab, "width": width, "stride": stride, "conditions": conditions},
        batch_format="pyarrow",
        batch_size=batch_rows,
    )
