"""`raylstm synth --out DIR --size 1GB`: a large synthetic review corpus in the real Amazon layouts, for
testing a machine or a cluster at scale.

    real reviews (SOURCES, default the demo corpus), train split only (data.split_of on each review key)
      -> sentences (split after . ! ?), minus every sentence that also occurs in a val/test review
      -> pool of P distinct sentences (distinct even lowercased and ASCII-folded) + "templates"
         (each real train review's sentence count, rating and title)
    synthetic review g (global ordinal; shard s writes g = s, s + shards, s + 2*shards, ...):
      template t = random real review: its rating, its title, max(2, its sentence count) sentences
      sentences 1 and 2 = a bijection of g onto pool x pool (so no two reviews share both),
      the others drawn uniformly from the pool; joined by one space
      -> layouts: json   Amazon Reviews 2023 JSON lines (.jsonl.gz): rating, title, text, images, asin,
                         parent_asin, user_id, timestamp, helpful_vote, verified_purchase
                  tsv    Amazon Customer Reviews v1_00 TSV (.tsv.gz), its 15 columns, no quoting
                  parquet the same dataset's Parquet (review_body, review_id, ...)
      DIR/_synth.json: seed, layout, per file the reviews and text bytes (a "_" name: readers skip it)

Why every text is unique, after cleaning too: every pool sentence ends in . ! or ? and holds no
". "-like break inside (before and after cleaning), so a review's sentence sequence can be read back
from its text; two reviews with different g differ in their first two sentences. Every review also has
its own user_id / review_id, so review keys are unique. Deterministic from the seed: the same arguments
write the same bytes. Text is built with Arrow kernels over the pool (no per-review Python) and each
shard is one Ray task, so both cores write and gzip (level 1) at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from isal import isal_zlib

LAYOUTS = ("json", "tsv", "parquet")
SUFFIX = {"json": ".jsonl.gz", "tsv": ".tsv.gz", "parquet": ".parquet"}
CATEGORIES = ("Musical_Instruments", "Books", "Electronics", "Home_and_Kitchen", "Toys_and_Games")
TSV_COLUMNS = (
    "marketplace",
    "customer_id",
    "review_id",
    "product_id",
    "product_parent",
    "product_title",
    "product_category",
    "star_rating",
    "helpful_votes",
    "total_votes",
    "vine",
    "verified_purchase",
    "review_headline",
    "review_body",
    "review_date",
)
MANIFEST = "_synth.json"  # "_": directory readers skip it, so it is never read as reviews
CHUNK_REVIEWS = 16_384  # reviews built per Arrow pass: big enough to amortise the kernels, ~10 MB of text
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_INNER_BREAK = re.compile(r"[.!?]\s")
_UNSAFE = re.compile(r"[\t\n\r<>\x00]")  # TSV-unsafe, or a tag that could span two sentences
# An odd multiplier near P^2 / golden ratio scatters consecutive ordinals over the pool.
_GOLDEN = 0.6180339887498949
_BASE36 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
_RATING_JSON = pa.array(["1.0", "2.0", "3.0", "4.0", "5.0"])


@dataclass(frozen=True)
class Pool:
    """What every shard needs from the real reviews (picklable; one ray.put)."""

    sentences: list[str]  # raw (uncleaned) sentences: cleaning has real work to do on them
    sentences_json: list[str]  # the same, JSON-escaped (without quotes), so JSON lines need no encoder
    template_sentences: np.ndarray  # int32 per real train review: its sentence count
    template_rating: np.ndarray  # float64 per real train review (NaN = none)
    titles: list[str]  # a title per template ("" = none)
    titles_json: list[str]


def parse_size(text: str) -> int:
    """'10MB', '1.5GB', '4096' (bytes) -> bytes (decimal units, as the issue's corpus sizes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"size must look like 100MB or 4GB, got {text!r}")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _usable(sentence: str) -> bool:
    from raylstm.text import clean_text

    if not 2 <= len(sentence) <= 2000 or _UNSAFE.search(sentence) or sentence[-1] not in ".!?":
        return False
    for cleaned in (clean_text(sentence), clean_text(sentence, lowercase=True, ascii_only=True)):
        if not cleaned or cleaned[-1] not in ".!?" or _INNER_BREAK.search(cleaned):
            return False
    return True


def build_pool(sources: list[str]) -> Pool:
    """Sentences and templates from the train split of real reviews (read through sources.py)."""
    from raylstm.config import DataConfig
    from raylstm.data import split_of
    from raylstm.sources import ReadOptions, read_reviews
    from raylstm.text import clean_text

    defaults = DataConfig()
    ds, _ = read_reviews(sources, ReadOptions())
    rows = ds.map_batches(
        lambda b: b.filter(pc.is_null(b.column("reason"))).select(["text", "title", "key", "rating"]),
        batch_format="pyarrow",
    )
    held_out: set[str] = set()
    reviews = []
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=4096):
        reviews.extend(zip(*(batch.column(c).to_pylist() for c in ("key", "text", "title", "rating"))))
    reviews.sort(key=lambda r: (r[0], r[1]))  # Ray Data's block order varies; the pool must not
    train: list[tuple[list[str], float | None, str]] = []
    for key, text, title, rating in reviews:
        parts = [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]
        if split_of(key, defaults.val_fraction, defaults.test_fraction) != "train":
            held_out.update(parts)
        else:
            train.append((parts, rating, title or ""))
    seen: set[str] = set()
    pool: list[str] = []
    for parts, _, _ in train:
        for s in parts:
            if s in held_out or s in seen or not _usable(s):
                continue
            seen.add(s)
            folded = clean_text(s, lowercase=True, ascii_only=True)
            if folded in seen:
                continue  # "Great." and "great." would merge under data.lowercase: keep one
            seen.add(folded)
            pool.append(s)
    if len(pool) < 100:
        raise ValueError(f"only {len(pool)} usable train-split sentences in {sources}: give more reviews")
    titles = [t if not _UNSAFE.search(t) else "" for _, _, t in train]
    return Pool(
        sentences=pool,
        sentences_json=_json_escaped(pool),
        template_sentences=np.array([max(2, len(p)) for p, _, _ in train], np.int32),
        template_rating=np.array([np.nan if r is None else r for _, r, _ in train], np.float64),
        titles=titles,
        titles_json=_json_escaped(titles),
    )


