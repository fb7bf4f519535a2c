"""Review files -> a Ray Dataset of parsed rows, every record kept or skipped with exactly one reason.

One `FileBasedDatasource` subclass reads every format, Parquet included: line formats are streamed (Ray's
filesystem layer gives local paths, s3:// URIs and gzip/bz2/zstd by extension), Parquet is read a record
batch at a time from a random-access file. Ray's own `read_json`/`read_text` cannot be used for review
dumps: they fail a whole file on one invalid line or invalid UTF-8 byte, and we must count and skip such
rows. Each record goes through the one field table and the one text check in `formats.py`.

Formats (auto-detected from the file name, then the first bytes; `DataConfig.format` overrides):
  tsv       Amazon Customer Reviews `amazon_reviews_us_*_v1_00.tsv`: header row, tab-separated, no quoting.
  json      JSON lines; each object's layout (2014/2018, 2023, ...) is detected from its keys.
            `json2014`/`json2023` force one.
  csv       RFC 4180 CSV with a header (the Kaggle form of the 2014 files, or any layout's columns).
  parquet   any Parquet; its layout is detected from its column names (`DataConfig.text_column` otherwise).
  text      one review per line (a trailing "<TAB>0/1" sentiment label, as in UCI's files, is dropped).
  blitzer   the Blitzer et al. multi-domain `*.review` pseudo-XML; the category is the file's directory.

Every text format: a leading UTF-8 byte-order mark is dropped and CRLF line ends are read as LF.

Every record, good or bad, comes out as one row with the columns of `ROW_SCHEMA`; a bad one has `reason`
set (a key of the manifest's "skipped", one of `BAD_REASONS`) and no text, so the counts after the read
are exact: each parser emits exactly one row per record, whatever the bytes. Where a record starts and
ends is decided before it is judged (a line; a CSV record, re-read from its next line when its quoting is
broken; a Blitzer `<review>`, closed or not), so one bad record never takes good ones with it.
"""

from __future__ import annotations

import csv
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from raylstm import storage
from raylstm.config import DataFormat
from raylstm.formats import (
    LAYOUTS,
    ColumnMap,
    category_for,
    detect_layout,
    extract,
    has_surrogate,
    layout_for,
    record_fields,
    text_reason,
)

FORMATS: tuple[str, ...] = get_args(DataFormat)
_EXT_FORMAT = {
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".review": "blitzer",
}

ROW_SCHEMA = pa.schema(
    [
        ("text", pa.string()),  # the review body (not yet cleaned); null on a bad row
        ("title", pa.string()),  # summary / title / review_headline, when the format has one
        ("key", pa.string()),  # stable review identity: decides the split
        ("rating", pa.float64()),
        ("verified", pa.bool_()),
        ("category", pa.string()),  # from the record, the Blitzer directory, or data.categories
        ("source", pa.string()),  # the file the row came from
        ("row", pa.int64()),  # 1-based line (record start) in that file; the row number in a Parquet file
        ("reason", pa.string()),  # null for a good row, else why it was skipped
    ]
)

