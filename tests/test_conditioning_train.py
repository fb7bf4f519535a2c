"""A conditioned model end to end on a real local Ray: prepare's rating/category columns -> the condition
vocabulary of the train split -> windows with condition ids (Ray Data) -> 2 DDP workers with stateful
segments -> a checkpoint with conditions.json -> held-out bpc read with each review's conditions, and
the rating read back by Bayes' rule above the majority class."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raylstm.checkpoint import load_checkpoint
from raylstm.classify import heldout_report
from raylstm.conditions import rating_value
from raylstm.config import Config
from raylstm.data import condition_vocab, load_splits, stream_condition_rows, window_dataset
from raylstm.evaluate import evaluate, review_bits, split_rows
from raylstm.train import train

pytestmark = pytest.mark.slow
GOOD = ["I love this {x}, it works great.", "Excellent {x}, highly recommend it!", "Perfect {x}, very happy."]
BAD = [
    "Terrible {x}, it broke in a day.",
    "Do not buy this {x}, a waste of money.",
    "Horrible {x}, cheap junk.",
]


def write_reviews(path: Path, n: int = 900) -> Path:
    """2023-style JSON lines whose rating is obvious from the words; a few without a rating."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            rating = (5, 1, 5, 4)[i % 4]
            text = rng.choice(GOOD if rating >= 4 else BAD).format(x=rng.choice(["tuner", "strap", "novel"]))
            rec = {"user_id": f"u{i}", "asin": "a", "timestamp": i, "text": f"{text} #{i}", "title": ""}
            rec["main_category"] = "guitars" if i % 3 else "books"
            if i % 50:
                rec["rating"] = rating
            f.write(json.dumps(rec) + "\n")
    return path


def config(source: Path) -> Config:
    cfg = Config()
    d, m, t = cfg.data, cfg.model, cfg.train
    d.sources, d.seq_len, d.segment_windows, d.dedupe, d.min_char_count = [str(source)], 32, 2, False, 1
    d.val_fraction = d.test_fraction = 0.1
    m.hidden_size, m.num_layers, m.embed_dim, m.dropout = 64, 1, 16, 0.0
    m.conditions, m.condition_dim = ["rating", "category"], 4
    t.num_workers, t.cpus_per_worker, t.batch_size, t.lr = 2, 0.5, 16, 5e-3
    t.max_steps, t.eval_every, t.warmup_steps, t.log_every, t.sample_chars = 160, 80, 10, 40, 40
    return cfg


def test_windows_on_ray_carry_each_reviews_conditions(ray_session, tmp_path: Path):
    cfg = config(write_reviews(tmp_path / "r.jsonl", 200))
    splits = load_splits(cfg.data)
    conds = condition_vocab(splits.train, cfg.model.conditions)
    rows = splits.train.take_all()
    # The vocabulary's counts are the train split's own (an independent count over its rows).
    expect = Counter((rating_value(r["rating"]), r["category"]) for r in rows)
    assert conds.joint_counts == dict(expect) and conds.values["category"] == ["books", "guitars"]
    assert expect[(None, "guitars")] + expect[(None, "books")] > 0  # missing ratings are counted as such
    # One block of reviews: the Ray Data windows equal the pure function on the same reviews.
    ds = window_dataset(
        splits.train.repartition(1), splits.vocab, cfg.data, batch_rows=10_000, conditions=conds
    )
    got = ds.take_all()
    cond = conds.encode_rows(
        {"rating": [r["rating"] for r in rows], "category": [r["category"] for r in rows]}
    )
    ids, cond_rows = stream_condition_rows([r["text"] for r in rows], cond, splits.vocab, 65, 64)
    assert len(got) == len(ids)
    np.testing.assert_array_equal(np.stack([g["ids"] for g in got]), ids)
    np.testing.assert_array_equal(np.stack([g["cond"] for g in got]), cond_rows)


def test_a_conditioned_run_learns_to_use_its_conditions(ray_session, tmp_path: Path):
    cfg = config(write_reviews(tmp_path / "r.jsonl"))
    result = train(cfg, storage=str(tmp_path / "runs"), name="cond")
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt.conditions is not None and ckpt.conditions.fields == ("rating", "category")
    assert ckpt.config.model.condition_sizes == [6, 3]

    # Held-out bpc reads every review with its own conditions: recomputed here from the rows themselves.
    ev = evaluate(ckpt, split="test", compressors=False)
    rows = split_rows(load_splits(ckpt.config.data).test, ("rating", "category"))
    texts = [r[1] for r in rows]
    own = ckpt.conditions.encode_rows({"rating": [r[3] for r in rows], "category": [r[4] for r in rows]})
    bits, chars, _ = review_bits(ckpt.model, ckpt.vocab, texts, conditions=own)
    assert ev["model"]["bpc"] == pytest.approx(bits.sum() / chars.sum(), rel=1e-6)
    # The model uses the rating: the opposite star rating costs more bits than the true one.
    flipped = own.copy()
    flipped[:, 0] = np.where(own[:, 0] >= 4, 1, np.where(own[:, 0] > 0, 5, 0))
    worse, _, _ = review_bits(ckpt.model, ckpt.vocab, texts, conditions=flipped)
    assert worse.sum() > bits.sum() * 1.02

    # Bayes' rule reads the rating back (binary: far above the majority class).
    report = heldout_report(ckpt)
    binary = report["rating"]["binary"]
    assert binary["bayes"]["accuracy"] >= 0.9 > binary["majority"]["accuracy"]
    assert (
        report["rating"]["five_way"]["bayes"]["accuracy"]
        > report["rating"]["five_way"]["majority"]["accuracy"]
    )