@dataclass(frozen=True)
class ShardSpec:
    index: int
    shards: int
    layout: str
    path: str
    text_bytes: int  # target: review text (UTF-8) this shard holds, at least
    seed: int


def _json_escaped(values: list[str]) -> list[str]:
    return [json.dumps(v, ensure_ascii=False)[1:-1] for v in values]


def _ids(prefix: str, g: np.ndarray, width: int) -> pa.Array:
    """Unique ids from ordinals: the last 12 base-36 digits are a bijective scramble of g (odd multiplier
    mod 2^64), the leading ones a second scramble, so ids look random but never repeat."""
    digits = np.empty((len(g), width), np.uint8)
    for lo, hi, mult in ((width - 12, width, 0x9E3779B97F4A7C15), (0, width - 12, 0xD6E8FEB86659FD93)):
        x = (g.astype(np.uint64) + np.uint64(1)) * np.uint64(mult)  # wraps mod 2^64
        for i in range(hi - 1, lo - 1, -1):
            digits[:, i] = _BASE36[(x % np.uint64(36)).astype(np.int64)]
            x //= np.uint64(36)
    ids = pc.cast(pa.array(digits.view(f"S{width}").ravel(), pa.binary()), pa.string())
    return pc.binary_join_element_wise(prefix, ids, "")


