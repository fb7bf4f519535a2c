"""The one field table: which column of each published review layout is the text, title, key, rating,
verified flag and category, and the one set of checks every parsed record goes through.

Every reader in `sources.py` (JSON lines, TSV, CSV, Parquet, Blitzer, plain text) turns a record into the
same six values through this table, so the same review read from any format gets the same key (hence the
same split and the same dedupe winner), rating, verified flag and category:

| layout   | where it is found                           | text          | title            | key parts                  | rating        | verified            | category                        |
|----------|---------------------------------------------|---------------|------------------|----------------------------|---------------|---------------------|---------------------------------|
| tsv      | Amazon Customer Reviews `*_v1_00.tsv`       | review_body   | review_headline  | review_id                  | star_rating   | verified_purchase   | product_category                |
| json2014 | McAuley 2014/2018 JSON, Kaggle CSV          | reviewText    | summary          | reviewerID, asin           | overall       | verified            | category, main_category         |
| json2023 | Amazon Reviews 2023 JSON lines              | text          | title            | user_id, asin, timestamp   | rating        | verified_purchase   | category, main_category         |
| blitzer  | Blitzer et al. `*.review` pseudo-XML        | review_text   | title            | unique_id                  | rating        | -                   | the file's directory (`books`)  |
| generic  | anything else (plain text, other Parquet)   | data.text_column | title, summary | review_id                | rating        | -                   | category, main_category         |

A layout is recognised by its columns (a header, a Parquet schema, or one JSON object's keys), the same
way for every container format: a CSV or Parquet file with the 2023 columns is read as json2023. Where a
file records no category, `DataConfig.categories` (file glob -> category) supplies one; else it is null.

Values are normalised here, once: a rating is a finite float ("5", 5 and 5.0 are all 5.0), a verified flag
a bool (true/"Y"/"true"/1), a key part a string (the integer 1588687728923 and the CSV string
"1588687728923" give the same key), and text must be a non-empty string with no NUL and no lone UTF-16
surrogate (a JSON escape such as "\\ud800" decodes to one; Arrow cannot store it).
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Column names of one review layout; each field lists candidates, the first present wins."""

    name: str
    text: tuple[str, ...]
    title: tuple[str, ...]
    key: tuple[str, ...]  # joined with "|"; without the first part the row's key is its text
    rating: tuple[str, ...]
    verified: tuple[str, ...]
    category: tuple[str, ...]
    marks: tuple[str, ...]  # any of these columns identifies the layout

    def columns(self) -> set[str]:
        return {*self.text, *self.title, *self.key, *self.rating, *self.verified, *self.category}


_CATEGORY = ("category", "main_category")
LAYOUTS: dict[str, Layout] = {
    "tsv": Layout(
        "tsv",
        text=("review_body",),
        title=("review_headline",),
        key=("review_id",),
        rating=("star_rating",),
        verified=("verified_purchase",),
        category=("product_category",),
        marks=("review_body",),
    ),
    "json2014": Layout(
        "json2014",
        text=("reviewText",),
        title=("summary",),
        key=("reviewerID", "asin"),
        rating=("overall",),
        verified=("verified",),
        category=_CATEGORY,
        marks=("reviewText", "reviewerID", "overall"),
    ),
    "json2023": Layout(
        "json2023",
        text=("text",),
        title=("title",),
        key=("user_id", "asin", "timestamp"),
        rating=("rating",),
        verified=("verified_purchase",),
        category=_CATEGORY,
        marks=("user_id", "parent_asin"),
    ),
    "blitzer": Layout(
        "blitzer",
        text=("review_text",),
        title=("title",),
        key=("unique_id",),
        rating=("rating",),
        verified=(),
        category=(),
        marks=("review_text", "unique_id"),
    ),
}
# Order matters where a file could match two: TSV's review_body first, then 2014 (reviewText is unique to
# it), then 2023 (its "text" and "rating" are generic names, so it is identified by user_id/parent_asin).
_DETECT = ("tsv", "json2014", "json2023")


