"""Readers: every format, bad rows counted by reason and skipped, good rows all survive, clear errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raylstm.config import DataConfig
from raylstm.data import load_splits
from raylstm.sources import DataError, format_from_name, resolve_files, sniff_format

TSV_HEADER = (
    "marketplace\tcustomer_id\treview_id\tproduct_id\tproduct_parent\tproduct_title\tproduct_category\t"
    "star_rating\thelpful_votes\ttotal_votes\tvine\tverified_purchase\treview_headline\treview_body\t"
    "review_date"
)


def cfg(sources, **kw) -> DataConfig:
    # Counting tests keep every row the reader accepts: no length filter, no dedupe.
    kw.setdefault("min_chars", 0)
    kw.setdefault("dedupe", False)
    return DataConfig(sources=[str(s) for s in sources], **kw)


def all_texts(splits) -> list[str]:
    return sorted(r["text"] for ds in (splits.train, splits.val, splits.test) for r in ds.take_all())


def j2014(rid: str, text, **extra) -> bytes:
    rec = {"reviewerID": rid, "asin": "B00TEST", "reviewText": text, "overall": 4.0, "summary": "s", **extra}
    return json.dumps(rec).encode()


@pytest.fixture(scope="module")
def bad_json(tmp_path_factory):
    p = tmp_path_factory.mktemp("bad") / "bad.json"
    lines = [
        j2014("R1", "good review one"),  # 1
        b'{"reviewerID": "R2", "reviewText": "cut off',  # 2 invalid_json
        j2014("R3", "XX").replace(b"XX", b"bad \xff byte"),  # 3 invalid_utf8
        j2014("R4", "XX").replace(b"XX", b"nul \x00 byte"),  # 4 nul_byte (raw)
        b'{"reviewerID": "R5", "summary": "no text field"}',  # 5 missing_text
        j2014("R6", "   "),  # 6 empty_text
        j2014("R7", 42),  # 7 bad_text_type
        j2014("R8", "y" * 3000),  # 8 too_long (max_row_bytes=1000)
        b"",  # 9 blank: not a record
        j2014("R10", "good review two"),  # 10
        b"[1, 2, 3]",  # 11 invalid_json (not an object)
        j2014("R12", "escaped \u0000 nul"),  # 12 nul_byte (JSON escape)
        j2014("R13", "good review three"),  # 13, no trailing newline
    ]
    p.write_bytes(b"\n".join(lines))
    return p


def test_bad_json_rows_counted_and_good_rows_survive(ray_session, bad_json):
    s = load_splits(cfg([bad_json], max_row_bytes=1000))
    assert s.manifest["skipped"] == {
        "invalid_json": 2,
        "invalid_utf8": 1,
        "nul_byte": 2,
        "missing_text": 1,
        "empty_text": 1,
        "bad_text_type": 1,
        "too_long": 1,
    }
    assert s.manifest["rows"]["records"] == 12 and s.manifest["rows"]["parsed"] == 3
    assert all_texts(s) == ["good review one", "good review three", "good review two"]


def test_strict_mode_names_file_and_line(ray_session, bad_json):
    with pytest.raises(DataError, match=r"bad\.json: line 2: invalid_json"):
        load_splits(cfg([bad_json], strict=True))


def test_tsv_wrong_columns_and_blank_tail(ray_session, tmp_path):
    def row(i, body, n_fields=15):
        f = [
            "US",
            str(i),
            f"RID{i}",
            "P1",
            "1",
            "Gift",
            "Gift Card",
            "5",
            "0",
            "0",
            "N",
            "Y",
            f"head {i}",
            body,
            "2015-08-31",
        ]
        return "\t".join((f + ["extra"] * 3)[:n_fields])

    lines = [
        TSV_HEADER,
        row(1, "first body"),
        row(2, "short row", 14),
        row(3, "second body"),
        row(4, "long row", 16),
        row(5, "third body"),
        "",
        "",
    ]
    p = tmp_path / "amazon_reviews_us_Test_v1_00.tsv"
    p.write_text("\n".join(lines))
    s = load_splits(cfg([p]))
    assert s.manifest["skipped"] == {"wrong_columns": 2}
    assert s.manifest["rows"]["records"] == 5
    assert all_texts(s) == ["first body", "second body", "third body"]
    with pytest.raises(DataError, match=r"Test_v1_00\.tsv: line 3: wrong_columns"):
        load_splits(cfg([p], strict=True))
    # title prepended on request; key is review_id
    s = load_splits(cfg([p], include_title=True))
    assert "head 1. first body" in all_texts(s)
    assert sorted(r["key"] for r in s.train.take_all() + s.val.take_all() + s.test.take_all()) == [
        "RID1",
        "RID3",
        "RID5",
    ]


def test_csv_multiline_quoting_and_bad_rows(ray_session, tmp_path):
    header = "reviewerID,asin,reviewerName,helpful,reviewText,overall,summary,unixReviewTime,reviewTime"
    body = [
        b'A1,B1,Ann,"[0, 0]","Plain review, with a comma",5.0,ok,1,"01 1, 2014"',  # line 2
        b'A2,B1,Bob,"[1, 2]","Spans\ntwo lines and has ""quotes""",4.0,ok,1,"01 1, 2014"',  # lines 3-4
        b'A3,B1,Cy,"[0, 0]",too few fields',  # line 5: wrong_columns
        b'A4,B1,Di,"[0, 0]","bad \xff utf8",3.0,ok,1,"01 1, 2014"',  # line 6: invalid_utf8
        b'A5,B1,Ed,"[0, 0]",,1.0,empty,1,"01 1, 2014"',  # line 7: empty_text
        b'A6,B1,Fa,"[0, 0]","last one",2.0,ok,1,"01 1, 2014"',  # line 8
    ]
    p = tmp_path / "kaggle.csv"
    p.write_bytes(header.encode() + b"\n" + b"\n".join(body) + b"\n")
    s = load_splits(cfg([p]))
    assert s.manifest["skipped"] == {"wrong_columns": 1, "invalid_utf8": 1, "empty_text": 1}
    assert s.manifest["rows"]["records"] == 6
    assert all_texts(s) == ["Plain review, with a comma", 'Spans two lines and has "quotes"', "last one"]
    with pytest.raises(DataError, match=r"kaggle\.csv: line 5: wrong_columns"):
        load_splits(cfg([p], strict=True))