def _chunk(
    pool_raw: pa.Array, pool_json: pa.Array, pool: Pool, spec: ShardSpec, rng, start: int, n: int
) -> dict:
    """n synthetic reviews with local ordinals start..start+n-1 of this shard, as Arrow columns."""
    P = len(pool_raw)
    g = spec.index + spec.shards * np.arange(start, start + n, dtype=np.int64)
    t = rng.integers(0, len(pool.template_sentences), n)
    counts = pool.template_sentences[t].astype(np.int64)
    # sentences 1 and 2: m = (A*g + B) mod P^2 is a bijection (A coprime to P^2), then m -> (m % P, m // P)
    M = P * P
    A = int(M * _GOLDEN) | 1
    while np.gcd(A, P) != 1:
        A += 2
    B = int(rng.integers(0, M))
    m = np.array([(A * int(x) + B) % M for x in g], dtype=np.int64)
    idx = rng.integers(0, P, int(counts.sum()))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    idx[offsets[:-1]] = m % P
    idx[offsets[:-1] + 1] = m // P
    offs = pa.array(offsets.astype(np.int32))
    cols = {
        "g": g,
        "text": pc.binary_join(pa.ListArray.from_arrays(offs, pool_raw.take(pa.array(idx))), " "),
        "text_json": pc.binary_join(pa.ListArray.from_arrays(offs, pool_json.take(pa.array(idx))), " "),
        "rating": np.nan_to_num(pool.template_rating[t], nan=5.0).clip(1, 5).round().astype(np.int64),
        "title_i": t,
        "asin": rng.integers(0, 200_000, n),
        "timestamp": 1_262_304_000_000 + rng.integers(0, 13 * 365 * 86_400_000, n),
        "helpful": rng.geometric(0.6, n) - 1,
        "verified": rng.random(n) < 0.9,
    }
    return cols


