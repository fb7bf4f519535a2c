"""`raylstm synth`: real train-split sentences recombined into unique reviews, in three real layouts, read
back through sources.py with exact counts."""

from __future__ import annotations

import hashlib
import json
import re

from raylstm.config import DataConfig
from raylstm.data import split_of
from raylstm.sources import ReadOptions, read_reviews
from raylstm.synth import MANIFEST, generate, parse_size
from raylstm.text import clean_text


def _rows(sources):
    ds, _ = read_reviews(sources, ReadOptions())
    return ds.select_columns(["text", "key", "rating", "source", "reason"]).take_all()


def test_parse_size():
    assert parse_size("10MB") == 10_000_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096


def test_synth_layouts_read_back_exactly_unique_and_train_only(ray_session, tmp_path, amazon_dir):
    real = [str(amazon_dir / "Musical_instruments_reviews.csv.gz")]
    out = tmp_path / "corpus"
    manifest = generate(out, 600_000, real, layout="mixed", shards=3, seed=7)
    assert json.loads((out / MANIFEST).read_text()) == json.loads(json.dumps(manifest))
    layouts = {f["layout"] for f in manifest["files"]}
    assert layouts == {"json", "tsv", "parquet"}

    rows = _rows([str(out)])  # the directory, as a user would pass it: _synth.json is not read
    assert all(r["reason"] is None for r in rows)
    assert len(rows) == manifest["reviews"]
    for f in manifest["files"]:
        mine = [r for r in rows if r["source"] == f["path"]]
        assert len(mine) == f["reviews"] > 0, f["path"]
        assert sum(len(r["text"].encode()) for r in mine) == f["text_bytes"]
    # each shard stops at the first review that reaches its share
    assert 600_000 <= manifest["text_bytes"] < 600_000 + 3 * 20_000

    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    for opts in ({}, {"lowercase": True, "ascii_only": True}):  # unique after cleaning too
        assert len({clean_text(t, **opts) for t in texts}) == len(texts)
    assert len({r["key"] for r in rows}) == len(rows)
    # star ratings come back from the JSON and TSV layouts (sources.py does not map Parquet's star_rating)
    parquet = {f["path"] for f in manifest["files"] if f["layout"] == "parquet"}
    assert {r["rating"] for r in rows if r["source"] not in parquet} == {1.0, 2.0, 3.0, 4.0, 5.0}

    # No sentence of a held-out (val/test) real review appears in any synthetic review.
    d = DataConfig()
    held_out = set()
    for r in _rows(real):
        if r["reason"] is None and split_of(r["key"], d.val_fraction, d.test_fraction) != "train":
            held_out.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", r["text"]) if s.strip())
    synthetic = {s for t in texts for s in re.split(r"(?<=[.!?])\s+", t)}
    assert len(held_out) > 100 and not synthetic & held_out

    # Deterministic from the seed: the same arguments write the same bytes.
    again = generate(tmp_path / "again", 600_000, real, layout="mixed", shards=3, seed=7)
    for a, b in zip(manifest["files"], again["files"]):
        assert (
            hashlib.sha256(open(a["path"], "rb").read()).digest()
            == hashlib.sha256(open(b["path"], "rb").read()).digest()
        )