def test_truncated_gzip_names_the_file(ray_session, tmp_path):
    data = gzip.compress(b"\n".join(j2014(f"R{i}", f"review number {i} " * 20) for i in range(2000)))
    p = tmp_path / "cut.json.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.json\.gz: cannot read"):
        load_splits(cfg([p]))


def test_missing_and_unreadable_sources_name_the_path(ray_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_splits(cfg([tmp_path / "nope.json"]))
    link = tmp_path / "dangling.json"
    link.symlink_to(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match="dangling.json"):
        load_splits(cfg([link]))


def test_json2023_schema_key_and_verified_filter(ray_session, tmp_path):
    recs = [
        {
            "rating": 5.0,
            "title": "t1",
            "text": "verified one",
            "user_id": "U1",
            "asin": "A",
            "timestamp": 1,
            "verified_purchase": True,
        },
        {
            "rating": 1.0,
            "title": "t2",
            "text": "unverified two",
            "user_id": "U2",
            "asin": "A",
            "timestamp": 2,
            "verified_purchase": False,
        },
        {
            "rating": 3.0,
            "title": "t3",
            "text": "verified three",
            "user_id": "U3",
            "asin": "B",
            "timestamp": 3,
            "verified_purchase": True,
        },
    ]
    p = tmp_path / "Musical_Instruments.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    s = load_splits(cfg([p], verified_only=True))
    assert s.manifest["skipped"] == {"unverified": 1}
    rows = s.train.take_all() + s.val.take_all() + s.test.take_all()
    assert sorted(r["key"] for r in rows) == ["U1|A|1", "U3|B|3"]


def test_text_parquet_dir_and_glob(ray_session, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "sentences.txt").write_text("A fine phone indeed.\t1\nTerrible battery life.\t0\n\nNo label line\n")
    pq.write_table(
        pa.table({"body": ["parquet one", None, "parquet two"], "review_id": ["p1", "p2", "p3"]}),
        d / "part.parquet",
    )
    (d / "SOURCES.md").write_text("# not a review file\n")
    (d / ".hidden.json").write_text("{not json\n")
    s = load_splits(cfg([d], text_column="body"))
    assert s.manifest["skipped"] == {"missing_text": 1}
    assert all_texts(s) == [
        "A fine phone indeed.",
        "No label line",
        "Terrible battery life.",
        "parquet one",
        "parquet two",
    ]
    assert len(s.manifest["files"]) == 2
    s = load_splits(cfg([str(d / "*.txt")]))
    assert s.manifest["rows"]["records"] == 3


def test_format_detection():
    assert format_from_name("x/amazon_reviews_us_Gift_Card_v1_00.tsv.gz") == "tsv"
    assert format_from_name("Appliances_5.json.gz") == "json"
    assert format_from_name("a.review.gz") == "blitzer"
    assert format_from_name("README") is None
    assert sniff_format(b'  {"reviewText": 1}') == "json"
    assert sniff_format(TSV_HEADER.encode()) == "tsv"
    assert sniff_format(b"<review>\n<unique_id>") == "blitzer"
    assert sniff_format(b"hello there") == "text"


# --- the real files in ../shared/data/amazon (counts from its SOURCES.md) ------------------------------
@pytest.mark.parametrize(
    "name, records",
    [
        ("Musical_instruments_reviews.csv.gz", 10_261),
        ("Musical_Instruments_5.reconstructed.json.gz", 10_261),
        ("Musical_Instruments_5.json", 50),
        ("amazon_reviews_us_Gift_Card_v1_00.tsv", 1_452),
        ("reviews.tsv", 49),
        ("amazon_cells_labelled.txt", 1_000),
        ("sorted_data_acl/books/negative.review.gz", 1_000),
        ("AMAZON_FASHION_5.json.gz", 3_176),
    ],
)
def test_real_files_record_counts(ray_session, amazon_dir, name, records):
    s = load_splits(cfg([amazon_dir / name]))
    m = s.manifest
    assert m["rows"]["records"] == records
    # Everything read is either kept or skipped for a named reason.
    assert m["rows"]["records"] == m["rows"]["kept"] + sum(m["skipped"].values())


def test_real_musical_instruments_empty_texts(ray_session, amazon_dir):
    # SOURCES.md: 7 rows have an empty reviewText; FASHION misses reviewText in 16 records.
    s = load_splits(cfg([amazon_dir / "Musical_instruments_reviews.csv.gz"]))
    assert s.manifest["skipped"] == {"empty_text": 7}
    s = load_splits(cfg([amazon_dir / "AMAZON_FASHION_5.json.gz"]))
    assert s.manifest["skipped"].get("missing_text") == 16


def test_real_appliances_dedupe(ray_session, amazon_dir):
    s = load_splits(cfg([amazon_dir / "Appliances_5.json.gz"], dedupe=True))
    assert s.manifest["rows"]["records"] == 2_277
    assert s.manifest["rows"]["kept"] == 144
    assert s.manifest["skipped"]["duplicate"] == 2_277 - 144


def test_resolve_files_directory_skips_non_reviews(amazon_dir):
    files = [p for _, p, _ in resolve_files([str(amazon_dir)])]
    assert not any(p.endswith("SOURCES.md") for p in files)
    assert len(files) == 17


# --- object storage: s3:// sources and a prepared dir on S3 (moto's real S3-protocol server) ----------
S3_SCRIPT = r"""
import json, sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
from raylstm.config import DataConfig
from raylstm.data import load_splits
from raylstm.prepare import prepare
bucket = sys.argv[1]
cfg = DataConfig(sources=[f"s3://{bucket}/reviews/"], min_chars=0, dedupe=False)
fresh = load_splits(cfg)
manifest = prepare(cfg, f"s3://{bucket}/prepared")
back = load_splits(DataConfig(sources=[f"s3://{bucket}/prepared"]))
texts = lambda s: sorted(r["text"] for d in (s.train, s.val, s.test) for r in d.take_all())
print("RESULT " + json.dumps({"fresh": fresh.manifest["rows"], "skipped": fresh.manifest["skipped"],
      "files": manifest["files"], "same": texts(fresh) == texts(back), "texts": texts(back),
      "vocab_same": fresh.vocab == back.vocab}))
"""


@pytest.mark.slow
def test_s3_sources_and_prepared_dir_on_s3(tmp_path):
    import hashlib
    import os
    import subprocess
    import sys

    import pyarrow.fs as pafs
    from moto_s3 import s3_server

    bucket = "raylstm-data"
    json_bytes = b"\n".join([j2014("S1", "from s3 one"), b"{broken", j2014("S2", "from s3 two")]) + b"\n"
    tsv_bytes = (
        TSV_HEADER
        + "\n"
        + "\t".join(
            ["US", "1", "RID9", "P", "1", "t", "c", "5", "0", "0", "N", "Y", "h", "tsv on s3", "2015-08-31"]
        )
        + "\n"
    ).encode()
    with s3_server(bucket) as env:
        fs = pafs.S3FileSystem(
            endpoint_override=env["AWS_ENDPOINT_URL"],
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            scheme="http",
        )
        for name, data in [
            ("a.json.gz", gzip.compress(json_bytes)),
            ("b.tsv", tsv_bytes),
            ("SOURCES.md", b"# not reviews\n"),
        ]:
            with fs.open_output_stream(f"{bucket}/reviews/{name}", compression=None) as f:
                f.write(data)
        script = tmp_path / "s3_job.py"
        script.write_text(S3_SCRIPT)
        proc = subprocess.run(
            [sys.executable, str(script), bucket],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env, "RAY_AUTH_MODE": "disabled"},
        )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(line[len("RESULT ") :])
    assert got["fresh"]["records"] == 4 and got["skipped"] == {"invalid_json": 1}
    assert got["same"] and got["vocab_same"] and got["texts"] == ["from s3 one", "from s3 two", "tsv on s3"]
    files = {f["path"]: f for f in got["files"]}
    assert set(files) == {f"s3://{bucket}/reviews/a.json.gz", f"s3://{bucket}/reviews/b.tsv"}
    assert files[f"s3://{bucket}/reviews/b.tsv"]["sha256"] == hashlib.sha256(tsv_bytes).hexdigest()


