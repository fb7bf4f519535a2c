"""Bits per character on held-out reviews, beside the baselines a reader needs to judge the number.

Everything here is measured on ONE string, built the way training builds its stream: each held-out
review followed by "\\n" (the end-of-review marker), in a deterministic order (by review key).

    model bpc      = -sum log2 p(char | the review so far) / chars, over every char of the string.
                     Each review is scored from a zero LSTM state after a "\\n" (the end of "the previous
                     review"), which is also how training windows start mid-stream; so the figure does
                     not depend on the order of reviews or on how they are batched or sharded.
    unigram        = entropy of the string's own character distribution: the best any order-0 model
                     could do on it (a lower bound for frequency-only coding; fit on the test text itself).
    compressor bpc = 8 * (size(C(train + test)) - size(C(train))) / chars(test): the conditional cost
                     of the held-out text for a compressor that has already read the training split,
                     which is what a trained model has also seen. ("xz: 2.10 bpc on the last 10% of the
                     reviews given the first 90%" is this measure; `reference_figures` reproduces it.)
                     With no training text the measure is the plain 8 * size(C(test)) / chars(test).

Compressor settings (fixed, the strongest usual levels): gzip -9 (deflate via zlib, gzip container),
bzip2 -9, xz -9e (LZMA2, 64 MiB dictionary), and PPMd var. H (the 7-Zip PPMd) at order 6 / 16 MiB
(7-Zip's default) and at order 16 / 192 MiB (a large setting; order 32 scores the same here).

Model scoring is a plain torch loop on the driver over length-sorted, padded batches of whole reviews
(each review in one forward pass, no chunking: reviews are at most a few thousand chars): a held-out
split of a few MB takes seconds to a minute on 2 cores. Above `RAY_SCORE_MIN_CHARS` the model is run
by `ray_score_by_source` as parallel Ray Data actors over blocks of the split, and the bits are summed
(the same numbers: scoring is per review). Either way each review is scored once, and the per-file
figures are a group-by of those per-review bits over the split's `source` column. The compressors
need the held-out and training text as strings on the driver in any case; the training context is
capped at its last 64 MiB (xz's dictionary size).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import lzma
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raylstm.config import DataConfig
from raylstm.text import (
    EOR,
)  # the end-of-review marker; also the context each review's first char is predicted from

if TYPE_CHECKING:
    from raylstm.checkpoint import LoadedCheckpoint

# ---------------------------------------------------------------------------------------------------------
# Compressor baselines
# ---------------------------------------------------------------------------------------------------------


def _ppmd(order: int, mem_mib: int) -> Callable[[bytes], bytes]:
    def compress(data: bytes) -> bytes:
        import pyppmd  # a runtime dependency, imported only when a PPMd figure is asked for

        return pyppmd.compress(data, max_order=order, mem_size=mem_mib << 20, variant="H")

    return compress


@dataclass(frozen=True)
class Compressor:
    name: str
    setting: str  # the equivalent command line, for the report
    compress: Callable[[bytes], bytes]


COMPRESSORS: dict[str, Compressor] = {
    c.name: c
    for c in (
        # mtime=0: the header must not depend on the clock (same bytes every run).
        Compressor("gzip", "gzip -9", lambda b: gzip.compress(b, compresslevel=9, mtime=0)),
        Compressor("bz2", "bzip2 -9", lambda b: bz2.compress(b, compresslevel=9)),
        Compressor("xz", "xz -9e", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)),
        Compressor("ppmd", "7z -m0=PPMd:o=6:mem=16m", _ppmd(6, 16)),
        Compressor("ppmd-o16", "7z -m0=PPMd:o=16:mem=192m", _ppmd(16, 192)),
    )
}


def compressed_bits(name: str, text: str, context: str = "") -> int:
    """Bits a compressor spends on `text` after having read `context` (0 context: plain size)."""
    comp = COMPRESSORS[name].compress
    data = text.encode("utf-8")
    if not context:
        return 8 * len(comp(data))
    ctx = context.encode("utf-8")
    return 8 * (len(comp(ctx + data)) - len(comp(ctx)))


def compressor_bpc(text: str, context: str = "", names: Sequence[str] | None = None) -> dict[str, float]:
    """Bits per character of `text` for each compressor, conditional on `context` (see module doc).

    Per *character*, not per byte: for non-ASCII text the compressors pay for UTF-8 bytes, and that is
    the honest price of the same characters.
    """
    if not text:
        raise ValueError("compressor_bpc: empty text")
    return {n: compressed_bits(n, text, context) / len(text) for n in (names or COMPRESSORS)}


def unigram_entropy_bpc(text: str) -> float:
    """Entropy in bits of the text's own character distribution (order-0, fit on the text itself)."""
    if not text:
        raise ValueError("unigram_entropy_bpc: empty text")
    counts = np.fromiter(Counter(text).values(), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def unigram_cross_entropy_bpc(text: str, context: str) -> float:
    """Bits per char of `text` under the char frequencies of `context` (add-one over both alphabets)."""
    ctx = Counter(context)
    alphabet = set(ctx) | set(text)
    total = sum(ctx.values()) + len(alphabet)
    bits = sum(n * -math.log2((ctx.get(c, 0) + 1) / total) for c, n in Counter(text).items())
    return bits / len(text)


def join_reviews(texts: Iterable[str]) -> str:
    """The evaluation string: every review followed by the end-of-review marker, as in training."""
    return "".join(t + EOR for t in texts)


# ---------------------------------------------------------------------------------------------------------
# Model bits per character
# ---------------------------------------------------------------------------------------------------------


def review_bits(
    model: Any,
    vocab: Any,
    texts: Sequence[str],
    *,
    max_batch_chars: int = 65_536,
    max_batch: int = 128,
    device: str = "cpu",
    conditions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per review of `texts`: (bits, chars scored, unknown chars), each review + "\\n" scored from "\\n".

    `conditions` [len(texts), F]: a conditioned model's condition ids of each review (raylstm.conditions),
    read at every position of it; None reads a conditioned model with every field missing.

    Reviews are sorted by length and packed into padded batches of at most `max_batch_chars` padded
    positions, so a few long reviews do not pad thousands of short ones. Per review (in the order of
    `texts`), so that any grouping of the reviews (a shard, a source file) sums exactly.
    """
    import torch

    eor_id = vocab.stoi.get(EOR)
    if eor_id is None:
        raise ValueError("the checkpoint's vocabulary has no end-of-review marker '\\n'")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    bits = np.zeros(len(texts), dtype=np.float64)
    chars = np.zeros(len(texts), dtype=np.int64)
    unknown = np.zeros(len(texts), dtype=np.int64)
    was_training = model.training
    model.eval()
    start = 0
    with torch.inference_mode():
        while start < len(order):
            # Longest review in the batch is the last one (sorted); grow while the padded size fits.
            end = start + 1
            while (
                end < len(order)
                and end - start < max_batch
                and (end - start + 1) * (len(texts[order[end]]) + 1) <= max_batch_chars
            ):
                end += 1
            rows = order[start:end]
            start = end
            longest = len(texts[rows[-1]]) + 1
            ids = np.full((len(rows), longest + 1), eor_id, dtype=np.int64)  # inputs: "\n" + review + "\n"
            mask = np.zeros((len(rows), longest), dtype=bool)
            for r, i in enumerate(rows):
                t = texts[i]
                enc = vocab.encode(t)
                unknown[i] = int((enc == vocab.unk_id).sum())
                chars[i] = len(t) + 1
                ids[r, 1 : 1 + len(t)] = enc
                ids[r, 1 + len(t)] = eor_id
                mask[r, : len(t) + 1] = True
            x = torch.from_numpy(ids[:, :-1]).to(device)
            y = torch.from_numpy(ids[:, 1:]).to(device)
            m = torch.from_numpy(mask).to(device)
            if conditions is None:
                logits, _ = model(x)
            else:
                cond = torch.as_tensor(np.asarray(conditions)[rows], dtype=torch.long, device=device)
                logits, _ = model(x, None, cond)
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
            ).view(y.shape)
            bits[rows] = ((nll * m).sum(dim=1).double() / math.log(2)).cpu().numpy()
    model.train(was_training)
    return bits, chars, unknown


def score_reviews(model: Any, vocab: Any, texts: Sequence[str], **kwargs: Any) -> tuple[float, int, int]:
    """(total bits, chars scored, unknown chars) of `texts` (see `review_bits`; same keyword arguments)."""
    bits, chars, unknown = review_bits(model, vocab, texts, **kwargs)
    return float(bits.sum()), int(chars.sum()), int(unknown.sum())


def bits_by_source(
    sources: Sequence[str], bits: np.ndarray, chars: np.ndarray, unknown: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per-review scores grouped by source file: {source: {"bits", "chars", "unknown", "reviews"}}."""
    src = np.asarray(sources, dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(sources)):
        sel = src == name
        out[name] = {
            "bits": float(bits[sel].sum()),
            "chars": int(chars[sel].sum()),
            "unknown": int(unknown[sel].sum()),
            "reviews": int(sel.sum()),
        }
    return out


def merge_by_source(parts: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum `bits_by_source` results of disjoint sets of reviews (shards, batches), source by source."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, s in part.items():
            acc = out.setdefault(name, {"bits": 0.0, "chars": 0, "unknown": 0, "reviews": 0})
            for k in acc:
                acc[k] += s[k]
    return dict(sorted(out.items()))


# Above this many held-out chars, `evaluate` scores on Ray Data (parallel tasks) instead of the driver.
RAY_SCORE_MIN_CHARS = 20_000_000


def ray_score_by_source(
    checkpoint_path: str | Path, ds: Any, concurrency: int = 2
) -> dict[str, dict[str, Any]]:
    """Score a Ray Dataset of {"text", "source"?} rows in parallel actors; `bits_by_source` totals.

    Each actor scores its batches review by review and emits one row per (batch, source): the group-by
    over source files is then a sum over those few rows on the driver, with no second read."""

    class _Scorer:
        def __init__(self) -> None:
            from raylstm.checkpoint import load_checkpoint

            self.ckpt = load_checkpoint(checkpoint_path)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            texts = [str(t) for t in batch["text"]]
            srcs = [str(s) for s in batch["source"]] if "source" in batch else [""] * len(texts)
            conds = self.ckpt.conditions
            cond = conds.encode_rows({f: list(batch[f]) for f in conds.fields}) if conds else None
            scores = review_bits(self.ckpt.model, self.ckpt.vocab, texts, conditions=cond)
            by_src = bits_by_source(srcs, *scores)
            return {
                "source": np.array(list(by_src), dtype=object),
                **{
                    k: np.array([v[k] for v in by_src.values()])
                    for k in ("bits", "chars", "unknown", "reviews")
                },
            }

    cols = [c for c in ("text", "source", "rating", "category") if c in ds.schema().names]
    rows = ds.select_columns(cols).map_batches(_Scorer, batch_size=512, concurrency=concurrency).take_all()
    return merge_by_source(
        {
            str(r["source"]): {
                "bits": float(r["bits"]),
                "chars": int(r["chars"]),
                "unknown": int(r["unknown"]),
                "reviews": int(r["reviews"]),
            }
        }
        for r in rows
    )


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation: held-out split, model, baselines
# ---------------------------------------------------------------------------------------------------------


def baselines(test: str, train: str = "") -> dict[str, dict[str, Any]]:
    """Unigram and every compressor on the string `test`, conditional on `train` (timed)."""
    out: dict[str, dict[str, Any]] = {}
    out["unigram"] = {"bpc": unigram_entropy_bpc(test), "setting": "order-0 entropy of the held-out text"}
    if train:
        out["unigram-train"] = {
            "bpc": unigram_cross_entropy_bpc(test, train),
            "setting": "char frequencies of the training split (add-one)",
        }
    for name, comp in COMPRESSORS.items():
        t0 = time.perf_counter()
        bpc = compressed_bits(name, test, train) / len(test)
        out[name] = {"bpc": bpc, "setting": comp.setting, "seconds": time.perf_counter() - t0}
    return out


def split_rows(ds: Any, extra: Sequence[str] = ()) -> list[tuple]:
    """(key, text, source, *extra columns) of every row, sorted by key: one order on every machine and
    block layout.

    source is the file the review came from ("" for splits without a `source` column, such as a dir
    prepared before `prepare` kept it); `extra` columns (e.g. rating, category) come as they are."""
    names = ds.schema().names
    cols = [c for c in ("key", "text", "source", *extra) if c in names]
    rows = ds.select_columns(cols).take_all()
    out = [
        (str(r.get("key") or r["text"]), r["text"], str(r.get("source") or ""), *(r.get(c) for c in extra))
        for r in rows
    ]
    out.sort(key=lambda r: (r[0], r[1]))
    return out


def evaluate(
    checkpoint: str | Path | LoadedCheckpoint,
    data_cfg: DataConfig | None = None,
    split: str = "test",
    *,
    sources: Sequence[str] | None = None,
    compressors: bool = True,
    max_context_chars: int = 64 << 20,
) -> dict[str, Any]:
    """Held-out bpc of `checkpoint` on `split`, with unigram and compressor baselines on the identical
    string, and the model's bpc per source file. Returns a JSON-able dict (`format_table` prints it).

    `checkpoint` is a checkpoint dir, a run dir (its best.json) or an already loaded checkpoint. The
    data is `data_cfg`, by default the data config the checkpoint was trained with; `sources`
    replaces its sources (review files or a `raylstm prepare` dir). The split is recomputed by
    `raylstm.data.load_splits` (stable hash of review keys) or read back from the prepared dir, so with
    the checkpoint's own val/test fractions it is exactly the held-out set of training.

    Per-file figures are one group-by of the per-review scores over the rows' `source` column: every
    review is scored once, and each file's figure is the bits of its own held-out reviews (a review that
    dedupe kept from one file of several is counted for that file).
    """
    from raylstm.checkpoint import LoadedCheckpoint, load_checkpoint
    from raylstm.data import load_splits

    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be one of train, val, test, all; got {split!r}")
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    cfg = data_cfg if data_cfg is not None else ckpt.config.data
    if sources:
        cfg = dataclasses.replace(cfg, sources=list(sources))
    splits = load_splits(cfg)
    ds = splits.train.union(splits.val, splits.test) if split == "all" else getattr(splits, split)
    conds = ckpt.conditions  # a conditioned model reads each review with its own rating/category
    rows = split_rows(ds, conds.fields if conds else ())
    if not rows:
        raise ValueError(f"the {split!r} split of {cfg.sources or 'the demo corpus'} is empty")
    texts = [r[1] for r in rows]
    cond = None
    if conds:
        cond = conds.encode_rows({f: [r[3 + j] for r in rows] for j, f in enumerate(conds.fields)})
    test = join_reviews(texts)

    t0 = time.perf_counter()
    if len(test) >= RAY_SCORE_MIN_CHARS:
        by_source = ray_score_by_source(ckpt.path, ds)
        how = "ray-data"
    else:
        scores = review_bits(ckpt.model, ckpt.vocab, texts, conditions=cond)
        by_source = bits_by_source([r[2] for r in rows], *scores)
        how = "driver"
    bits = sum(s["bits"] for s in by_source.values())
    chars = sum(s["chars"] for s in by_source.values())
    model = {
        "bpc": bits / chars,
        "bits": bits,
        "chars": chars,
        "reviews": len(texts),
        "unknown_chars": sum(s["unknown"] for s in by_source.values()),
        "seconds": time.perf_counter() - t0,
        "scored_on": how,
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
    }
    per_source = {
        src: {"bpc": s["bits"] / s["chars"], **s} for src, s in by_source.items() if src and s["chars"]
    }

    result: dict[str, Any] = {
        "split": split,
        "sources": list(cfg.sources),
        "chars": len(test),
        "reviews": len(texts),
        "model": model,
        "per_source": per_source,
    }
    if compressors:
        train = join_reviews(r[1] for r in split_rows(splits.train)) if split != "train" else ""
        context = train[-max_context_chars:]
        result["train_context_chars"] = len(context)
        result["baselines"] = baselines(test, context)
    return result


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """The evaluation as JSON at `path` (parent dirs created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as an aligned text table, model first, then baselines best-first."""
    m = result["model"]
    lines = [
        f"split {result['split']!r}: {result['chars']:,} chars in {result['reviews']:,} reviews"
        + (
            f"; compressors conditioned on {result['train_context_chars']:,} training chars"
            if result.get("train_context_chars")
            else ""
        ),
        f"{'method':<14} {'bpc':>7}  {'vs model':>8}  setting",
        f"{'model':<14} {m['bpc']:>7.4f}  {'1.00x':>8}  step {m['step']}, {m['checkpoint']}",
    ]
    for name, b in sorted(result.get("baselines", {}).items(), key=lambda kv: kv[1]["bpc"]):
        lines.append(f"{name:<14} {b['bpc']:>7.4f}  {b['bpc'] / m['bpc']:>7.2f}x  {b['setting']}")
    if m["unknown_chars"]:
        lines.append(f"({m['unknown_chars']:,} held-out chars are outside the model's vocabulary)")
    if result.get("per_source"):
        lines.append("per source file (model bpc on that file's own held-out reviews):")
    for src, s in result.get("per_source", {}).items():
        lines.append(f"  {s['bpc']:.4f}  {s['chars']:>10,} chars  {s['reviews']:>7,} reviews  {src}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The published reference figures, reproduced
# ---------------------------------------------------------------------------------------------------------


def reference_figures(csv_gz: str | Path, names: Sequence[str] = ("xz", "ppmd")) -> dict[str, float]:
    """Compressor bpc on the raw `reviewText` of the Kaggle Musical Instruments CSV, file order: the last
    10% of reviews given the first 90%, each review + "\\n". Reproduces the "xz: 2.10 bpc" figure."""
    import csv
    import io

    with gzip.open(csv_gz, "rb") as raw:
        texts = [r["reviewText"] for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))]
    k = int(len(texts) * 0.9)
    return compressor_bpc(join_reviews(texts[k:]), join_reviews(texts[:k]), names)