def _strs(values) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _asin(i: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise("B0", pc.utf8_lpad(_strs(i), 8, "0"), "")


def _json_lines(c: dict, titles_json: pa.Array) -> pa.Array:
    asin = _asin(c["asin"])
    parts = [
        '{"rating": ',
        _RATING_JSON.take(pa.array(c["rating"] - 1)),
        ', "title": "',
        titles_json.take(pa.array(c["title_i"])),
        '", "text": "',
        c["text_json"],
        '", "images": [], "asin": "',
        asin,
        '", "parent_asin": "',
        asin,
        '", "user_id": "',
        _ids("AE", c["g"], 26),
        '", "timestamp": ',
        _strs(c["timestamp"]),
        ', "helpful_vote": ',
        _strs(c["helpful"]),
        ', "verified_purchase": ',
        pa.array(np.where(c["verified"], "true", "false")),
        "}\n",
    ]
    return pc.binary_join_element_wise(*parts, "")


def _pds_columns(c: dict, titles: pa.Array, category: str) -> dict[str, pa.Array]:
    """The Amazon Customer Reviews (v1_00) columns: the TSV's 15, typed as its Parquet had them."""
    n = len(c["g"])
    day = (c["timestamp"] // 86_400_000).astype("datetime64[D]")
    return {
        "marketplace": pa.array(["US"] * n),
        "customer_id": _strs(10_000_000 + c["g"]),
        "review_id": _ids("R", c["g"], 13),
        "product_id": _asin(c["asin"]),
        "product_parent": _strs(100_000_000 + c["asin"] * 7),
        "product_title": titles.take(pa.array((c["title_i"] * 7919) % len(titles))),
        "product_category": pa.array([category.replace("_", " ")] * n),
        "star_rating": pa.array(c["rating"].astype(np.int32)),
        "helpful_votes": pa.array(c["helpful"].astype(np.int32)),
        "total_votes": pa.array((c["helpful"] * 1.3).astype(np.int32)),
        "vine": pa.array(["N"] * n),
        "verified_purchase": pa.array(np.where(c["verified"], "Y", "N")),
        "review_headline": titles.take(pa.array(c["title_i"])),
        "review_body": c["text"],
        "review_date": pa.array(day),
    }


def _buffer_of(lines: pa.Array) -> memoryview:
    """The concatenated bytes of a string array (each element already ends in a newline)."""
    offsets = np.frombuffer(lines.buffers()[1], np.int32 if lines.type == pa.string() else np.int64)
    lo, hi = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
    return memoryview(lines.buffers()[2])[lo:hi]


def write_shard(pool: Pool, spec: ShardSpec) -> dict:
    """Write one shard file; returns {"path", "layout", "reviews", "text_bytes", "bytes"}."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng([spec.seed, spec.index])
    pool_raw = pa.array(pool.sentences, pa.string())
    pool_json = pa.array(pool.sentences_json, pa.string())
    titles = pa.array(pool.titles, pa.string())
    titles_json = pa.array(pool.titles_json, pa.string())
    category = CATEGORIES[spec.index % len(CATEGORIES)]
    Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
    reviews = text_bytes = 0
    # gzip container at ISA-L's level 1: the same ratio as zlib's level 1, ~4x faster (measured 235 vs
    # 53 MB/s on these JSON lines), so gzip does not cap the generator.
    gz = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    with open(spec.path, "wb") as f:
        writer = None
        if spec.layout == "tsv":
            f.write(gz.compress(("\t".join(TSV_COLUMNS) + "\n").encode()))
        while text_bytes < spec.text_bytes:
            c = _chunk(pool_raw, pool_json, pool, spec, rng, reviews, CHUNK_REVIEWS)
            sizes = pc.binary_length(c["text"]).to_numpy()
            left = spec.text_bytes - text_bytes
            cum = np.cumsum(sizes)
            n = int(np.searchsorted(cum, left) + 1) if cum[-1] >= left else len(sizes)
            c = {k: v[:n] for k, v in c.items()}
            if spec.layout == "json":
                f.write(gz.compress(_buffer_of(_json_lines(c, titles_json))))
            else:
                cols = _pds_columns(c, titles, category)
                if spec.layout == "tsv":
                    lines = pc.binary_join_element_wise(*[_strs(cols[k]) for k in TSV_COLUMNS], "\t")
                    lines = pc.binary_join_element_wise(lines, pa.array(["\n"] * n), "")
                    f.write(gz.compress(_buffer_of(lines)))
                else:
                    table = pa.table(cols)
                    if writer is None:
                        writer = pq.ParquetWriter(f, table.schema, compression="snappy")
                    writer.write_table(table)
            reviews += n
            text_bytes += int(cum[n - 1])
        if writer is not None:
            writer.close()
        if spec.layout != "parquet":
            f.write(gz.flush())
    return {
        "path": spec.path,
        "layout": spec.layout,
        "reviews": reviews,
        "text_bytes": text_bytes,
        "bytes": Path(spec.path).stat().st_size,
    }


def generate(
    out_dir: str | Path,
    size_bytes: int,
    sources: list[str] | None = None,
    layout: str = "json",
    shards: int = 8,
    seed: int = 0,
) -> dict:
    """Write a corpus of about `size_bytes` of review text into `out_dir`; returns (and writes) synth.json.

    layout: one of LAYOUTS, or "mixed" (shards rotate through all three)."""
    import ray

    from raylstm.data import DEMO_CORPUS
    from raylstm.ray_env import ensure_ray

    if layout not in (*LAYOUTS, "mixed"):
        raise ValueError(f"layout must be one of {(*LAYOUTS, 'mixed')}, got {layout!r}")
    if shards < 1 or size_bytes < 1:
        raise ValueError("shards and size must be positive")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; synth writes a new corpus into an empty directory")
    ensure_ray()
    pool = build_pool(list(sources or [str(DEMO_CORPUS)]))
    if size_bytes / 100 > len(pool.sentences) ** 2:
        raise ValueError(f"{len(pool.sentences)} pool sentences are too few for {size_bytes} bytes")
    specs = []
    for i in range(shards):
        lay = LAYOUTS[i % 3] if layout == "mixed" else layout
        name = f"{CATEGORIES[i % len(CATEGORIES)]}-{i:05d}{SUFFIX[lay]}"
        share = size_bytes // shards + (1 if i < size_bytes % shards else 0)
        specs.append(ShardSpec(i, shards, lay, str((out / name).resolve()), share, seed))
    pool_ref = ray.put(pool)
    task = ray.remote(num_cpus=1)(write_shard)
    files = ray.get([task.remote(pool_ref, s) for s in specs])
    manifest = {
        "seed": seed,
        "layout": layout,
        "shards": shards,
        "sources": list(sources or [str(DEMO_CORPUS)]),
        "pool_sentences": len(pool.sentences),
        "templates": len(pool.template_sentences),
        "reviews": sum(f["reviews"] for f in files),
        "text_bytes": sum(f["text_bytes"] for f in files),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