# Why a record is skipped; these names are the keys of the manifest's "skipped" counts.
BAD_REASONS = (
    "invalid_json",  # not JSON (any parser failure: syntax, nesting past the limit, ...) or not an object
    "invalid_utf8",  # bytes that are not UTF-8
    "invalid_text",  # a kept string holding a lone UTF-16 surrogate (a JSON escape such as "\ud800")
    "nul_byte",
    "missing_text",
    "empty_text",
    "bad_text_type",
    "too_long",  # over data.max_row_bytes
    "wrong_columns",
    "csv_error",  # broken CSV quoting; the record is counted at its first line and reading resumes after it
    "unclosed_record",  # a Blitzer <review> never closed: cut by the next <review> or the end of the file
)
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad input that stops a run: unreadable or truncated file, or a malformed row in strict mode."""


@dataclass(frozen=True)
class ReadOptions:
    """What a read task needs from `DataConfig` (small and picklable)."""

    format: str = "auto"
    text_column: str = "text"
    max_row_bytes: int = 1_000_000
    strict: bool = False
    rows_per_block: int = 8192
    categories: tuple[tuple[str, str], ...] = ()  # (file glob, category) for files that record none

    @classmethod
    def from_config(cls, cfg) -> ReadOptions:
        # cfg.format is a config.DataFormat, checked where the config is loaded (and by prepare --format).
        return cls(
            format=cfg.format,
            text_column=cfg.text_column,
            max_row_bytes=cfg.max_row_bytes,
            strict=cfg.strict,
            categories=tuple((str(k), str(v)) for k, v in (cfg.categories or {}).items()),
        )


# --- locating files ------------------------------------------------------------------------------------
def format_from_name(path: str) -> str | None:
    """The format a file name implies (compression suffix ignored), or None if the name says nothing."""
    return _EXT_FORMAT.get(storage.extension(path))


def resolve_files(sources: list[str]) -> list[tuple[pafs.FileSystem, str, int]]:
    """Expand files, directories (recursive; only known review extensions) and globs into
    (filesystem, path, size) triples, sorted for determinism. Missing sources raise FileNotFoundError."""
    out = []
    for src in sources:
        found = storage.expand(src, keep=lambda p: format_from_name(p) is not None)
        if not found:
            raise FileNotFoundError(f"no review files in {src} (known extensions: {sorted(_EXT_FORMAT)})")
        out.extend(found)
    return out


# --- rows ----------------------------------------------------------------------------------------------
_COLUMNS = ("text", "title", "key", "rating", "verified", "category", "row", "reason")  # + source


class _Rows:
    """Collects rows and emits Arrow tables of `rows_per_block` rows. `add` and `bad` are the only ways
    a record leaves a parser, and each emits exactly one row."""

    def __init__(self, source: str, opts: ReadOptions, category: str | None, unit: str = "line") -> None:
        self.source, self.opts, self.category, self.unit = source, opts, category, unit
        self.rows: list[tuple] = []  # one tuple per row in _COLUMNS order: one append per record

    @property
    def n(self) -> int:
        return len(self.rows)

    def add(self, row: int, fields: tuple, surrogates: bool = False) -> None:
        """One parsed record (`formats.FIELDS`): kept, or skipped by the one text check. `surrogates`: the
        values may hold lone surrogates (only a fallback JSON parse can make them), so check the kept ones."""
        text, title, key, rating, verified, category = fields
        if type(text) is not str or not text or "\x00" in text or text.isspace():
            reason = text_reason(text)
            if reason is not None:
                detail = f"text is {type(text).__name__}" if reason == "bad_text_type" else ""
                return self.bad(row, reason, detail)
        if surrogates and any(v is not None and has_surrogate(v) for v in (text, title, key, category)):
            return self.bad(row, "invalid_text", "a lone UTF-16 surrogate (e.g. the JSON escape \\ud800)")
        self.rows.append(
            (
                text,
                title,
                key or text,
                rating,
                verified,
                self.category if category is None else category,
                row,
                None,
            )
        )

    def bad(self, row: int, reason: str, detail: str = "") -> None:
        if self.opts.strict:
            raise DataError(f"{self.source}: {self.unit} {row}: {reason}{': ' + detail if detail else ''}")
        self.rows.append((None, None, None, None, None, None, row, reason))

    def full(self) -> bool:
        return len(self.rows) >= self.opts.rows_per_block

    def take(self) -> pa.Table:
        columns = dict(zip(_COLUMNS, map(list, zip(*self.rows))))
        columns["source"] = [self.source] * len(self.rows)
        self.rows = []
        return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)


# --- lines ---------------------------------------------------------------------------------------------
def _read(f, path: str, n: int) -> bytes:
    try:
        return f.read(n)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read (truncated or corrupt file?): {e}") from e


def _lines(f, path: str, max_row_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the line end) for each line; None for a line over the cap,
    which is skipped without being held in memory. A leading byte-order mark is dropped and "\\r\\n" ends
    read as "\\n". Read errors (truncated gzip...) name the file."""
    lineno, parts, size, skipping, first = 0, [], 0, False, True
    while True:
        chunk = _read(f, path, 1 << 20)
        if first and chunk:
            if len(chunk) < 3 and _BOM.startswith(chunk):
                chunk += _read(f, path, 3)  # a stream may return fewer bytes than asked
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
            first = False
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        tail = pieces.pop()
        for piece in pieces:
            lineno += 1
            if skipping or size + len(piece) > max_row_bytes:
                yield lineno, None
            else:
                line = b"".join(parts) + piece if parts else piece
                yield lineno, line[:-1] if line.endswith(b"\r") else line
            parts, size, skipping = [], 0, False
        if not skipping:
            if size + len(tail) > max_row_bytes:
                parts, size, skipping = [], 0, True
            elif tail:
                parts.append(tail)
                size += len(tail)
    if skipping or parts:
        lineno += 1
        if skipping:
            yield lineno, None
        else:
            line = b"".join(parts)
            yield lineno, line[:-1] if line.endswith(b"\r") else line