@functools.lru_cache(maxsize=32)
def generic_layout(text_column: str) -> Layout:
    """Files that match no published layout: the text is `DataConfig.text_column`."""
    return Layout(
        "generic",
        text=(text_column,),
        title=("title", "summary"),
        key=("review_id",),
        rating=("rating",),
        verified=("verified_purchase", "verified"),
        category=_CATEGORY,
        marks=(),
    )


def detect_layout(columns: Mapping[str, Any] | Sequence[str], text_column: str = "text") -> Layout:
    """The layout whose marking columns appear in `columns` (a header, a schema's names, a JSON object).
    A 2023-style object without user_id/parent_asin but with text and rating is still 2023."""
    for name in _DETECT:  # plain loops: this runs once per JSON object
        layout = LAYOUTS[name]
        for m in layout.marks:
            if m in columns:
                return layout
    if "text" in columns and "rating" in columns:
        return LAYOUTS["json2023"]
    return generic_layout(text_column)


def layout_for(format_name: str, columns: Mapping[str, Any] | Sequence[str], text_column: str) -> Layout:
    """`data.format` json2014/json2023 force that layout; any other format detects it from the columns."""
    return (
        LAYOUTS[format_name]
        if format_name in ("json2014", "json2023")
        else detect_layout(columns, text_column)
    )


# --- value normalisation: one definition for every format ---------------------------------------------
_TRUE = frozenset({"y", "yes", "true", "t", "1"})
_FALSE = frozenset({"n", "no", "false", "f", "0"})
_VERIFIED_EXACT = {"Y": True, "N": False, "True": True, "False": False, "true": True, "false": False}


def as_rating(v: Any) -> float | None:
    """A finite float, or None ("5" / 5 / 5.0 -> 5.0; a bool, NaN, inf, 1e999 or 10**400 -> None)."""
    if type(v) is float:  # the common case first: this runs once per record
        return v if v - v == 0.0 else None  # False for NaN and +-inf
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def as_verified(v: Any) -> bool | None:
    """True/False from a bool, "Y"/"N", "true"/"false", 1/0; anything else None (not recorded)."""
    if v is True or v is False or v is None:
        return v
    if type(v) is str and v in _VERIFIED_EXACT:  # "Y"/"N" (TSV), "True"/"False" (CSV): no strip/lower
        return _VERIFIED_EXACT[v]
    if isinstance(v, str):
        s = v.strip().lower()
        return True if s in _TRUE else False if s in _FALSE else None
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    return None


