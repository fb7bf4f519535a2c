"""Split, dedupe, windows: the stable-hash split is the same across formats and block counts."""

from __future__ import annotations

import numpy as np
import pytest

from raylstm.config import DataConfig
from raylstm.data import EOR, load_splits, split_of, window_dataset
from raylstm.vocab import CharVocab


def test_split_of_is_stable_and_proportional():
    keys = [f"A{i:05d}|B{i % 97}" for i in range(20_000)]
    first = [split_of(k, 0.1, 0.05) for k in keys]
    assert first == [split_of(k, 0.1, 0.05) for k in keys]
    frac = {s: first.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(frac["val"] - 0.10) < 0.01 and abs(frac["test"] - 0.05) < 0.01
    assert split_of("anything", 0.0, 0.0) == "train"
    assert split_of("anything", 0.0, 1.0) == "test"
    # Known values pin the hash: a change would silently reshuffle every user's splits.
    assert [split_of(f"k{i}", 0.3, 0.3) for i in range(6)] == [_pinned(i) for i in range(6)]


def _pinned(i: int) -> str:
    import hashlib

    u = int.from_bytes(hashlib.blake2b(f"k{i}".encode(), digest_size=8).digest(), "big") / 2.0**64
    return "test" if u < 0.3 else "val" if u < 0.6 else "train"


def key_splits(s) -> dict[str, str]:
    out = {}
    for name in ("train", "val", "test"):
        for r in getattr(s, name).select_columns(["key"]).take_all():
            out[r["key"]] = name
    return out


@pytest.mark.slow
def test_musical_instruments_split_same_for_csv_json_and_block_counts(ray_session, amazon_dir):
    csv = amazon_dir / "Musical_instruments_reviews.csv.gz"
    jsonl = amazon_dir / "Musical_Instruments_5.reconstructed.json.gz"
    base = load_splits(DataConfig(sources=[str(csv)]))
    ref = key_splits(base)
    assert len(ref) == base.manifest["rows"]["kept"] > 10_000
    as_json = load_splits(DataConfig(sources=[str(jsonl)]))
    assert key_splits(as_json) == ref
    assert as_json.manifest["splits"] == base.manifest["splits"]
    assert as_json.vocab == base.vocab
    for blocks in (1, 2, 8):
        s = load_splits(DataConfig(sources=[str(csv)]), override_num_blocks=blocks)
        assert key_splits(s) == ref, f"split differs with {blocks} blocks"
        assert s.manifest["splits"] == base.manifest["splits"]


def test_dedupe_keeps_one_per_text_deterministically(ray_session, tmp_path):
    import json

    lines = [
        json.dumps({"reviewerID": f"R{i}", "asin": "X", "reviewText": t})
        for i, t in enumerate(
            ["same text here", "other text", "same  text here", "Same text here", "same text <br />here"]
        )
    ]
    p = tmp_path / "dups.json"
    p.write_text("\n".join(lines[::-1]) + "\n")  # reversed: the survivor must not depend on order
    s = load_splits(DataConfig(sources=[str(p)], min_chars=0, val_fraction=0, test_fraction=0))
    rows = sorted((r["text"], r["key"]) for r in s.train.take_all())
    # whitespace and tags are cleaned first, so three rows are one text; case differs, so it stays
    assert rows == [("Same text here", "R3|X"), ("other text", "R1|X"), ("same text here", "R0|X")]
    assert s.manifest["skipped"] == {"duplicate": 2}


def vocab_of(text: str) -> CharVocab:
    return CharVocab(sorted(set(text)))


def test_full_windows_layout(ray_session):
    import ray

    texts = ["abc", "defg"]
    v = vocab_of("abcdefg\n")
    ds = ray.data.from_items([{"text": t} for t in texts])
    cfg = DataConfig(seq_len=3)
    rows = window_dataset(ds, v, cfg).take_all()
    got = [v.decode(r["ids"]) for r in rows]
    # stream "abc\ndefg\n" cut into seq_len+1 = 4 ids with stride 3: neighbours share one id
    assert got == ["abc\n", "\ndef"]
    for r in rows:
        x, y = r["ids"][:-1], r["ids"][1:]
        assert np.array_equal(x[1:], y[:-1])  # y is x shifted by one
        assert r["ids"].dtype == np.int32


def test_seed_windows_layout(ray_session):
    import ray

    v = vocab_of("abcdefg\n")
    ds = ray.data.from_items([{"text": t} for t in ["abc", "defg"]])
    cfg = DataConfig(window_mode="seed", seed_context=3, seed_step=2)
    got = [v.decode(r["ids"]) for r in window_dataset(ds, v, cfg).take_all()]
    assert got == ["abc\n", "c\nde", "defg"]


def test_windows_cover_the_stream_and_feed_torch(ray_session):
    s = load_splits(DataConfig(min_char_count=1, seq_len=32))
    stream_len = s.manifest["splits"]["train"]["chars"] + s.manifest["splits"]["train"]["rows"]
    w = window_dataset(s.train, s.vocab, DataConfig(seq_len=32))
    n = 0
    for batch in w.iter_torch_batches(batch_size=64):
        assert batch["ids"].shape[1] == 33
        n += batch["ids"].shape[0]
    assert n == (stream_len - 1) // 32  # one batch of reviews: every full window, nothing lost


def test_demo_corpus_is_the_default(ray_session):
    s = load_splits(DataConfig(min_char_count=1))
    m = s.manifest
    assert m["files"][0]["path"].endswith("reviews_demo.json.gz")
    assert m["rows"]["records"] >= 150 and m["skipped"] == {}
    assert all(m["splits"][k]["rows"] > 0 for k in ("train", "val", "test"))
    assert EOR in s.vocab and len(s.vocab) > 40
    text = s.train.take(1)[0]["text"]
    assert EOR not in text and s.vocab.decode(s.vocab.encode(text)) == text


def test_dedupe_sorted_keeps_smallest_row_and_survives_hash_collisions():
    import pyarrow as pa

    from raylstm.data import dedupe_sorted

    rows = [  # (text, hash, key, source, row): "x" and "y" collide on hash 7
        ("x", 7, "k3", "f", 1),
        ("y", 7, "k1", "f", 2),
        ("x", 7, "k2", "f", 3),
        ("y", 7, "k4", "f", 4),
        ("z", 9, "k9", "g", 1),
        ("z", 9, "k9", "f", 5),
        ("w", 1, "k0", "f", 6),
    ]
    table = pa.table(
        {
            "text": [r[0] for r in rows],
            "hash": pa.array([r[1] for r in rows], pa.uint64()),
            "key": [r[2] for r in rows],
            "source": [r[3] for r in rows],
            "row": pa.array([r[4] for r in rows], pa.int64()),
        }
    )
    for order in (list(range(7)), list(range(6, -1, -1))):
        got = dedupe_sorted(table.take(pa.array(order)))
        kept = sorted(zip(*(got.column(c).to_pylist() for c in ("text", "key", "source"))))
        # one row per distinct text, the smallest (key, source, row) of each, collisions kept apart
        assert kept == [("w", "k0", "f"), ("x", "k2", "f"), ("y", "k1", "f"), ("z", "k9", "f")]


def test_plan_groups_cover_every_bucket_once():
    from raylstm.data import plan_groups

    sizes = np.zeros(4096, np.int64)
    sizes[[3, 10, 11, 500, 4095]] = [5, 100, 1, 50, 60]
    groups = plan_groups(sizes, target=80)
    assert sum(int(sizes[lo:hi].sum()) for lo, hi in groups) == sizes.sum()
    assert all(b[0] >= a[1] for a, b in zip(groups, groups[1:]))  # disjoint, in order
    assert len(groups) == 3 and plan_groups(np.zeros(4096, np.int64), 80) == []


def test_split_column_is_split_of_on_every_key():
    """The vectorised split of pass 2 against split_of one key at a time (the reference), on keys of
    every kind: ASCII, non-ASCII, a lone surrogate, empty, and fractions at the edges."""
    from raylstm.data import split_column

    keys = [f"A{i:05d}|B{i % 97}" for i in range(30_000)]
    keys += ["", "é|ü", "\ud800 lone", "x" * 5000, "🎸|rating 5"]
    for val, test in ((0.1, 0.05), (0.0, 0.0), (0.0, 1.0), (0.3, 0.3), (0.5, 0.5)):
        assert split_column(keys, val, test).tolist() == [split_of(k, val, test) for k in keys]
    assert split_column([], 0.1, 0.05).tolist() == []


def test_char_counts_column_counts_every_character():
    """Character counts of a string array against collections.Counter over the joined texts: ASCII and
    non-ASCII rows, multi-byte characters, an array slice (non-zero offset) and more rows than one chunk."""
    from collections import Counter

    import pyarrow as pa

    from raylstm.data import CHAR_COUNT_ROWS, char_counts_column

    texts = ["plain ascii", "", "café au lait", "guitar 🎸 strings", "ÅÄÖ åäö", "tabs\tand  spaces"]
    texts = texts * (CHAR_COUNT_ROWS // 2) + ["end ✓"]
    arr = pa.array(texts, pa.string())
    assert char_counts_column(arr) == dict(Counter("".join(texts)))
    part = arr.slice(3, 2 * CHAR_COUNT_ROWS + 5)
    assert char_counts_column(part) == dict(Counter("".join(part.to_pylist())))
    assert char_counts_column(pa.array(["only ascii"] * 3)) == dict(Counter("only ascii" * 3))
    assert char_counts_column(pa.array([], pa.string())) == {}