def _blank(raw: bytes | None) -> bool:
    return raw is not None and (not raw or raw.isspace())


def _decode(rows: _Rows, lineno: int, raw: bytes | None) -> str | None:
    """The line as text, or None after counting why it is not (too long, NUL, invalid UTF-8)."""
    if raw is None:
        rows.bad(lineno, "too_long", f"over max_row_bytes={rows.opts.max_row_bytes}")
        return None
    if b"\x00" in raw:
        rows.bad(lineno, "nul_byte")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        rows.bad(lineno, "invalid_utf8", str(e))
        return None


# --- JSON lines ----------------------------------------------------------------------------------------
def _json_fallback(raw: bytes) -> tuple[Any, str | None, str]:
    """orjson refused the line: find out why with the standard library, which is more permissive (lone
    surrogate escapes, NaN, integers past 64 bits). (object, reason, detail); reason None = parsed."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", str(e)
    try:
        return json.loads(line), None, ""
    except RecursionError:
        return None, "invalid_json", "nested deeper than the parser's limit"
    except Exception as e:  # noqa: BLE001 - any parser failure is this line's reason, never the file's
        return None, "invalid_json", f"{type(e).__name__}: {e}"


def _parse_json(
    lines: Iterable[tuple[int, bytes | None]], rows: _Rows, opts: ReadOptions
) -> Iterator[pa.Table]:
    forced = LAYOUTS.get(opts.format) if opts.format in ("json2014", "json2023") else None
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    readers: dict[str, Any] = {}  # layout name -> formats.record_fields(layout)
    for lineno, raw in lines:
        if raw is None:
            rows.bad(lineno, "too_long", f"over max_row_bytes={opts.max_row_bytes}")
        elif not raw or raw.isspace():
            continue  # blank lines (a trailing newline or two) are not records
        elif b"\x00" in raw:
            rows.bad(lineno, "nul_byte")
        else:
            surrogates = False
            try:
                obj = loads(raw)
            except decode_error:
                obj, reason, detail = _json_fallback(raw)
                if reason is not None:
                    rows.bad(lineno, reason, detail)
                    obj = None
                    if rows.full():
                        yield rows.take()
                    continue
                surrogates = True
            if not isinstance(obj, dict):
                rows.bad(lineno, "invalid_json", f"a JSON {type(obj).__name__}, not an object")
            else:
                layout = forced or detect_layout(obj, opts.text_column)
                to_fields = readers.get(layout.name)
                if to_fields is None:
                    to_fields = readers[layout.name] = record_fields(layout)
                rows.add(lineno, to_fields(obj.get), surrogates)
        if rows.full():
            yield rows.take()


# --- TSV -----------------------------------------------------------------------------------------------
def _parse_tsv(
    lines: Iterable[tuple[int, bytes | None]], rows: _Rows, opts: ReadOptions
) -> Iterator[pa.Table]:
    columns: ColumnMap | None = None
    width = 0
    for lineno, raw in lines:
        if raw is not None and (not raw or raw.isspace()):
            continue  # blank lines (the Gift Card file ends with two) are not records
        if columns is None:
            if raw is None or b"\x00" in raw:
                raise DataError(f"{rows.source}: line {lineno}: unreadable TSV header")
            header = raw.decode("utf-8", "replace").split("\t")
            columns, width = ColumnMap(layout_for(opts.format, header, opts.text_column), header), len(header)
            if columns.text is None:
                raise DataError(
                    f"{rows.source}: TSV header has no review_body or {opts.text_column!r} column: {header[:15]}"
                )
            to_fields = columns.extract
            continue
        if raw is None or b"\x00" in raw:
            _decode(rows, lineno, raw)  # counts it (too_long / nul_byte)
        else:
            try:
                fields = raw.decode("utf-8").split("\t")
            except UnicodeDecodeError as e:
                rows.bad(lineno, "invalid_utf8", str(e))
            else:
                if len(fields) != width:
                    rows.bad(
                        lineno, "wrong_columns", f"expected {width} tab-separated fields, got {len(fields)}"
                    )
                else:
                    rows.add(lineno, to_fields(fields))
        if rows.full():
            yield rows.take()


# --- plain text ----------------------------------------------------------------------------------------
_UCI_LABEL = re.compile(r"\t[0-9]\s*$")  # UCI "sentence<TAB>0/1"


def _parse_text(
    lines: Iterable[tuple[int, bytes | None]], rows: _Rows, opts: ReadOptions
) -> Iterator[pa.Table]:
    for lineno, raw in lines:
        if _blank(raw):
            continue
        line = _decode(rows, lineno, raw)
        if line is not None:
            rows.add(lineno, (_UCI_LABEL.sub("", line), None, None, None, None, None))
        if rows.full():
            yield rows.take()


# --- CSV -----------------------------------------------------------------------------------------------
class _Replayable:
    """The physical lines fed to `csv.reader`, remembering those of the record being read, so a record
    whose quoting is broken can be counted once and its later lines read again as records of their own
    (an unterminated quote would otherwise swallow every row after it)."""

    def __init__(self, lines: Iterable[tuple[int, bytes | None]]) -> None:
        self.it = iter(lines)
        self.pending: deque[tuple[int, str, bool]] = deque()  # (line number, text, over the cap)
        self.taken: list[tuple[int, str, bool]] = []

    def __iter__(self) -> _Replayable:
        return self

    def __next__(self) -> str:
        if self.pending:
            item = self.pending.popleft()
        else:
            lineno, raw = next(self.it)
            # Invalid UTF-8 is carried through as surrogates (surrogateescape) and the record is skipped
            # afterwards; a line over the cap arrives as None, is fed as an empty line and marks its
            # record too long.
            if raw is None:
                item = (lineno, "\n", True)
            else:
                item = (lineno, raw.decode("utf-8", "surrogateescape") + "\n", False)
        self.taken.append(item)
        return item[1]

    def start(self) -> None:
        self.taken = []

    def replay_after_first(self) -> None:
        """Read the current record's lines after its first again, as new records."""
        self.pending.extendleft(reversed(self.taken[1:]))


