"""Vocabulary built from aggregated counts: deterministic, rare chars -> unknown, "\\n" always in."""

from collections import Counter

from raylstm.data import EOR, build_vocab
from raylstm.vocab import CharVocab


def test_build_vocab_order_min_count_and_eor():
    counts = Counter("aaaabbbcc\u00e9")
    v = build_vocab(counts, n_train_reviews=0, min_count=2)
    assert v.chars[:3] == ["a", "b", "c"]  # count descending
    assert "\u00e9" not in v  # below min_count -> unknown
    assert EOR in v  # forced in although it was never counted
    assert v.encode("\u00e9")[0] == v.unk_id


def test_eor_counted_once_per_review():
    v = build_vocab(Counter("xyz" * 10), n_train_reviews=7, min_count=1)
    assert v.counts[EOR] == 7


def test_same_counts_same_ids_regardless_of_insertion_order():
    a = build_vocab({"q": 3, "p": 3, "z": 9}, 5, 1)
    b = build_vocab({"z": 9, "p": 3, "q": 3}, 5, 1)
    assert a.itos == b.itos and a.fingerprint() == b.fingerprint()
    assert a.chars[:3] == ["z", "\n", "p"]  # ties broken by code point


def test_json_round_trip(tmp_path):
    v = build_vocab(Counter("Hello, world! \u00fcber"), 3, 1)
    p = tmp_path / "vocab.json"
    v.save(p)
    w = CharVocab.load(p)
    assert w == v and w.counts == v.counts
    text = "Hello\nworld"
    assert w.decode(w.encode(text)) == text
