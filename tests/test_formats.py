"""Every record ends in exactly one place: each kind of bad input written to a real file, parsed by the
readers' own per-file function (no Ray: fast), with exact per-reason counts and every good row kept; a
property test over random bytes and JSON values; the field table's normalisation."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raylstm import formats
from raylstm.sources import BAD_REASONS, DataError, ReadOptions, parse_file

BOM = b"\xef\xbb\xbf"
DEEP = 5_000  # past orjson's depth limit (1024) and the standard library's recursion limit (1000)


def parse(path: Path, **opts) -> list[dict]:
    """Every row the reader emits for one file, as dicts (the Ray read task's output, concatenated)."""
    o = ReadOptions(**opts)
    opener = pa.OSFile if path.name.endswith(".parquet") else open
    with opener(str(path), "rb") as f:
        tables = list(parse_file(f, str(path), o))
    return [r for t in tables for r in t.to_pylist()]


def reasons(rows: list[dict]) -> dict[str, int]:
    return dict(Counter(r["reason"] for r in rows if r["reason"]))


def kept(rows: list[dict]) -> list[str]:
    return [r["text"] for r in rows if r["reason"] is None]


def j2023(text, title="t", uid="U1", **extra) -> bytes:
    rec = {"rating": 5.0, "title": title, "text": text, "user_id": uid, "asin": "A", "timestamp": 7, **extra}
    return json.dumps(rec).encode()


# --- JSON lines ----------------------------------------------------------------------------------------
def test_json_lines_every_kind_counted_good_rows_kept(tmp_path):
    lines = [
        j2023("good one"),  # 1
        j2023("XX").replace(b"XX", b"lone \\ud800 surrogate in text"),  # 2 invalid_text
        j2023("ok", title="XX").replace(b"XX", b"title \\udfff"),  # 3 invalid_text (the title is kept)
        b'{"text": "deep", "rating": 1, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",  # 4 invalid_json
        b'{"text": "deep", "rating": 1, "x": '
        + b'{"a": ' * DEEP
        + b"1"
        + b"}" * DEEP
        + b"}",  # 5 invalid_json
        j2023("good two", rating=1e308).replace(b"1e+308", b"1e999"),  # 6 kept: rating overflows -> null
        j2023("good three").replace(b'"rating": 5.0', b'"rating": ' + b"9" * 400),  # 7 kept: huge int
        j2023("good four").replace(b'"rating": 5.0', b'"rating": NaN'),  # 8 kept: NaN -> null
        b'{"text": "cut off',  # 9 invalid_json
        j2023("XX").replace(b"XX", b"bad \xff byte"),  # 10 invalid_utf8
        j2023("XX").replace(b"XX", b"nul \x00 byte"),  # 11 nul_byte (raw)
        j2023("escaped \u0000 nul"),  # 12 nul_byte (escape)
        b'{"user_id": "U9", "title": "no text"}',  # 13 missing_text
        j2023("   "),  # 14 empty_text
        j2023(["a", "list"]),  # 15 bad_text_type
        b"[1, 2, 3]",  # 16 invalid_json: not an object
        b"",  # blank: not a record
        b"   ",  # blank
        j2023("y" * 60_000),  # 19 too_long
        j2023("good five", uid=[[[[1]]]]),  # 20 kept: a non-scalar key part -> the text is the key
        j2023("good \\ud83d\\ude00 six").replace(b"\\\\", b"\\"),  # 21 kept: a *paired* surrogate escape
    ]
    p = tmp_path / "kinds.jsonl"
    p.write_bytes(BOM + b"\r\n".join(lines) + b"\r\n")  # a BOM and CRLF line ends, as Windows tools write
    rows = parse(p, max_row_bytes=50_000)
    assert reasons(rows) == {
        "invalid_text": 2,
        "invalid_json": 4,
        "invalid_utf8": 1,
        "nul_byte": 2,
        "missing_text": 1,
        "empty_text": 1,
        "bad_text_type": 1,
        "too_long": 1,
    }
    assert kept(rows) == [
        "good one",
        "good two",
        "good three",
        "good four",
        "good five",
        "good \U0001f600 six",
    ]
    assert len(rows) == len(lines) - 2  # one row per record, the blanks none
    by_text = {r["text"]: r for r in rows if r["reason"] is None}
    assert by_text["good one"]["rating"] == 5.0 and by_text["good one"]["key"] == "U1|A|7"
    assert by_text["good two"]["rating"] is None and by_text["good four"]["rating"] is None
    assert by_text["good five"]["key"] == "good five"
    assert [r["row"] for r in rows if r["reason"] == "invalid_text"] == [2, 3]


def test_json_strict_stops_at_first_bad_line_naming_file_and_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_bytes(j2023("fine") + b"\n" + j2023("XX").replace(b"XX", b"\\ud800") + b"\n{bad\n")
    with pytest.raises(DataError, match=r"s\.jsonl: line 2: invalid_text"):
        parse(p, strict=True)
    p.write_bytes(j2023("fine") + b"\n" + b"[" * DEEP + b"]" * DEEP + b"\n")
    with pytest.raises(DataError, match=r"s\.jsonl: line 2: invalid_json: nested deeper"):
        parse(p, strict=True)


# --- TSV, CSV, text: byte-order mark and CRLF ----------------------------------------------------------
TSV_HEADER = (
    "marketplace\tcustomer_id\treview_id\tproduct_id\tproduct_parent\tproduct_title\tproduct_category\t"
    "star_rating\thelpful_votes\ttotal_votes\tvine\tverified_purchase\treview_headline\treview_body\t"
    "review_date"
)


def tsv_row(i: int, body: str, verified: str = "Y") -> str:
    return "\t".join(
        [
            "US",
            str(i),
            f"R{i}",
            "P",
            "1",
            "t",
            "Toys",
            "4",
            "0",
            "0",
            "N",
            verified,
            f"h{i}",
            body,
            "2015-08-31",
        ]
    )


def test_tsv_bom_crlf_first_row_kept(tmp_path):
    p = tmp_path / "r.tsv"
    text = "\r\n".join([TSV_HEADER, tsv_row(1, "first"), tsv_row(2, "second", "N"), "bad\trow", ""])
    p.write_bytes(BOM + text.encode())
    rows = parse(p)
    assert reasons(rows) == {"wrong_columns": 1}
    assert kept(rows) == ["first", "second"]
    good = [r for r in rows if r["reason"] is None]
    assert [(r["key"], r["rating"], r["verified"], r["category"]) for r in good] == [
        ("R1", 4.0, True, "Toys"),
        ("R2", 4.0, False, "Toys"),
    ]


CSV_HEADER = "reviewerID,asin,reviewerName,helpful,reviewText,overall,summary,unixReviewTime,reviewTime"


def test_csv_bom_crlf_and_unterminated_quotes(tmp_path):
    body = [
        'A1,B1,Ann,"[0, 0]","first, with a comma",5.0,ok,1,"01 1, 2014"',  # line 2
        'A2,B1,Bob,"[0, 0]","never closed,4.0,ok,1,1',  # line 3: csv_error (its quote swallows lines 4-5)
        'A3,B1,Cy,"[0, 0]","second",3.0,ok,1,"01 1, 2014"',  # line 4: read again, kept
        'A4,B1,Di,"[0, 0]","spans\r\ntwo lines",2.0,ok,1,"01 1, 2014"',  # lines 5-6: kept
        'A5,B1,Ed,"[0, 0]","stray "quote" inside",1.0,ok,1,"01 1, 2014"',  # line 7: csv_error
        'A6,B1,Fa,"[0, 0]","third",2.0,ok,1,"01 1, 2014"',  # line 8
        'A7,B1,Gi,"[0, 0]","unterminated at the end,5.0,ok,1,2',  # line 9: csv_error (end of file)
    ]
    p = tmp_path / "k.csv"
    p.write_bytes(BOM + "\r\n".join([CSV_HEADER, *body]).encode() + b"\r\n")
    rows = parse(p)
    assert reasons(rows) == {"csv_error": 3}
    assert kept(rows) == ["first, with a comma", "second", "spans\ntwo lines", "third"]
    assert sorted(r["row"] for r in rows if r["reason"]) == [3, 7, 9]
    assert [r["key"] for r in rows if r["reason"] is None] == ["A1|B1", "A3|B1", "A4|B1", "A6|B1"]
    with pytest.raises(DataError, match=r"k\.csv: line 3: csv_error"):
        parse(p, strict=True)


def test_text_bom_crlf_and_uci_labels(tmp_path):
    p = tmp_path / "s.txt"
    p.write_bytes(BOM + b"Great phone.\t1\r\nBad \xff battery.\t0\r\n\r\nNo label\r\n")
    rows = parse(p)
    assert reasons(rows) == {"invalid_utf8": 1}
    assert kept(rows) == ["Great phone.", "No label"]


# --- Blitzer -------------------------------------------------------------------------------------------
def blitzer(uid: str, text: str, close: bool = True) -> str:
    rec = (
        f"<review>\n<unique_id>\n{uid}\n</unique_id>\n<rating>\n4.0\n</rating>\n<title>\nT {uid}\n</title>\n"
    )
    rec += f"<review_text>\n{text}\n</review_text>\n"
    return rec + ("</review>\n" if close else "")


def test_blitzer_unclosed_records_counted(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    p = d / "negative.review"
    p.write_bytes(
        BOM
        + (
            blitzer("u1", "first review")
            + blitzer("u2", "cut by the next", close=False)  # followed by another <review>
            + blitzer("u3", "second review").replace("\n", "\r\n")
            + blitzer("u4", "never closed, last", close=False)  # last in the file
        ).encode()
    )
    rows = parse(p)
    assert reasons(rows) == {"unclosed_record": 2}
    assert kept(rows) == ["first review", "second review"]
    good = [r for r in rows if r["reason"] is None]
    assert [(r["key"], r["rating"], r["category"]) for r in good] == [
        ("u1", 4.0, "books"),
        ("u3", 4.0, "books"),
    ]
    with pytest.raises(DataError, match=r"negative\.review: line \d+: unclosed_record"):
        parse(p, strict=True)


# --- Parquet -------------------------------------------------------------------------------------------
def test_parquet_through_the_same_table_and_checks(tmp_path):
    p = tmp_path / "r.parquet"
    pq.write_table(
        pa.table(
            {
                "review_id": ["R1", "R2", "R3", "R4"],
                "review_body": ["kept one", None, "  ", "kept two"],
                "star_rating": [5, 4, 3, 2],
                "verified_purchase": ["Y", "Y", "N", "N"],
                "product_category": ["Toys"] * 4,
            }
        ),
        p,
    )
    rows = parse(p)
    assert reasons(rows) == {"missing_text": 1, "empty_text": 1}
    good = [r for r in rows if r["reason"] is None]
    assert [(r["text"], r["key"], r["rating"], r["verified"], r["category"], r["row"]) for r in good] == [
        ("kept one", "R1", 5.0, True, "Toys", 1),
        ("kept two", "R4", 2.0, False, "Toys", 4),
    ]
    with pytest.raises(DataError, match=r"r\.parquet: row 2: missing_text"):
        parse(p, strict=True)


def test_parquet_invalid_utf8_in_a_binary_text_column(tmp_path):
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", b"bad \xff", b"ok too"], pa.binary())}), p)
    rows = parse(p)
    assert reasons(rows) == {"invalid_utf8": 1} and kept(rows) == ["fine", "ok too"]


def test_categories_from_config_for_files_that_record_none(tmp_path):
    p = tmp_path / "Musical_Instruments.jsonl"
    p.write_bytes(j2023("a") + b"\n" + j2023("b", main_category="Own") + b"\n")
    rows = parse(p, categories=(("*Musical*", "Musical Instruments"),))
    assert [r["category"] for r in rows] == ["Musical Instruments", "Own"]
    assert [r["category"] for r in parse(p)] == [None, "Own"]


# --- the field table's normalisation -------------------------------------------------------------------
def test_value_normalisation_agrees_across_encodings():
    assert {formats.as_rating(v) for v in (5, 5.0, "5", "5.0", " 5 ")} == {5.0}
    assert [formats.as_rating(v) for v in (True, "x", float("inf"), 10**400, [5])] == [None] * 5
    assert {formats.as_verified(v) for v in (True, "Y", "true", "True", 1, "1")} == {True}
    assert {formats.as_verified(v) for v in (False, "N", "false", 0)} == {False}
    assert formats.as_verified("maybe") is None
    assert formats.make_key(["U", "A", 1588687728923]) == formats.make_key(["U", "A", "1588687728923"])
    assert formats.make_key(["U", "A", 1588687728923.0]) == "U|A|1588687728923"
    assert formats.make_key([None, "A"]) is None and formats.make_key([{"x": 1}]) is None


def test_layout_detection_from_columns():
    assert formats.detect_layout(TSV_HEADER.split("\t")).name == "tsv"
    assert formats.detect_layout(CSV_HEADER.split(",")).name == "json2014"
    assert formats.detect_layout({"text": 1, "rating": 1}).name == "json2023"
    assert formats.detect_layout(["user_id", "text"]).name == "json2023"
    assert formats.detect_layout(["body"], "body").text == ("body",)


# --- property: random bytes and JSON values among good lines -------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
junk_line = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["text", "title", "user_id", "rating", "reviewText"]), json_values).map(
        lambda d: json.dumps(d).encode()
    ),
    st.text(max_size=30).map(
        lambda s: json.dumps({"text": s, "rating": 1}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)


def expected_records(data: bytes) -> int:
    """An independent count of JSON-lines records: non-blank lines after a leading BOM."""
    data = data.removeprefix(BOM)
    return sum(1 for line in data.split(b"\n") if line.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.lists(junk_line, max_size=12),
    n_good=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    bom=st.booleans(),
)
def test_property_every_line_one_row_and_good_rows_survive(tmp_path, junk, n_good, seed, bom):
    good = [j2023(f"good review {i}", uid=f"G{i}") for i in range(n_good)]
    lines = good + junk
    random.Random(seed).shuffle(lines)
    data = (BOM if bom else b"") + b"\n".join(lines) + b"\n"
    p = tmp_path / "prop.jsonl"
    p.write_bytes(data)
    rows = parse(p, max_row_bytes=50_000)
    # Each record in exactly one place: one row per non-blank line, good or skipped for a known reason.
    assert len(rows) == expected_records(data)
    assert set(reasons(rows)) <= set(BAD_REASONS)
    assert all((r["reason"] is None) == (r["text"] is not None) for r in rows)
    texts = Counter(kept(rows))
    for i in range(n_good):
        assert texts[f"good review {i}"] >= 1
    # Kept strings can be stored: Arrow already encoded them, so no lone surrogate got through.
    assert all(not formats.has_surrogate(t) for t in texts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.lists(st.binary(max_size=40) | st.text(max_size=20).map(str.encode), max_size=10),
    n_good=st.integers(0, 4),
)
def test_property_csv_every_record_accounted(tmp_path, junk, n_good):
    """CSV: whatever the junk lines hold (quotes, commas, bad bytes), every good row survives."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER.split(","))
    good = []
    for i in range(n_good):
        good.append(f"good csv review {i}")
        w.writerow([f"G{i}", "B", "N", "[0, 0]", good[-1], "5.0", "s", "1", "01 1, 2014"])
    lines = buf.getvalue().encode().split(b"\n")[1:-1]
    body = [x for pair in zip(lines, junk) for x in pair] + lines[len(junk) :] + junk[len(lines) :]
    p = tmp_path / "prop.csv"
    p.write_bytes(CSV_HEADER.encode() + b"\n" + b"\n".join(body) + b"\n")
    rows = parse(p)
    assert set(reasons(rows)) <= set(BAD_REASONS)
    texts = Counter(kept(rows))
    assert all(texts[g] >= 1 for g in good)