def _parse_csv(
    lines: Iterable[tuple[int, bytes | None]], rows: _Rows, opts: ReadOptions
) -> Iterator[pa.Table]:
    # strict=True: a quote in the wrong place or an unterminated quote at the end of the file is an error
    # (non-strict csv accepts both and silently merges the following rows into one field).
    csv.field_size_limit(max(opts.max_row_bytes, 131072))
    feed = _Replayable(lines)
    reader = csv.reader(feed, strict=True)
    columns: ColumnMap | None = None
    width = 0
    while True:
        feed.start()
        try:
            fields = next(reader)
            reason, detail = None, ""
        except StopIteration:
            break
        except csv.Error as e:
            fields, detail = None, str(e)
            reason = "too_long" if "field larger" in detail else "csv_error"
            if detail == "unexpected end of data":
                detail = "unterminated quote at the end of the file"
        if not feed.taken:
            break
        start = feed.taken[0][0]
        if any(overlong for _, _, overlong in feed.taken):
            reason, detail = "too_long", f"a line over max_row_bytes={opts.max_row_bytes}"
        elif fields is not None and (not fields or (len(fields) == 1 and not fields[0].strip())):
            continue  # a blank line
        if columns is None:
            if reason is not None:
                raise DataError(f"{rows.source}: line {start}: unreadable CSV header ({reason}: {detail})")
            columns, width = ColumnMap(layout_for(opts.format, fields, opts.text_column), fields), len(fields)
            if columns.text is None:
                raise DataError(
                    f"{rows.source}: CSV header has no reviewText/review_body/{opts.text_column!r} column: "
                    f"{fields[:15]}"
                )
            continue
        if reason is None and len(fields) != width:
            reason, detail = "wrong_columns", f"expected {width} fields, got {len(fields)}"
        if reason is not None:
            if len(feed.taken) > 1:
                feed.replay_after_first()  # what the broken record spanned is read again, line by line
                detail += f" (lines {start}-{feed.taken[-1][0]}; re-read from line {feed.taken[1][0]})"
            rows.bad(start, reason, detail)
        elif sum(len(x) for x in fields) > opts.max_row_bytes:
            rows.bad(start, "too_long", f"over max_row_bytes={opts.max_row_bytes}")
        elif any(has_surrogate(x) for x in fields):
            rows.bad(start, "invalid_utf8")
        elif any("\x00" in x for x in fields):
            rows.bad(start, "nul_byte")
        else:
            rows.add(start, columns.extract(fields))
        if rows.full():
            yield rows.take()