def as_key_part(v: Any) -> str | None:
    """A key part as a string; the integer 7 and the strings "7" and 7.0 agree. Lists, dicts -> None."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer() and abs(v) < 2**53:
            return str(int(v))
        return repr(v)
    return None


def make_key(parts: Sequence[Any]) -> str | None:
    """ "a|b|c" from the key parts; None (the row's text becomes its key) without the first part."""
    first = as_key_part(parts[0]) if parts else None
    if not first:
        return None
    return "|".join([first, *((as_key_part(p) or "") for p in parts[1:])])


def as_label(v: Any) -> str | None:
    """A title or category: a non-blank string, else None."""
    if isinstance(v, str):
        return v if v and not v.isspace() else None
    return None


def text_reason(text: Any) -> str | None:
    """Why a record's text cannot be used (a manifest key), or None. The one text check of every reader."""
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "bad_text_type"
    if not text.strip():
        return "empty_text"
    if "\x00" in text:
        return "nul_byte"
    return None


def has_surrogate(s: str) -> bool:
    """True when `s` holds a lone UTF-16 surrogate (from a JSON escape or a surrogateescape decode)."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- one record -> the row's values -------------------------------------------------------------------
# What `extract` returns, in this order (a plain tuple: this runs once per record, in the hot loop). The
# text is returned unchecked (`text_reason` decides); the rest is normalised.
FIELDS = ("text", "title", "key", "rating", "verified", "category")


def record_fields(layout: Layout) -> Callable[[Callable[[str], Any]], tuple]:
    """A function mapping one record (any `get(column) -> value | None`, e.g. a JSON object's `.get`) to
    its `FIELDS` through `layout`. Built once per layout: it runs once per record, in the hot loop."""
    texts, titles, ratings, verifieds, categories = (
        layout.text,
        layout.title,
        layout.rating,
        layout.verified,
        layout.category,
    )
    key_first, key_rest = (layout.key[0], layout.key[1:]) if layout.key else (None, ())

    def first(get: Callable[[str], Any], names: tuple[str, ...]) -> Any:
        for n in names:
            v = get(n)
            if v is not None:
                return v
        return None

    # One-column fields (all but a few) read directly; first() only where a field has candidates.
    def one(names: tuple[str, ...]) -> str | None:
        return names[0] if len(names) == 1 else None

    text1, title1, rating1, verified1 = one(texts), one(titles), one(ratings), one(verifieds)

    def fields(get: Callable[[str], Any]) -> tuple:
        key = None
        if key_first is not None:
            k = get(key_first)
            if type(k) is not str:
                k = as_key_part(k)
            if k:
                key = k
                for n in key_rest:
                    v = get(n)
                    key += "|" + (v if type(v) is str else (as_key_part(v) or ""))
        return (
            get(text1) if text1 else first(get, texts),
            as_label(get(title1) if title1 else first(get, titles)),
            key,
            as_rating(get(rating1) if rating1 else first(get, ratings)),
            as_verified(get(verified1) if verified1 else first(get, verifieds)),
            as_label(first(get, categories)) if categories else None,
        )

    return fields


def extract(layout: Layout, get: Callable[[str], Any]) -> tuple:
    """`FIELDS` of one record through `layout` (see `record_fields` for the per-record hot path)."""
    return record_fields(layout)(get)


class ColumnMap:
    """A layout resolved against a fixed column list (TSV/CSV header, Parquet schema): indices, so a row
    (a list of values) maps without building a dict per row."""

    def __init__(self, layout: Layout, columns: Sequence[str]) -> None:
        self.layout = layout
        index = {c: i for i, c in reversed(list(enumerate(columns)))}  # first occurrence wins

        def first(names: tuple[str, ...]) -> int | None:
            return next((index[n] for n in names if n in index), None)

        self.text = first(layout.text)
        self.title, self.rating = first(layout.title), first(layout.rating)
        self.verified, self.category = first(layout.verified), first(layout.category)
        self.key = tuple(index.get(k) for k in layout.key)
        self.needed = sorted(
            {
                i
                for i in (self.text, self.title, self.rating, self.verified, self.category, *self.key)
                if i is not None
            }
        )

        self.extract = self._row_fields()

    def _row_fields(self) -> Callable[[Sequence[Any]], tuple]:
        """`FIELDS` of one row (a list of values), by index; built once, run once per row."""
        i_text, i_title, i_rating, i_verified, i_category = (
            self.text,
            self.title,
            self.rating,
            self.verified,
            self.category,
        )
        key_first, key_rest = (self.key[0], self.key[1:]) if self.key else (None, ())

        def fields(row: Sequence[Any]) -> tuple:
            key = None
            if key_first is not None:
                k = row[key_first]
                if type(k) is not str:
                    k = as_key_part(k)
                if k:
                    key = k
                    for i in key_rest:
                        v = None if i is None else row[i]
                        key += "|" + (v if type(v) is str else (as_key_part(v) or ""))
            return (
                None if i_text is None else row[i_text],
                None if i_title is None else as_label(row[i_title]),
                key,
                None if i_rating is None else as_rating(row[i_rating]),
                None if i_verified is None else as_verified(row[i_verified]),
                None if i_category is None else as_label(row[i_category]),
            )

        return fields


def category_for(source: str, categories: Sequence[tuple[str, str]]) -> str | None:
    """The configured category of a file: the first (glob, category) whose glob matches its path or name."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    for pattern, category in categories:
        if fnmatch.fnmatch(source, pattern) or fnmatch.fnmatch(name, pattern):
            return category
    return None
