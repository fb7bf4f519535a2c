"""The vocabulary of conditions: a review's star rating and category as ids a conditioned model reads.

A conditioned model (`ModelConfig.conditions`, e.g. ["rating", "category"]) reads, beside every
character, one id per condition field (Lipton, Vikram & McAuley 2015's concatenative scheme):

    field      id 0        ids 1..
    rating     missing     "1" "2" "3" "4" "5"         (always all five: any of them can be asked for)
    category   missing     the categories of the training split, sorted

"Missing is its own value": a review whose format records no rating (or a category the training split
never saw) gets id 0, and so does a prompt that asks for no value. The vocabulary travels as
`conditions.json` with every conditioned checkpoint (the embedding tensors are in model.safetensors), and
its training counts are the prior of Bayes' rule when a review's rating is read back (raylstm.classify).

Pure Python + numpy: no Ray, no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("rating", "category")  # the columns of the prepared shards a model can be conditioned on
RATINGS = ("1", "2", "3", "4", "5")
MISSING = None  # the value of id 0 in every field (JSON null)


class ConditionError(ValueError):
    """An unknown condition field or value; `field` names it (the HTTP layer answers 422 for that field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:  # pickles with its field (Ray ships exceptions between processes)
        return type(self), (self.field, str(self))


def rating_value(r: Any) -> str | None:
    """A shard's rating (a float or None) as a condition value: "1".."5" for whole stars, else missing.
    (Half stars, 0 or 10-point scales are no star rating this vocabulary knows.)"""
    if r is None or isinstance(r, bool):
        return None
    try:
        x = float(r)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        return None
    if not math.isfinite(x) or x != round(x) or not 1 <= x <= 5:
        return None
    return str(int(x))


def category_value(c: Any) -> str | None:
    return c if isinstance(c, str) and c.strip() else None


def field_value(field: str, raw: Any) -> str | None:
    """The condition value of one review's column `field` (a shard's rating float or category string)."""
    return rating_value(raw) if field == "rating" else category_value(raw)


class ConditionVocab:
    """Ids of the values of each condition field, and how often each (joint) value set occurred in the
    training split (the prior of `raylstm.classify`)."""

    def __init__(
        self,
        fields: Sequence[str],
        values: Mapping[str, Sequence[str]],
        joint_counts: Mapping[tuple[str | None, ...], int] | None = None,
    ) -> None:
        unknown = [f for f in fields if f not in FIELDS]
        if unknown or not fields or len(set(fields)) != len(fields):
            raise ValueError(
                f"condition fields must be distinct names out of {list(FIELDS)}, got {list(fields)}"
            )
        self.fields: tuple[str, ...] = tuple(fields)
        # values[field][i - 1] is the value of id i; id 0 is missing.
        self.values: dict[str, list[str]] = {f: [str(v) for v in values[f]] for f in self.fields}
        for f, vs in self.values.items():
            if len(set(vs)) != len(vs):
                raise ValueError(f"condition field {f!r} lists a value twice: {vs}")
        self.ids: dict[str, dict[str, int]] = {
            f: {v: i + 1 for i, v in enumerate(vs)} for f, vs in self.values.items()
        }
        self.joint_counts: dict[tuple[str | None, ...], int] = {
            tuple(k): int(n) for k, n in (joint_counts or {}).items()
        }

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, fields: Sequence[str], joint_counts: Mapping[tuple, int]) -> ConditionVocab:
        """From the training split's counts of (value of each field) tuples, in `fields` order; ratings
        always get all five stars, categories the ones seen."""
        values: dict[str, list[str]] = {}
        for j, f in enumerate(fields):
            if f == "rating":
                values[f] = list(RATINGS)
            else:
                values[f] = sorted({k[j] for k in joint_counts if k[j] is not None})
        return cls(fields, values, joint_counts)

    # --- ids ------------------------------------------------------------------------------------------
    @property
    def sizes(self) -> list[int]:
        """Embedding rows per field: the values plus the missing id 0."""
        return [len(self.values[f]) + 1 for f in self.fields]

    def id_of(self, field: str, value: str | None) -> int:
        """The id of a data value (unknown values, like missing ones, are id 0: the data is not refused)."""
        return 0 if value is None else self.ids[field].get(value, 0)

    def value_of(self, field: str, i: int) -> str | None:
        return None if i == 0 else self.values[field][i - 1]

    def encode_rows(self, columns: Mapping[str, Sequence[Any]]) -> np.ndarray:
        """Shard columns {"rating": floats, "category": strings} -> int16 ids [N, F] (fields in order)."""
        n = len(columns[self.fields[0]])
        out = np.zeros((n, len(self.fields)), dtype=np.int16)
        for j, f in enumerate(self.fields):
            ids = self.ids[f]
            for i, raw in enumerate(columns[f]):
                v = field_value(f, raw)
                out[i, j] = 0 if v is None else ids.get(v, 0)
        return out

    def request_ids(self, requested: Mapping[str, Any]) -> list[int]:
        """Ids of the values a request asks for ({"rating": 1, "category": "Books"}); fields it leaves out
        (or sets to None) are missing. An unknown field or value is refused, naming it and the valid ones."""
        for name in requested:
            if name not in self.fields:
                raise ConditionError(
                    name,
                    f"{name}: this model is conditioned on {list(self.fields)} only"
                    if self.fields
                    else f"{name}: this model is not conditioned on anything",
                )
        out = []
        for f in self.fields:
            raw = requested.get(f)
            if raw is None:
                out.append(0)
                continue
            value = rating_value(raw) if f == "rating" else str(raw)
            if value is None or value not in self.ids[f]:
                valid = ", ".join(repr(v) if f == "category" else v for v in self.values[f])
                raise ConditionError(f, f"{f} {raw!r} is not one this model knows; valid values: {valid}")
            out.append(self.ids[f][value])
        return out

    # --- the training prior ---------------------------------------------------------------------------
    def prior(self, combos: Sequence[Sequence[int]], smoothing: float = 1.0) -> np.ndarray:
        """log P(combo) over candidate id tuples (one id per field) from the training counts, add-one
        smoothed and normalised over the candidates: Bayes' rule's prior in raylstm.classify."""
        counts = np.array(
            [
                self.joint_counts.get(tuple(self.value_of(f, i) for f, i in zip(self.fields, c)), 0)
                for c in combos
            ],
            dtype=np.float64,
        )
        p = counts + smoothing
        return np.log(p / p.sum())

    # --- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "fields": list(self.fields),
            "values": self.values,
            # [[value of each field (null = missing)], count] in the training split
            "joint_counts": [[list(k), n] for k, n in sorted(self.joint_counts.items(), key=_sort_key)],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionVocab:
        if d.get("version") != 1 or not isinstance(d.get("fields"), list):
            raise ValueError("not a raylstm condition vocabulary (expected version 1 with a 'fields' list)")
        joint = {tuple(k): int(n) for k, n in d.get("joint_counts") or []}
        return cls(d["fields"], d["values"], joint)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=True, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ConditionVocab:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: invalid condition vocabulary: {e}") from e

    def fingerprint(self) -> str:
        """Of the ids only (fields and values): the counts may differ without changing what an id means."""
        ids = json.dumps([list(self.fields), [self.values[f] for f in self.fields]])
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConditionVocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ConditionVocab({', '.join(f'{f}: {len(self.values[f])}' for f in self.fields)})"


def _sort_key(item: tuple[tuple, int]) -> tuple:
    return tuple("" if v is None else v for v in item[0])
