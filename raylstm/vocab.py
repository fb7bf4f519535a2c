"""CharVocab: characters <-> ids, built from aggregated character counts.

Id 0 is the unknown symbol; the rest are characters in a deterministic order (count descending, then code
point), so the same counts always give the same ids on every machine. The vocabulary travels as
`vocab.json` with prepared data and with every checkpoint; a checkpoint refuses a vocabulary that differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

UNK = "\ufffd"  # what an unknown id decodes to: the Unicode replacement character


class CharVocab:
    """A character vocabulary. `encode` maps unknown characters to id 0 (`unk_id`)."""

    unk_id = 0

    def __init__(self, chars: Iterable[str], counts: Mapping[str, int] | None = None) -> None:
        self.chars: list[str] = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary entries must be distinct single characters")
        if UNK in self.chars:
            raise ValueError("the unknown symbol U+FFFD cannot also be a vocabulary character")
        self.counts: dict[str, int] = dict(counts or {})
        self.itos: list[str] = [UNK, *self.chars]
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos) if i > 0}
        # Fast path for encode: a lookup table over code points below 65536.
        self._table = np.zeros(65536, dtype=np.int32)
        for c, i in self.stoi.items():
            if ord(c) < 65536:
                self._table[ord(c)] = i

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> CharVocab:
        """Keep characters seen at least `min_count` times, most frequent first (ties by code point)."""
        kept = [c for c, n in counts.items() if n >= min_count and len(c) == 1 and c != UNK]
        kept.sort(key=lambda c: (-counts[c], ord(c)))
        return cls(kept, {c: int(counts[c]) for c in kept})

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.itos == other.itos

    def __contains__(self, ch: str) -> bool:
        return ch in self.stoi

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids; characters outside the vocabulary become `unk_id`."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if codes.size and int(codes.max()) >= 65536:
            return np.fromiter((self.stoi.get(c, 0) for c in text), dtype=np.int32, count=len(text))
        return self._table[codes]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of `text` that the vocabulary does not know, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(self.itos).encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"version": 1, "unk": UNK, "chars": self.chars, "counts": self.counts}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=True, indent=0)

    @classmethod
    def from_dict(cls, d: Mapping) -> CharVocab:
        if d.get("version") != 1 or not isinstance(d.get("chars"), list):
            raise ValueError("not a raylstm vocabulary (expected version 1 with a 'chars' list)")
        return cls(d["chars"], d.get("counts") or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}: invalid vocabulary: {e}") from e
