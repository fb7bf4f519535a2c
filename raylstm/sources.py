"""Review files -> a Ray Dataset of parsed rows, with every malformed row counted by reason.

One `FileBasedDatasource` subclass streams each file's lines (so Ray's filesystem layer gives us local
paths, directories, s3:// URIs through pyarrow filesystems, and gzip/bz2/zstd by extension) and parses them
by format. Ray's own `read_json`/`read_text` cannot be used for review dumps: they fail a whole file on one
invalid line or invalid UTF-8 byte, and we must count and skip such rows. Parquet goes through
`ray.data.read_parquet` with a configurable text column.

Formats (auto-detected from the file name, then the header/first record; `DataConfig.format` overrides):
  tsv       Amazon Customer Reviews `amazon_reviews_us_*_v1_00.tsv`: header row, tab-separated, no quoting.
  json      McAuley JSON lines; per record the 2014/2018 schema (reviewText, summary, overall, verified)
            or the 2023 schema (text, title, rating, verified_purchase). `json2014`/`json2023` force one.
  csv       RFC 4180 CSV with a header (the Kaggle form of the 2014 files: reviewerID, ..., reviewText).
  parquet   any Parquet with a text column (`DataConfig.text_column`).
  text      one review per line (a trailing "<TAB>0/1" sentiment label, as in UCI's files, is dropped).
  blitzer   the Blitzer et al. multi-domain `*.review` pseudo-XML.

Every row, good or bad, comes out with the columns of `ROW_SCHEMA`; a bad row has `reason` set (a manifest
key such as "invalid_json") and no text, so counts can be aggregated exactly after the read.
"""

from __future__ import annotations

import csv
import fnmatch
import glob as globlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.datasource import FileBasedDatasource

FORMATS = ("auto", "tsv", "json", "json2014", "json2023", "csv", "parquet", "text", "blitzer")
COMPRESSION_SUFFIXES = (".gz", ".gzip", ".bz2", ".zst", ".zstd", ".lz4", ".br")
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
        ("source", pa.string()),  # the file the row came from
        ("row", pa.int64()),  # 1-based line (record start) in that file; 0 where unknown (Parquet)
        ("reason", pa.string()),  # null for a good row, else why it was skipped
    ]
)

# Why a row is skipped; these names are the keys of the manifest's "skipped" counts.
BAD_REASONS = (
    "invalid_json",
    "invalid_utf8",
    "nul_byte",
    "missing_text",
    "empty_text",
    "bad_text_type",
    "too_long",
    "wrong_columns",
    "csv_error",
)


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

    @classmethod
    def from_config(cls, cfg) -> ReadOptions:
        if cfg.format not in FORMATS:
            raise DataError(f"data.format must be one of {FORMATS}, got {cfg.format!r}")
        return cls(
            format=cfg.format, text_column=cfg.text_column, max_row_bytes=cfg.max_row_bytes, strict=cfg.strict
        )


# --- locating files ------------------------------------------------------------------------------------
def _base_name(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for suf in COMPRESSION_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def format_from_name(path: str) -> str | None:
    """The format a file name implies (compression suffix ignored), or None if the name says nothing."""
    name = _base_name(path)
    return _EXT_FORMAT.get(os.path.splitext(name)[1])


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("_")


def resolve_files(sources: list[str]) -> list[tuple[pafs.FileSystem, str, int]]:
    """Expand files, directories (recursive; only known review extensions) and globs into
    (filesystem, path, size) triples, sorted for determinism. Missing sources raise FileNotFoundError."""
    out: list[tuple[pafs.FileSystem, str, int]] = []
    for src in sources:
        if "://" in src:
            fs, path = pafs.FileSystem.from_uri(src)
        else:
            fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(src))
        found: list[tuple[str, int]] = []
        if any(ch in path for ch in "*?["):
            if isinstance(fs, pafs.LocalFileSystem):
                matches = sorted(globlib.glob(path, recursive=True))
            else:
                base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                matches = sorted(i.path for i in infos if fnmatch.fnmatch(i.path, path))
            for m in matches:
                info = fs.get_file_info(m)
                if info.type == pafs.FileType.File:
                    found.append((m, info.size))
                elif info.type == pafs.FileType.Directory:
                    found.extend(_walk(fs, m))
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"review source not found: {src}")
            if info.type == pafs.FileType.Directory:
                found.extend(_walk(fs, path))
            else:
                found.append((path, info.size))
        if not found:
            raise FileNotFoundError(f"no review files in {src} (known extensions: {sorted(_EXT_FORMAT)})")
        out.extend((fs, p, s) for p, s in found)
    return out


