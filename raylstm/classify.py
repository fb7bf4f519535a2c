"""Reading a review's rating and sentiment back out of a char-LSTM: no Ray, no HTTP.

Bayes' rule on a conditioned model (Lipton, Vikram & McAuley 2015, the model run "in reverse"):

    log P(rating = r | text) = log P(text | r, c) + log P(r, c) - log Z     (c: the known category, or
                                                                             summed over: log-sum-exp)
    P(text | r, c)  the model's likelihood of every character of "\\n" + text + "\\n" read with condition
                    ids (r, c) at every step (raylstm.evaluate.review_bits)
    P(r, c)         the training split's frequency of (r, c) (ConditionVocab.prior, add-one smoothed)

One forward pass over the reviews per candidate (rating, category): 5 for a rating given the category,
5 x categories for a category. "Missing" is never a candidate: it is what a review without a rating was
trained with, not an answer.

A linear probe (Radford, Jozefowicz & Sutskever 2017) on any model, conditioned or not: the final state
of the top LSTM layer after reading a review, [h ; c] (2H features), into scikit-learn's
LogisticRegression; and the single feature (unit) that best separates positive from negative reviews on
its own, with the threshold that does it, which `SentimentUnit.value(s)` turns into a value to fix while
sampling (`raylstm sample --steer-sentiment +1`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylstm.conditions import ConditionVocab
from raylstm.evaluate import review_bits
from raylstm.text import EOR
from raylstm.vocab import CharVocab

LN2 = math.log(2.0)


# --- Bayes' rule on a conditioned model -------------------------------------------------------------------
@dataclass
class Posterior:
    """P(field = value | review) for each review (rows) and candidate value (columns)."""

    field: str
    values: list[str]
    probs: np.ndarray  # [N, len(values)], rows sum to 1

    def predicted(self) -> list[str]:
        return [self.values[i] for i in self.probs.argmax(axis=1)]

    def as_dicts(self) -> list[dict[str, float]]:
        return [{v: float(p) for v, p in zip(self.values, row)} for row in self.probs]


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def log_likelihoods(
    model: torch.nn.Module,
    vocab: CharVocab,
    texts: Sequence[str],
    cond_ids: np.ndarray,
    device: str = "cpu",
) -> np.ndarray:
    """log P(text | conditions) in nats for every review, read with its row of `cond_ids` [N, F]."""
    bits, _, _ = review_bits(model, vocab, texts, conditions=cond_ids, device=device)
    return -bits * LN2


def posterior(
    model: torch.nn.Module,
    vocab: CharVocab,
    conditions: ConditionVocab,
    texts: Sequence[str],
    field: str,
    known: Mapping[str, Sequence[Any]] | None = None,
    device: str = "cpu",
) -> Posterior:
    """P(field | text) by Bayes' rule with the training prior (module doc). `known` gives, per review, the
    value of other fields where it is known (e.g. the category a review was filed under); a field
    neither asked for nor known, or known as missing / a value the model never saw, is summed over."""
    if field not in conditions.fields:
        raise ValueError(f"this model is conditioned on {list(conditions.fields)}, not {field!r}")
    known = known or {}
    n = len(texts)
    F = len(conditions.fields)
    # Per review and field, the candidate ids: all values of the asked field and of unknown ones, or the
    # single known id.
    known_ids = np.zeros((n, F), dtype=np.int64)
    for j, f in enumerate(conditions.fields):
        if f != field and f in known:
            enc = conditions.encode_rows({g: known[f] if g == f else [None] * n for g in conditions.fields})
            known_ids[:, j] = enc[:, j]
    target = conditions.fields.index(field)
    choices = [np.arange(1, s) for s in conditions.sizes]
    out = np.zeros((n, len(conditions.values[field])))
    # Reviews with the same known ids share one set of candidate combinations.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(known_ids.tolist()):
        groups.setdefault(tuple(row), []).append(i)
    for key, members in groups.items():
        axes = [choices[j] if (j == target or key[j] == 0) else np.array([key[j]]) for j in range(F)]
        combos = np.array(np.meshgrid(*axes, indexing="ij")).reshape(F, -1).T  # [K, F]
        sub = [texts[i] for i in members]
        joint = np.stack(
            [log_likelihoods(model, vocab, sub, np.tile(c, (len(sub), 1)), device) for c in combos], axis=1
        )  # [members, K]
        joint = joint + conditions.prior(combos.tolist())[None, :]
        for v_idx, v in enumerate(choices[target]):
            sel = combos[:, target] == v
            out[members, v_idx] = _logsumexp(joint[:, sel], axis=1)
    out = np.exp(out - _logsumexp(out, axis=1)[:, None])
    return Posterior(field, list(conditions.values[field]), out)


def classify_reviews(
    checkpoint: Any,
    texts: Sequence[str],
    known: Mapping[str, Sequence[Any]] | None = None,
    fields: Sequence[str] | None = None,
    device: str = "cpu",
) -> list[dict[str, dict[str, float]]]:
    """For each review, {field: {value: probability}} for every condition field of a conditioned
    checkpoint (a LoadedCheckpoint), each by `posterior` (given the `known` values of the others)."""
    conds = checkpoint.conditions
    if conds is None:
        raise ValueError(
            f"{checkpoint.path}: this model is not conditioned (model.conditions = []): there is no "
            'rating to read back; train with model.conditions = ["rating", "category"]'
        )
    texts = [clean_review(t, checkpoint) for t in texts]
    out: list[dict[str, dict[str, float]]] = [{} for _ in texts]
    for f in fields or conds.fields:
        given = {k: v for k, v in (known or {}).items() if k != f}
        post = posterior(checkpoint.model, checkpoint.vocab, conds, texts, f, given, device)
        for row, d in zip(out, post.as_dicts()):
            row[f] = d
    return out


def clean_review(text: str, checkpoint: Any) -> str:
    """A review as the training text was cleaned (the checkpoint's data config); the end-of-review
    marker inside a review would end it early, so line breaks become spaces."""
    from raylstm.text import clean_text

    data = checkpoint.config.data
    return clean_text(text.replace(EOR, " "), data.lowercase, data.ascii_only)


# --- the final state of a review, and a linear probe on it -----------------------------------------------
@torch.inference_mode()
def review_states(
    model: torch.nn.Module,
    vocab: CharVocab,
    texts: Sequence[str],
    cond_ids: np.ndarray | None = None,
    max_batch: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """[N, 2H]: the top LSTM layer's (h, c) after reading "\\n" + review (its last character), from a zero
    state, as float32. Length-sorted batches, packed so that padding never enters a state."""
    from torch.nn.utils.rnn import pack_padded_sequence

    eor = vocab.stoi[EOR]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    H = model.cfg.hidden_size
    out = np.zeros((len(texts), 2 * H), dtype=np.float32)
    was = model.training
    model.eval()
    for start in range(0, len(order), max_batch):
        rows = order[start : start + max_batch]
        lengths = [len(texts[i]) + 1 for i in rows]
        ids = np.full((len(rows), max(lengths)), eor, dtype=np.int64)
        for r, i in enumerate(rows):
            ids[r, 1 : lengths[r]] = vocab.encode(texts[i])
        x = torch.from_numpy(ids).to(device)
        cond = None if cond_ids is None else torch.as_tensor(cond_ids[rows], dtype=torch.long, device=device)
        inputs = model.inputs(x, cond) if model.cfg.conditions else model.inputs(x)
        packed = pack_padded_sequence(inputs, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        _, (h, c) = model.lstm(packed)
        out[rows] = torch.cat([h[-1], c[-1]], dim=-1).float().cpu().numpy()
    model.train(was)
    return out


def fit_probe(features: np.ndarray, labels: Sequence[int], seed: int = 0) -> Any:
    """Standardised features -> L2 logistic regression (scikit-learn), its C chosen by 3-fold
    cross-validation on the training set only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
    search = GridSearchCV(probe, {"logisticregression__C": [0.001, 0.01, 0.1, 1.0]}, cv=3)
    return search.fit(features, np.asarray(labels)).best_estimator_


def tfidf_classifier(texts: Sequence[str], labels: Sequence[Any], balanced: bool = False) -> Any:
    """The baseline (and the independent judge of generated reviews): word 1-2-gram TF-IDF (sublinear tf)
    into logistic regression, fit on real reviews only."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=10.0, class_weight="balanced" if balanced else None),
    )
    return clf.fit(list(texts), np.asarray(labels))


@dataclass
class SentimentUnit:
    """The one feature of `review_states` that best separates positive (1) from negative (0) reviews on
    the training set, by a threshold; what `raylstm sample --steer-sentiment` fixes."""

    index: int  # into [h ; c] of the top layer
    state: str  # "h" or "c"
    unit: int  # the unit within that state (index mod H)
    layer: int  # the top layer's index
    sign: int  # +1: larger values mean positive
    threshold: float
    positive_mean: float
    negative_mean: float
    train_accuracy: float
    test_accuracy: float | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (self.sign * (features[:, self.index] - self.threshold) > 0).astype(int)

    def value(self, s: float) -> float:
        """The value to fix the unit at for steering strength s: s = +1 and -1 sit one class-mean gap
        beyond the positive and the negative mean (Radford et al. fixed theirs past its usual range)."""
        mid = (self.positive_mean + self.negative_mean) / 2
        return mid + s * 1.5 * (self.positive_mean - self.negative_mean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": 1, "sentiment_unit": self.to_dict()}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SentimentUnit:
        try:
            d = json.loads(Path(path).read_text())
            if d.get("version") != 1:
                raise ValueError("expected version 1")
            return cls(**d["sentiment_unit"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a sentiment unit file written by `raylstm classify --probe` ({e})"
            ) from e


def best_single_unit(
    features: np.ndarray, labels: Sequence[int], hidden_size: int, layers: int
) -> SentimentUnit:
    """The feature whose best threshold classifies the training labels best (ties: the larger gap between
    the class means in standard deviations). Vectorised over features: sort each column once."""
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    order = np.argsort(features, axis=0, kind="stable")
    ys = y[order]  # [n, D]: labels in each feature's ascending order
    pos_above = ys.sum(axis=0)[None, :] - np.cumsum(ys, axis=0)  # positives above cut after row i
    neg_below = np.cumsum(1 - ys, axis=0)
    acc_up = (pos_above + neg_below) / n  # predict positive above the cut
    acc_down = 1 - acc_up  # predict positive below it
    best_up, best_down = acc_up.max(axis=0), acc_down.max(axis=0)
    acc = np.maximum(best_up, best_down)
    pos, neg = features[y == 1], features[y == 0]
    gap = np.abs(pos.mean(0) - neg.mean(0)) / (features.std(0) + 1e-9)
    j = int(np.lexsort((-gap, -acc))[0])
    up = best_up[j] >= best_down[j]
    cut_row = int((acc_up if up else acc_down)[:, j].argmax())
    sorted_col = features[order[:, j], j]
    nxt = sorted_col[min(cut_row + 1, n - 1)]
    return SentimentUnit(
        index=j,
        state="h" if j < hidden_size else "c",
        unit=j % hidden_size,
        layer=layers - 1,
        sign=1 if up else -1,
        threshold=float((sorted_col[cut_row] + nxt) / 2),
        positive_mean=float(pos[:, j].mean()),
        negative_mean=float(neg[:, j].mean()),
        train_accuracy=float(acc[j]),
    )