# --- Blitzer -------------------------------------------------------------------------------------------
_BLITZER_TAG = re.compile(r"^<(/?)([a-z_]+)>$")
_BLITZER_JOIN = {"review_text": "\n"}  # the body keeps its line breaks (cleaning folds them); others " "


def _blitzer_fields(rec: dict[str, list[str]]) -> tuple:
    joined = {k: (_BLITZER_JOIN.get(k, " ").join(v).strip() or None) for k, v in rec.items()}
    if "review_text" not in joined:
        joined["review_text"] = None
    elif joined["review_text"] is None:
        joined["review_text"] = ""
    return extract(LAYOUTS["blitzer"], joined.get)


def _parse_blitzer(
    lines: Iterable[tuple[int, bytes | None]], rows: _Rows, opts: ReadOptions
) -> Iterator[pa.Table]:
    rec: dict[str, list[str]] | None = None
    field_name, start, bad = None, 0, None
    for lineno, raw in lines:
        if raw is None:
            bad = bad or "too_long"
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad, line = bad or "invalid_utf8", raw.decode("utf-8", "replace")
        if "\x00" in line:
            bad = bad or "nul_byte"
        m = _BLITZER_TAG.match(line.strip())
        if m and m.group(2) == "review":
            if not m.group(1):  # <review>
                if rec is not None:
                    rows.bad(start, "unclosed_record", f"no </review> before the <review> at line {lineno}")
                rec, field_name, start, bad = {}, None, lineno, None
            elif rec is not None:  # </review>
                if bad:
                    rows.bad(start, bad)
                else:
                    rows.add(start, _blitzer_fields(rec))
                rec = None
        elif m and rec is not None:
            field_name = None if m.group(1) else m.group(2)
            if field_name:
                rec.setdefault(field_name, [])
        elif rec is not None and field_name:
            rec[field_name].append(line)
        if rows.full():
            yield rows.take()
    if rec is not None:
        rows.bad(start, "unclosed_record", "no </review> before the end of the file")