# --- the same reviews in every container and layout: same keys, splits, ratings, verified -------------
REVIEWS = [  # (id, text, rating, verified, category)
    ("R1", "A sturdy stand that holds my guitar well.", 5, True, "Musical Instruments"),
    ("R2", "The strings went dead after a week of play.", 2, False, "Musical Instruments"),
    ("R3", "Fine cable, a little stiff when it is cold.", 4, True, "Musical Instruments"),
    ("R4", "Tuner clips on and reads fast and true.", 5, False, "Musical Instruments"),
]
LAYOUT_RECORDS = {
    # layout -> one review as that layout's typed record (as JSON lines and Parquet hold it)
    "tsv": lambda i, t, r, v, c: {
        "marketplace": "US",
        "customer_id": f"C{i}",
        "review_id": i,
        "product_id": "P1",
        "product_category": c,
        "star_rating": r,
        "verified_purchase": "Y" if v else "N",
        "review_headline": "head",
        "review_body": t,
    },
    "json2014": lambda i, t, r, v, c: {
        "reviewerID": i,
        "asin": "B001",
        "reviewText": t,
        "overall": float(r),
        "summary": "head",
        "verified": v,
        "category": c,
    },
    "json2023": lambda i, t, r, v, c: {
        "rating": float(r),
        "title": "head",
        "text": t,
        "asin": "B001",
        "parent_asin": "B001",
        "user_id": i,
        "timestamp": 1588687728923,
        "verified_purchase": v,
        "main_category": c,
    },
}