def _walk(fs: pafs.FileSystem, root: str) -> list[tuple[str, int]]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for i in infos:
        rel = i.path[len(root) :].lstrip("/")
        if i.type != pafs.FileType.File or any(_hidden(part) for part in rel.split("/")):
            continue
        if format_from_name(i.path) is None:
            continue  # README, SOURCES.md, manifests: a directory holds more than reviews
        files.append((i.path, i.size))
    return sorted(files)


# --- parsing -------------------------------------------------------------------------------------------
class _Rows:
    """Collects parsed rows column-wise and emits Arrow tables of `rows_per_block` rows."""

    def __init__(self, source: str, opts: ReadOptions) -> None:
        self.source, self.opts = source, opts
        self.cols: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}

    def good(self, row: int, text: str, key: str | None, title=None, rating=None, verified=None) -> None:
        c = self.cols
        c["text"].append(text)
        c["title"].append(title if isinstance(title, str) else None)
        c["key"].append(key if key else text)
        c["rating"].append(_to_float(rating))
        c["verified"].append(verified if isinstance(verified, bool) else None)
        c["source"].append(self.source)
        c["row"].append(row)
        c["reason"].append(None)

    def bad(self, row: int, reason: str, detail: str = "") -> None:
        if self.opts.strict:
            raise DataError(f"{self.source}: line {row}: {reason}{': ' + detail if detail else ''}")
        c = self.cols
        for name in ("text", "title", "key", "rating", "verified"):
            c[name].append(None)
        c["source"].append(self.source)
        c["row"].append(row)
        c["reason"].append(reason)

    def full(self) -> bool:
        return len(self.cols["row"]) >= self.opts.rows_per_block

    def take(self) -> pa.Table:
        table = pa.Table.from_pydict(self.cols, schema=ROW_SCHEMA)
        self.cols = {name: [] for name in ROW_SCHEMA.names}
        return table


def _to_float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _check_text(rows: _Rows, lineno: int, text: Any) -> bool:
    """Count and skip a missing, non-string, empty or NUL-holding text field; True if usable."""
    if text is None:
        rows.bad(lineno, "missing_text")
    elif not isinstance(text, str):
        rows.bad(lineno, "bad_text_type", f"text is {type(text).__name__}")
    elif not text.strip():
        rows.bad(lineno, "empty_text")
    elif "\x00" in text:
        rows.bad(lineno, "nul_byte")
    else:
        return True
    return False