def _blitzer_category(path: str) -> str | None:
    """The Blitzer domain is the directory a file lies in: sorted_data_acl/books/positive.review -> books."""
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] else None


# --- Parquet -------------------------------------------------------------------------------------------
_NOT_UTF8 = object()  # a binary/string value whose bytes are not UTF-8


def _pylist(col: pa.ChunkedArray) -> list:
    """Python values of a column; string bytes that are not UTF-8 become `_NOT_UTF8`, never an error."""
    t = col.type
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
    ):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            try:
                return col.to_pylist()
            except (UnicodeDecodeError, pa.ArrowException):
                col = col.cast(pa.large_binary())
        out = []
        for b in col.to_pylist():
            try:
                out.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(_NOT_UTF8)
        return out
    return col.to_pylist()


def _parse_parquet(f, rows: _Rows, opts: ReadOptions) -> Iterator[pa.Table]:
    try:
        pf = pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{rows.source}: not a readable Parquet file: {e}") from e
    names = pf.schema_arrow.names
    columns = ColumnMap(layout_for(opts.format, names, opts.text_column), names)
    if columns.text is None:
        raise DataError(
            f"{rows.source}: Parquet file has no text column ({opts.text_column!r}): {names[:15]}"
        )
    needed = [names[i] for i in columns.needed]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=opts.rows_per_block, columns=needed):
            values = [None] * len(names)
            for name, i in zip(needed, columns.needed):
                values[i] = _pylist(batch.column(name))
            for j in range(batch.num_rows):
                row += 1
                record = [None if v is None else v[j] for v in values]
                if any(v is _NOT_UTF8 for v in record):
                    rows.bad(row, "invalid_utf8")
                else:
                    rows.add(row, columns.extract(record))
                if rows.full():
                    yield rows.take()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{rows.source}: cannot read Parquet (truncated or corrupt file?): {e}") from e


_LINE_PARSERS = {
    "json": _parse_json,
    "json2014": _parse_json,
    "json2023": _parse_json,
    "tsv": _parse_tsv,
    "csv": _parse_csv,
    "text": _parse_text,
    "blitzer": _parse_blitzer,
}


def sniff_format(first: bytes) -> str:
    """Format of a file whose name says nothing, from its first bytes."""
    if first.startswith(b"PAR1"):
        return "parquet"
    head = first.removeprefix(_BOM).lstrip()
    if head.startswith(b"{"):
        return "json"
    if head.startswith(b"<review>") or head.startswith(b"<data>"):
        return "blitzer"
    line = head.split(b"\n", 1)[0]
    if b"\t" in line and b"review_body" in line:
        return "tsv"
    if b"," in line and (b"reviewText" in line or b"review_body" in line):
        return "csv"
    return "text"


class _Peeked:
    """A read-only stream with some bytes already read back in front (for sniffing)."""

    def __init__(self, head: bytes, f) -> None:
        self.head, self.f = head, f

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.f.read(n)


def parse_file(f, path: str, opts: ReadOptions) -> Iterator[pa.Table]:
    """All records of one open file as `ROW_SCHEMA` tables: what one Ray read task runs (and what the
    parse benchmark times). `f` is a stream, or a random-access file for Parquet."""
    fmt = opts.format if opts.format != "auto" else format_from_name(path)
    if fmt is None:
        head = _read(f, path, 1 << 16)
        fmt, f = sniff_format(head), _Peeked(head, f)
        if fmt == "parquet":
            raise DataError(f"{path}: looks like Parquet; name it *.parquet or set data.format=parquet")
    category = _blitzer_category(path) if fmt == "blitzer" else category_for(path, opts.categories)
    if fmt == "parquet":
        rows = _Rows(path, opts, category, unit="row")
        yield from _parse_parquet(f, rows, opts)
    else:
        rows = _Rows(path, opts, category)
        yield from _LINE_PARSERS[fmt](_lines(f, path, opts.max_row_bytes), rows, opts)
    if rows.n:
        yield rows.take()