def _as_string(v) -> str:
    return ("True" if v else "False") if isinstance(v, bool) else str(v)


def _narrow(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The types a Parquet writer may choose for the same values: int32 ratings and time stamps, float32
    ratings, dictionary-encoded strings (as Spark, pandas and Amazon's own Parquet exports write them)."""
    t = column.type
    if pa.types.is_int64(t):
        return column.cast(pa.int32()) if pc.max(column).as_py() < 2**31 else column
    if pa.types.is_float64(t):
        return column.cast(pa.float32())
    if pa.types.is_string(t):
        return column.dictionary_encode()
    return column


# Each layout's records in every container: (file name, writer). The Parquet files hold the values typed
# as the JSON has them, narrowed (int32/float32/dictionary), and all as strings (a TSV converted as is).
CONTAINERS = ("r.jsonl", "r.tsv", "r.csv", "r.parquet", "r-narrow.parquet", "r-strings.parquet")


def write_all_containers(root, layout: str) -> None:
    import csv

    recs = [LAYOUT_RECORDS[layout](*r) for r in REVIEWS]
    cols = list(recs[0])
    d = root / layout
    d.mkdir()
    (d / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "r.tsv").write_text(
        "\n".join(["\t".join(cols)] + ["\t".join(_as_string(r[c]) for c in cols) for r in recs]) + "\n"
    )
    with open(d / "r.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([[_as_string(r[c]) for c in cols] for r in recs])
    typed = pa.Table.from_pylist(recs)
    pq.write_table(typed, d / "r.parquet")
    narrow = pa.table({c: _narrow(typed.column(c)) for c in cols})
    assert narrow.schema != typed.schema
    pq.write_table(narrow, d / "r-narrow.parquet")
    pq.write_table(
        pa.Table.from_pylist([{c: _as_string(r[c]) for c in cols} for r in recs]), d / "r-strings.parquet"
    )


def test_same_reviews_from_every_container_and_layout_agree(ray_session, tmp_path):
    """The same four reviews in each layout (TSV, 2014, 2023 columns), each written as JSON lines, TSV,
    CSV and three Parquet files: every copy has the layout's key, the split that key gives, and the
    review's own rating, verified flag and category."""
    from raylstm.data import split_of

    for layout in LAYOUT_RECORDS:
        write_all_containers(tmp_path, layout)
    fractions = {"val_fraction": 0.3, "test_fraction": 0.3}  # all three splits occur among four keys
    s = load_splits(cfg([tmp_path], **fractions))
    n = len(REVIEWS) * len(CONTAINERS) * len(LAYOUT_RECORDS)
    assert s.manifest["rows"]["records"] == n and s.manifest["skipped"] == {}
    got: dict[tuple[str, str], list] = {}
    for split in ("train", "val", "test"):
        for r in getattr(s, split).take_all():
            layout, name = r["source"].rsplit("/", 2)[-2:]
            got.setdefault((layout, name), []).append(
                (r["text"], r["key"], split, r["rating"], r["verified"], r["category"])
            )
    assert sorted(got) == sorted((layout, name) for layout in LAYOUT_RECORDS for name in CONTAINERS)
    # the keys each layout names (so the split follows the review, not the file it came in)
    key_of = {
        "tsv": lambda rid: rid,
        "json2014": lambda rid: f"{rid}|B001",
        "json2023": lambda rid: f"{rid}|B001|1588687728923",
    }
    for layout in LAYOUT_RECORDS:
        want = sorted(
            (text, key_of[layout](rid), split_of(key_of[layout](rid), **fractions), float(r), v, c)
            for rid, text, r, v, c in REVIEWS
        )
        assert len({w[2] for w in want}) > 1, "the split check needs more than one split"
        for name in CONTAINERS:
            assert sorted(got[(layout, name)]) == want, (layout, name)


# --- every kind of bad record, end to end through Ray: the manifest's accounting -----------------------
def test_kinds_end_to_end_accounting_and_prepared_columns(ray_session, tmp_path):
    from raylstm.prepare import prepare

    d = tmp_path / "kinds"
    (d / "books").mkdir(parents=True)
    bom = b"\xef\xbb\xbf"
    good = lambda i: json.dumps({"text": f"good json review {i}", "rating": 4, "user_id": f"U{i}"}).encode()  # noqa: E731
    (d / "a.jsonl").write_bytes(
        bom
        + b"\r\n".join(
            [
                good(1),
                b'{"text": "lone \\ud800", "rating": 1, "user_id": "S"}',
                b'{"text": "t", "title": "lone \\udc00", "rating": 1, "user_id": "S2"}',
                b"[" * 5000 + b"]" * 5000,
                b'{"a": ' * 5000 + b"1" + b"}" * 5000,
                good(2),
            ]
        )
    )
    (d / "books" / "x.review").write_text(
        "<review>\n<unique_id>\nb1\n</unique_id>\n<review_text>\ngood blitzer review\n</review_text>\n</review>\n"
        "<review>\n<unique_id>\nb2\n</unique_id>\n<review_text>\nnever closed\n"
    )
    (d / "k.csv").write_bytes(
        bom
        + b'reviewerID,asin,reviewText,overall\r\nA1,B,"good csv review",5.0\r\nA2,B,"unterminated,1.0\r\n'
    )
    s = load_splits(cfg([d], categories={"*.jsonl": "From Config"}))
    m = s.manifest
    assert m["skipped"] == {"invalid_text": 2, "invalid_json": 2, "unclosed_record": 1, "csv_error": 1}
    assert m["rows"]["records"] == 10 == m["rows"]["kept"] + sum(m["skipped"].values())
    assert sorted(all_texts(s)) == sorted(
        ["good json review 1", "good json review 2", "good blitzer review", "good csv review"]
    )
    out = tmp_path / "prepared"
    prepare(cfg([d], categories={"*.jsonl": "From Config"}), out)
    back = load_splits(DataConfig(sources=[str(out)]))
    rows = [r for ds in (back.train, back.val, back.test) for r in ds.take_all()]
    assert {
        r["text"]: (r["category"], r["source"].rsplit("/", 1)[-1], r["rating"], r["verified"]) for r in rows
    } == {
        "good json review 1": ("From Config", "a.jsonl", 4.0, None),
        "good json review 2": ("From Config", "a.jsonl", 4.0, None),
        "good blitzer review": ("books", "x.review", None, None),
        "good csv review": (None, "k.csv", 5.0, None),
    }


def test_random_junk_among_good_lines_end_to_end(ray_session, tmp_path):
    """The property test's input, once through Ray and the manifest: seeded random bytes and JSON values
    as lines among good ones; every line is one record, every good row survives cleaning and the split."""
    import random

    rnd = random.Random(10)

    def junk() -> bytes:
        kind = rnd.randrange(4)
        if kind == 0:
            return rnd.randbytes(rnd.randrange(1, 80)).replace(b"\n", b"")
        if kind == 1:
            depth = rnd.randrange(1, 3000)
            return (b"[" if rnd.random() < 0.5 else b'{"a": ') * depth
        value = rnd.choice([None, 1e308, -(2**70), "\ud800", "x\udfffy", [1, {"t": "\ud83d"}], "ok"])
        rec = {"text": value, "rating": rnd.choice([1, "5", float("nan"), 10**30]), "user_id": "J"}
        return json.dumps(rec).encode()

    good = [
        json.dumps({"text": f"good review number {i} kept", "rating": 3, "user_id": f"G{i}"}).encode()
        for i in range(20)
    ]
    lines = good + [junk() for _ in range(200)]
    rnd.shuffle(lines)
    data = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    p = tmp_path / "junk.jsonl"
    p.write_bytes(data)
    s = load_splits(cfg([p]))
    m = s.manifest
    expected = sum(1 for line in data[3:].split(b"\n") if line.strip())
    assert m["rows"]["records"] == expected == m["rows"]["kept"] + sum(m["skipped"].values())
    kept = all_texts(s)
    assert all(f"good review number {i} kept" in kept for i in range(20))
