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


def candidate_conditions(
    conditions: ConditionVocab, field: str, known: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The condition ids [K, F] a text may have been written under, for reading `field` back: every value
    of `field`, and of each other field whose id in `known` is 0 (unknown: summed over); the known id of
    the others. With their log prior log P(combo) from the training counts, normalised over the K.
    classify.posterior reads whole reviews under each; raylstm.guidance reads a sample as it grows."""
    target = conditions.fields.index(field)
    axes = [
        np.arange(1, size) if (j == target or known[j] == 0) else np.array([known[j]])
        for j, size in enumerate(conditions.sizes)
    ]
    combos = np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T
    return combos, conditions.prior(combos.tolist())


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
    out = np.zeros((n, len(conditions.values[field])))
    # Reviews with the same known ids share one set of candidate combinations.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(known_ids.tolist()):
        groups.setdefault(tuple(row), []).append(i)
    for key, members in groups.items():
        combos, log_prior = candidate_conditions(conditions, field, key)
        sub = [texts[i] for i in members]
        joint = np.stack(
            [log_likelihoods(model, vocab, sub, np.tile(c, (len(sub), 1)), device) for c in combos], axis=1
        )  # [members, K]
        joint = joint + log_prior[None, :]
        for v_idx in range(out.shape[1]):
            sel = combos[:, target] == v_idx + 1
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


# --- the labelled sets, the probe and the held-out rating figures ------------------------------------------
@dataclass
class LabelledSet:
    """Reviews with a binary sentiment label (1 positive, 0 negative), split into train and held-out."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


BLITZER_GLOB = "sorted_data_acl/*/*.review.gz"
CELLS_FILE = "amazon_cells_labelled.txt"
CELLS_TEST_FRACTION = 0.3  # of the 1,000 sentences: 300 held out


def labelled_sets(amazon_dir: str | Path, data: Any) -> list[LabelledSet]:
    """The labelled sentiment sets of ../shared/data/amazon, cleaned as `data` (a DataConfig) cleans:

    blitzer       the 8,000 Blitzer reviews, rating 4-5 positive, 1-2 negative; split by `data`'s stable
                  hash of the review key, so its held-out part is the held-out part of a model trained on
                  them with the same fractions (the probe never sees a review the model trained on);
    amazon_cells  the 1,000 UCI sentences (label 0/1), 30% held out by a stable hash of the sentence.
    Blitzer needs Ray (raylstm.data.load_splits); the caller starts it."""
    import dataclasses

    from raylstm.data import load_splits, split_of
    from raylstm.text import clean_text

    root = Path(amazon_dir)
    out = []
    cfg = dataclasses.replace(data, sources=[str(root / BLITZER_GLOB)], format="auto", categories={})
    splits = load_splits(cfg)

    def rows(ds: Any) -> tuple[list[str], list[int]]:
        got = sorted(ds.select_columns(["key", "text", "rating"]).take_all(), key=lambda r: r["key"])
        got = [r for r in got if r["rating"] is not None and r["rating"] != 3]
        return [r["text"] for r in got], [int(r["rating"] >= 4) for r in got]

    tr, te = rows(splits.train), rows(splits.test)
    out.append(LabelledSet("blitzer", tr[0], tr[1], te[0], te[1]))
    path = root / CELLS_FILE
    sets: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("\t")
        if not sep or label.strip() not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        text = clean_text(sentence, data.lowercase, data.ascii_only)
        part = "test" if split_of(sentence, 0.0, CELLS_TEST_FRACTION) == "test" else "train"
        sets[part][0].append(text)
        sets[part][1].append(int(label))
    out.append(LabelledSet("amazon_cells", *sets["train"], *sets["test"]))
    return out


def _accuracy(pred: Sequence[Any], truth: Sequence[Any]) -> float:
    return float(np.mean([p == t for p, t in zip(pred, truth)])) if truth else float("nan")


def sentiment_report(
    checkpoint: Any, sets: Sequence[LabelledSet], device: str = "cpu"
) -> tuple[dict[str, Any], SentimentUnit]:
    """Per labelled set: the linear probe on the final state, the single sentiment unit (found on the
    first set's training part) and TF-IDF + LR, each fit on the set's training part and scored on its
    held-out part. Returns {"unit": SentimentUnit dict, "sets": {name: figures}} and the unit."""
    model, vocab = checkpoint.model, checkpoint.vocab
    H, L = model.cfg.hidden_size, model.cfg.num_layers
    feats = {
        s.name: (review_states(model, vocab, s.train_texts, device=device),
                 review_states(model, vocab, s.test_texts, device=device))
        for s in sets
    }  # fmt: skip
    first = sets[0]
    unit = best_single_unit(feats[first.name][0], first.train_labels, H, L)
    unit.test_accuracy = _accuracy(unit.predict(feats[first.name][1]).tolist(), first.test_labels)
    report: dict[str, Any] = {"unit_found_on": first.name, "sets": {}}
    for s in sets:
        f_train, f_test = feats[s.name]
        probe = fit_probe(f_train, s.train_labels)
        tfidf = tfidf_classifier(s.train_texts, s.train_labels)
        own = best_single_unit(f_train, s.train_labels, H, L)
        report["sets"][s.name] = {
            "train": len(s.train_labels),
            "test": len(s.test_labels),
            "test_positive_share": float(np.mean(s.test_labels)),
            "probe_accuracy": _accuracy(probe.predict(f_test).tolist(), s.test_labels),
            "unit_accuracy": _accuracy(unit.predict(f_test).tolist(), s.test_labels),
            "own_unit": {
                "index": own.index,
                "accuracy": _accuracy(own.predict(f_test).tolist(), s.test_labels),
            },
            "tfidf_accuracy": _accuracy(tfidf.predict(s.test_texts).tolist(), s.test_labels),
        }
    report["unit"] = unit.to_dict()
    return report, unit


def rating_metrics(pred: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels that occur in `truth`."""
    from sklearn.metrics import f1_score

    labels = sorted(set(truth))
    return {
        "accuracy": _accuracy(pred, truth),
        "macro_f1": float(f1_score(truth, pred, labels=labels, average="macro", zero_division=0)),
        "n": len(truth),
    }


def binary_of(rating: str) -> str | None:
    """Positive (4-5) / negative (1-2); 3 stars are neither."""
    return {"1": "negative", "2": "negative", "4": "positive", "5": "positive"}.get(rating)


def heldout_rating_report(
    checkpoint: Any,
    train: Sequence[tuple[str, str, str | None]],
    test: Sequence[tuple[str, str, str | None]],
    device: str = "cpu",
) -> dict[str, Any]:
    """Rating by Bayes' rule (the review's category known) beside the majority class and TF-IDF + LR fit
    on `train`, on `test`: (text, rating "1".."5", category) rows. 5-way, and positive (4-5) vs negative
    (1-2) over the rows that are either (Bayes: P(4)+P(5) vs P(1)+P(2); TF-IDF + LR: a binary model)."""
    texts = [t for t, _, _ in test]
    truth = [r for _, r, _ in test]
    post = posterior(
        checkpoint.model, checkpoint.vocab, checkpoint.conditions, texts, "rating",
        {"category": [c for _, _, c in test]}, device,
    )  # fmt: skip
    bayes = post.predicted()
    train_ratings = [r for _, r, _ in train]
    majority = max(sorted(set(train_ratings)), key=train_ratings.count)
    tfidf = tfidf_classifier([t for t, _, _ in train], train_ratings).predict(texts).tolist()
    out: dict[str, Any] = {
        "five_way": {
            "bayes": rating_metrics(bayes, truth),
            "majority": {**rating_metrics([majority] * len(truth), truth), "class": majority},
            "tfidf_lr": rating_metrics(tfidf, truth),
        }
    }
    idx = [i for i, r in enumerate(truth) if binary_of(r)]
    btruth = [binary_of(truth[i]) for i in idx]
    values = post.values
    pos = post.probs[:, [values.index("4"), values.index("5")]].sum(axis=1)
    neg = post.probs[:, [values.index("1"), values.index("2")]].sum(axis=1)
    bbayes = ["positive" if pos[i] >= neg[i] else "negative" for i in idx]
    btrain = [(t, binary_of(r)) for t, r, _ in train if binary_of(r)]
    bmajority = max(("negative", "positive"), key=[b for _, b in btrain].count)
    btfidf = tfidf_classifier([t for t, _ in btrain], [b for _, b in btrain]).predict([texts[i] for i in idx])
    out["binary"] = {
        "bayes": rating_metrics(bbayes, btruth),
        "majority": {**rating_metrics([bmajority] * len(btruth), btruth), "class": bmajority},
        "tfidf_lr": rating_metrics(btfidf.tolist(), btruth),
    }
    out["test_ratings"] = {v: truth.count(v) for v in values}
    return out


def heldout_category_report(
    checkpoint: Any, train: Sequence[tuple[str, str | None, str]], test: Sequence[tuple[str, str | None, str]]
) -> dict[str, Any]:
    """Category by Bayes' rule (summed over ratings) beside the majority category, on (text, rating,
    category) rows."""
    texts = [t for t, _, _ in test]
    truth = [c for _, _, c in test]
    post = posterior(checkpoint.model, checkpoint.vocab, checkpoint.conditions, texts, "category")
    cats = [c for _, _, c in train]
    majority = max(sorted(set(cats)), key=cats.count)
    return {
        "bayes": rating_metrics(post.predicted(), truth),
        "majority": {**rating_metrics([majority] * len(truth), truth), "class": majority},
        "test_categories": {c: truth.count(c) for c in sorted(set(truth))},
    }


def heldout_report(
    checkpoint: Any, sources: Sequence[str] | None = None, split: str = "test"
) -> dict[str, Any]:
    """`heldout_rating_report` and `heldout_category_report` of a conditioned checkpoint on `split` of its
    training data (or `sources`), the baselines fit on the training split. Starts no Ray itself: the
    caller does (raylstm.ray_env.ensure_ray), as for raylstm.evaluate."""
    import dataclasses

    from raylstm.conditions import rating_value
    from raylstm.data import load_splits
    from raylstm.evaluate import split_rows

    if checkpoint.conditions is None:
        raise ValueError(f"{checkpoint.path}: this model is not conditioned: there is no rating to read back")
    cfg = checkpoint.config.data
    if sources:
        cfg = dataclasses.replace(cfg, sources=list(sources))
    splits = load_splits(cfg)

    def rows(ds: Any) -> list[tuple[str, str | None, str | None]]:
        return [(r[1], rating_value(r[3]), r[4]) for r in split_rows(ds, ("rating", "category"))]

    train, test = rows(splits.train), rows(getattr(splits, split))
    out: dict[str, Any] = {"split": split, "sources": list(cfg.sources)}
    if "rating" in checkpoint.conditions.fields:
        out["rating"] = heldout_rating_report(
            checkpoint, [r for r in train if r[1]], [r for r in test if r[1]]
        )
    if "category" in checkpoint.conditions.fields:
        known = [r for r in test if r[2] in checkpoint.conditions.ids["category"]]
        out["category"] = heldout_category_report(checkpoint, train, known)
    return out


def steered_forward(
    model: torch.nn.Module,
    ids: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    unit: SentimentUnit,
    values: torch.Tensor,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The model's forward with the sentiment unit fixed: ids [B, T] (+ state, cond) -> logits [B, T, V],
    state, where after every step the unit's value in the top layer's h or c is overwritten by values[b]
    (NaN: row b is not steered). One step at a time, since each step must read the fixed value."""
    B, T = ids.shape
    x = model.inputs(ids, cond) if cond is not None else model.inputs(ids)
    steer = ~torch.isnan(values)
    v = torch.nan_to_num(values).to(x.dtype)
    outs = []
    for t in range(T):
        out, state = model.lstm(x[:, t : t + 1], state)
        h, c = state
        if unit.state == "h":
            h = h.clone()
            h[unit.layer, :, unit.unit] = torch.where(steer, v, h[unit.layer, :, unit.unit])
            out = out.clone()
            out[:, 0, unit.unit] = h[unit.layer, :, unit.unit]
        else:
            c = c.clone()
            c[unit.layer, :, unit.unit] = torch.where(steer, v, c[unit.layer, :, unit.unit])
        state = (h, c)
        outs.append(out)
    out = torch.cat(outs, dim=1)
    # As CharLSTM.forward (SeedLSTM applies no dropout before its head).
    return model.head(out if model.cfg.kind == "seed" else model.drop(out)), state