class ReviewDatasource(FileBasedDatasource):
    """Reads review files of every format into `ROW_SCHEMA` rows (`parse_file` per file).

    `per_block`, when given, is applied to every parsed block (`opts.rows_per_block` rows) inside the read
    task, which then yields its results instead of the rows: a caller whose first step is per block (e.g.
    `prepare`'s pass 1) runs in the read itself, whatever Ray Data's fusion rules and block shaping
    would do with a separate map (see `data._build_splits`)."""

    def __init__(
        self,
        paths: list[str],
        opts: ReadOptions,
        filesystem: pafs.FileSystem | None = None,
        per_block: Callable[[pa.Table], pa.Table] | None = None,
    ) -> None:
        super().__init__(paths, filesystem=filesystem)
        self.opts = opts
        self.per_block = per_block

    def _is_parquet(self, path: str) -> bool:
        return self.opts.format == "parquet" or (
            self.opts.format == "auto" and format_from_name(path) == "parquet"
        )

    def _open_input_source(self, filesystem, path: str, **open_args):
        try:
            if self._is_parquet(path):
                return filesystem.open_input_file(path)  # Parquet needs random access (footer first)
            return super()._open_input_source(filesystem, path, **open_args)
        except OSError as e:
            raise DataError(f"{path}: cannot open: {e}") from e

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        if self.per_block is None:
            yield from parse_file(f, path, self.opts)
        else:
            for block in parse_file(f, path, self.opts):
                yield self.per_block(block)


def read_parquet(paths, **kwargs):
    """ray.data.read_parquet through the v1 datasource (`ray_env.v1_parquet_reader`); for prepared dirs."""
    import ray

    from raylstm.ray_env import v1_parquet_reader

    with v1_parquet_reader():
        return ray.data.read_parquet(paths, **kwargs)


# --- entry point ---------------------------------------------------------------------------------------
def read_reviews(sources: list[str], opts: ReadOptions, override_num_blocks: int | None = None):
    """All rows of all sources as one Ray Dataset of `ROW_SCHEMA` rows (bad rows included, with a reason).

    Returns (dataset, files): files lists {"path", "size", "source"} of every file read, where path is
    what a user would pass again (a local path or an s3:// URI) and source is the value of the rows'
    `source` column (the filesystem's own path, without scheme).
    """
    return read_files(resolve_files(sources), opts, override_num_blocks)


def read_files(
    files: list[tuple[pafs.FileSystem, str, int]],
    opts: ReadOptions,
    override_num_blocks: int | None = None,
    per_block: Callable[[pa.Table], pa.Table] | None = None,
):
    """`read_reviews` of files already resolved (`resolve_files`): for a caller that looks at the file list
    first (how many files there are decides how `prepare` schedules its first pass). `per_block`: see
    `ReviewDatasource`."""
    import ray

    # One read per filesystem: all local files share one LocalFileSystem.
    groups: dict[Any, tuple[pafs.FileSystem, list[str]]] = {}
    for fs, path, _ in files:
        fs_key = "local" if isinstance(fs, pafs.LocalFileSystem) else id(fs)
        groups.setdefault(fs_key, (fs, []))[1].append(path)
    datasets = [
        ray.data.read_datasource(
            ReviewDatasource(paths, opts, filesystem=fs, per_block=per_block),
            override_num_blocks=override_num_blocks,
        )
        for fs, paths in groups.values()
    ]
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    return ds, [{"path": storage.to_uri(fs, p), "size": s, "source": p} for fs, p, s in files]