def _lines(f, path: str, max_row_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes without the newline) for each line; None for a line over the cap,
    which is skipped without being held in memory. Read errors (truncated gzip...) name the file."""
    lineno, parts, size, skipping = 0, [], 0, False
    while True:
        try:
            chunk = f.read(1 << 20)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: cannot read (truncated or corrupt file?): {e}") from e
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            lineno += 1
            if skipping or size + len(piece) > max_row_bytes:
                yield lineno, None
            else:
                line = b"".join(parts) + piece if parts else piece
                yield lineno, line[:-1] if line.endswith(b"\r") else line
            parts, size, skipping = [], 0, False
        tail = pieces[-1]
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


def _decode(rows: _Rows, lineno: int, raw: bytes | None) -> str | None:
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


def _json_fields(obj: dict, schema: str, text_column: str) -> tuple[Any, Any, str | None, Any, Any]:
    """(text, title, key, rating, verified) of one JSON record under the 2014/2018 or 2023 schema."""
    if schema == "auto":
        if "reviewText" in obj or "reviewerID" in obj or "overall" in obj:
            schema = "json2014"
        elif "text" in obj and ("rating" in obj or "user_id" in obj or "parent_asin" in obj):
            schema = "json2023"
    if schema == "json2014":
        key = f"{obj['reviewerID']}|{obj.get('asin', '')}" if "reviewerID" in obj else None
        return obj.get("reviewText"), obj.get("summary"), key, obj.get("overall"), obj.get("verified")
    if schema == "json2023":
        key = None
        if "user_id" in obj:
            key = f"{obj['user_id']}|{obj.get('asin', '')}|{obj.get('timestamp', '')}"
        return obj.get("text"), obj.get("title"), key, obj.get("rating"), obj.get("verified_purchase")
    return obj.get(text_column), obj.get("title") or obj.get("summary"), None, obj.get("rating"), None


def _parse_json(f, path: str, opts: ReadOptions, rows: _Rows) -> Iterator[pa.Table]:
    schema = opts.format if opts.format in ("json2014", "json2023") else "auto"
    for lineno, raw in _lines(f, path, opts.max_row_bytes):
        if raw is not None and not raw.strip():
            continue  # blank lines (a trailing newline or two) are not records
        line = _decode(rows, lineno, raw)
        if line is not None:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.bad(lineno, "invalid_json", str(e))
                obj = None
            if obj is not None and not isinstance(obj, dict):
                rows.bad(lineno, "invalid_json", f"a JSON {type(obj).__name__}, not an object")
            elif obj is not None:
                text, title, key, rating, verified = _json_fields(obj, schema, opts.text_column)
                if _check_text(rows, lineno, text):
                    rows.good(lineno, text, key, title, rating, verified)
        if rows.full():
            yield rows.take()


_TSV_TEXT = ("review_body",)


def _parse_tsv(f, path: str, opts: ReadOptions, rows: _Rows) -> Iterator[pa.Table]:
    header: list[str] | None = None
    for lineno, raw in _lines(f, path, opts.max_row_bytes):
        if raw is not None and not raw.strip():
            continue
        if header is None:
            if raw is None or b"\x00" in raw:
                raise DataError(f"{path}: line {lineno}: unreadable TSV header")
            header = raw.decode("utf-8", "replace").split("\t")
            text_col = next((c for c in (*_TSV_TEXT, opts.text_column) if c in header), None)
            if text_col is None:
                raise DataError(
                    f"{path}: TSV header has no review_body or {opts.text_column!r} column: {header[:15]}"
                )
            i_text = header.index(text_col)
            continue
        line = _decode(rows, lineno, raw)
        if line is not None:
            fields = line.split("\t")
            if len(fields) != len(header):
                rows.bad(
                    lineno, "wrong_columns", f"expected {len(header)} tab-separated fields, got {len(fields)}"
                )
            elif _check_text(rows, lineno, fields[i_text]):
                rec = dict(zip(header, fields))
                vp = rec.get("verified_purchase")
                rows.good(
                    lineno,
                    fields[i_text],
                    rec.get("review_id"),
                    rec.get("review_headline"),
                    rec.get("star_rating"),
                    None if vp is None else vp.upper() == "Y",
                )
        if rows.full():
            yield rows.take()


def _parse_text(f, path: str, opts: ReadOptions, rows: _Rows) -> Iterator[pa.Table]:
    label = re.compile(r"\t[0-9]\s*$")  # UCI "sentence<TAB>0/1"
    for lineno, raw in _lines(f, path, opts.max_row_bytes):
        if raw is not None and not raw.strip():
            continue
        line = _decode(rows, lineno, raw)
        if line is not None:
            text = label.sub("", line)
            if _check_text(rows, lineno, text):
                rows.good(lineno, text, None)
        if rows.full():
            yield rows.take()


def _csv_key(rec: dict) -> str | None:
    if rec.get("reviewerID"):
        return f"{rec['reviewerID']}|{rec.get('asin', '')}"
    if rec.get("review_id"):
        return rec["review_id"]
    if rec.get("user_id"):
        return f"{rec['user_id']}|{rec.get('asin', '')}|{rec.get('timestamp', '')}"
    return None


def _parse_csv(f, path: str, opts: ReadOptions, rows: _Rows) -> Iterator[pa.Table]:
    # CSV fields may span lines, so the csv module parses a stream of decoded lines. Invalid UTF-8 is
    # carried through as surrogates (surrogateescape) and the record holding it is skipped afterwards.
    csv.field_size_limit(max(opts.max_row_bytes, 131072))
    lines = (
        (raw if raw is not None else b"").decode("utf-8", "surrogateescape") + "\n"
        for _, raw in _lines(f, path, 1 << 62)
    )
    reader = csv.reader(lines, strict=False)
    header: list[str] | None = None
    text_col = title_col = None
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.bad(start, "too_long" if "field larger" in str(e) else "csv_error", str(e))
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if header is None:
            header = fields
            text_col = next(
                (c for c in ("reviewText", "review_body", opts.text_column, "text") if c in header), None
            )
            if text_col is None:
                raise DataError(
                    f"{path}: CSV header has no reviewText/review_body/{opts.text_column!r} column: {header[:15]}"
                )
            title_col = next((c for c in ("summary", "review_headline", "title") if c in header), None)
            continue
        if len(fields) != len(header):
            rows.bad(start, "wrong_columns", f"expected {len(header)} fields, got {len(fields)}")
        elif sum(len(x) for x in fields) > opts.max_row_bytes:
            rows.bad(start, "too_long", f"over max_row_bytes={opts.max_row_bytes}")
        elif any(_has_surrogate(x) for x in fields):
            rows.bad(start, "invalid_utf8")
        else:
            rec = dict(zip(header, fields))
            if _check_text(rows, start, rec[text_col]):
                vp = rec.get("verified") or rec.get("verified_purchase")
                rating = rec.get("overall") or rec.get("star_rating") or rec.get("rating")
                rows.good(
                    start,
                    rec[text_col],
                    _csv_key(rec),
                    rec.get(title_col) if title_col else None,
                    rating,
                    None if vp is None else vp.strip().lower() in ("true", "y", "1"),
                )
        if rows.full():
            yield rows.take()


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


_BLITZER_TAG = re.compile(r"^<(/?)([a-z_]+)>$")


def _parse_blitzer(f, path: str, opts: ReadOptions, rows: _Rows) -> Iterator[pa.Table]:
    rec: dict[str, list[str]] | None = None
    field_name, start, bad = None, 0, None
    for lineno, raw in _lines(f, path, opts.max_row_bytes):
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
            if not m.group(1):
                rec, field_name, start, bad = {}, None, lineno, None
            elif rec is not None:
                if bad:
                    rows.bad(start, bad)
                else:
                    text = "\n".join(rec.get("review_text", [])).strip()
                    title = " ".join(rec.get("title", [])).strip() or None
                    uid = " ".join(rec.get("unique_id", [])).strip() or None
                    rating = " ".join(rec.get("rating", [])).strip() or None
                    if _check_text(rows, start, text):
                        rows.good(start, text, uid, title, rating)
                rec = None
        elif m and rec is not None:
            field_name = None if m.group(1) else m.group(2)
            if field_name:
                rec.setdefault(field_name, [])
        elif rec is not None and field_name:
            rec[field_name].append(line)
        if rows.full():
            yield rows.take()


_PARSERS = {
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
    head = first.lstrip()
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


class ReviewDatasource(FileBasedDatasource):
    """Streams review files line by line and parses them by format into `ROW_SCHEMA` rows."""

    def __init__(
        self, paths: list[str], opts: ReadOptions, filesystem: pafs.FileSystem | None = None
    ) -> None:
        super().__init__(paths, filesystem=filesystem)
        self.opts = opts

    def _open_input_source(self, filesystem, path: str, **open_args):
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except OSError as e:
            raise DataError(f"{path}: cannot open: {e}") from e

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        fmt = self.opts.format if self.opts.format != "auto" else format_from_name(path)
        if fmt is None:
            try:
                head = f.read(1 << 16)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: cannot read (truncated or corrupt file?): {e}") from e
            fmt, f = sniff_format(head), _Peeked(head, f)
        if fmt == "parquet":
            raise DataError(f"{path}: Parquet is read by read_parquet, not line by line")
        rows = _Rows(path, self.opts)
        yield from _PARSERS[fmt](f, path, self.opts, rows)
        if rows.cols["row"]:
            yield rows.take()


# --- Parquet -------------------------------------------------------------------------------------------
def _parquet_rows(batch: pa.Table, text_column: str) -> pa.Table:
    n = batch.num_rows
    names = set(batch.column_names)
    col = lambda name: batch.column(name).to_pylist() if name in names else [None] * n  # noqa: E731
    texts = col(
        text_column if text_column in names else ("reviewText" if "reviewText" in names else "review_body")
    )
    titles = col("title") if "title" in names else col("summary")
    keys = col("review_id") if "review_id" in names else [None] * n
    if "reviewerID" in names:
        keys = [f"{a}|{b}" for a, b in zip(col("reviewerID"), col("asin"))]
    ratings = col("rating") if "rating" in names else col("overall")
    paths = col("path")
    out = {name: [] for name in ROW_SCHEMA.names}
    for i in range(n):
        t = texts[i]
        reason = None
        if t is None:
            reason = "missing_text"
        elif not isinstance(t, str):
            reason = "bad_text_type"
        elif not t.strip():
            reason = "empty_text"
        elif "\x00" in t:
            reason = "nul_byte"
        good = reason is None
        out["text"].append(t if good else None)
        out["title"].append(titles[i] if good and isinstance(titles[i], str) else None)
        out["key"].append((str(keys[i]) if keys[i] else t) if good else None)
        out["rating"].append(_to_float(ratings[i]) if good else None)
        out["verified"].append(None)
        out["source"].append(paths[i])
        out["row"].append(0)
        out["reason"].append(reason)
    return pa.Table.from_pydict(out, schema=ROW_SCHEMA)


def read_parquet(paths, **kwargs):
    """ray.data.read_parquet through the v1 datasource (`ray_env.v1_parquet_reader`)."""
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
    import ray

    files = resolve_files(sources)
    # One read per (filesystem, reader) pair: all local files share one LocalFileSystem.
    groups: dict[tuple[Any, bool], tuple[pafs.FileSystem, list[str]]] = {}
    for fs, path, _ in files:
        is_parquet = (opts.format == "parquet") or (
            opts.format == "auto" and format_from_name(path) == "parquet"
        )
        fs_key = "local" if isinstance(fs, pafs.LocalFileSystem) else id(fs)
        groups.setdefault((fs_key, is_parquet), (fs, []))[1].append(path)
    datasets = []
    for (_, is_parquet), (fs, paths) in groups.items():
        if is_parquet:
            ds = read_parquet(
                paths, filesystem=fs, include_paths=True, override_num_blocks=override_num_blocks
            )
            ds = ds.map_batches(
                _parquet_rows,
                fn_kwargs={"text_column": opts.text_column},
                batch_format="pyarrow",
                batch_size=opts.rows_per_block,
            )
        else:
            ds = ray.data.read_datasource(
                ReviewDatasource(paths, opts, filesystem=fs), override_num_blocks=override_num_blocks
            )
        datasets.append(ds)
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])

    def uri(fs: pafs.FileSystem, path: str) -> str:
        return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"

    return ds, [{"path": uri(fs, p), "size": s, "source": p} for fs, p, s in files]
