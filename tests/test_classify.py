"""Reading a rating back: a small conditioned model trained here (the training loop's own pieces, no Ray)
on reviews whose rating is obvious from their words classifies new reviews by Bayes' rule far above
chance; the linear probe and the single sentiment unit separate them too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conditioned_support import corpus, trained_conditioned

from raylstm.classify import (
    Posterior,
    SentimentUnit,
    best_single_unit,
    fit_probe,
    posterior,
    review_states,
    tfidf_classifier,
)


@pytest.fixture(scope="module")
def trained():
    model, vocab, conds, _ = trained_conditioned()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits (and on a loaded machine, spins)
    try:
        yield model, vocab, conds
    finally:
        torch.set_num_threads(threads)


def test_bayes_rule_reads_the_obvious_rating_of_new_reviews_far_above_chance(trained):
    model, vocab, conds = trained
    new = corpus(40, seed=99)  # the test's own reviews, not the training ones
    texts = [t for t, _, _ in new]
    truth = [str(r) for _, r, _ in new]
    # Category known (as in the data), and unknown (summed over).
    for known in ({"category": [c for _, _, c in new]}, None):
        post = posterior(model, vocab, conds, texts, "rating", known)
        assert isinstance(post, Posterior) and post.values == ["1", "2", "3", "4", "5"]
        np.testing.assert_allclose(post.probs.sum(axis=1), 1.0)
        accuracy = np.mean([p == t for p, t in zip(post.predicted(), truth)])
        print(f"rating accuracy {accuracy:.2f} (known={known is not None}); chance 0.5 (two ratings)")
        assert accuracy >= 0.9
    # The category is read back too (its words are obvious), summed over ratings.
    post = posterior(model, vocab, conds, texts, "category")
    accuracy = np.mean([p == c for p, (_, _, c) in zip(post.predicted(), new)])
    assert accuracy >= 0.9


def test_posterior_is_bayes_rule_over_the_models_likelihoods(trained):
    """Against an independent computation: the likelihood of each review summed char by char from the
    model's softmax, times the training prior, normalised."""
    model, vocab, conds = trained
    texts = [t for t, _, _ in corpus(3, seed=5)]
    post = posterior(model, vocab, conds, texts, "rating", {"category": ["books"] * 3})
    cat = conds.ids["category"]["books"]
    prior = np.exp(conds.prior([[r, cat] for r in range(1, 6)]))
    for i, text in enumerate(texts):
        ids = torch.as_tensor(vocab.encode("\n" + text + "\n"), dtype=torch.long)[None]
        lik = []
        for r in range(1, 6):
            with torch.no_grad():
                logits, _ = model(ids[:, :-1], None, torch.tensor([[r, cat]]))
            lp = torch.log_softmax(logits[0].double(), -1).gather(1, ids[0, 1:, None]).sum().item()
            lik.append(lp)
        joint = np.exp(np.array(lik) - max(lik)) * prior
        np.testing.assert_allclose(post.probs[i], joint / joint.sum(), rtol=1e-4, atol=1e-9)


def test_probe_and_single_unit_separate_sentiment_on_held_out_reviews(trained, tmp_path):
    model, vocab, _ = trained
    train, test = corpus(200, seed=11), corpus(60, seed=12)
    f_train = review_states(model, vocab, [t for t, _, _ in train])
    f_test = review_states(model, vocab, [t for t, _, _ in test])
    assert f_train.shape == (200, 2 * 64)
    y_train = [int(r == 5) for _, r, _ in train]
    y_test = np.array([int(r == 5) for _, r, _ in test])
    probe = fit_probe(f_train, y_train)
    assert np.mean(probe.predict(f_test) == y_test) >= 0.9
    unit = best_single_unit(f_train, y_train, hidden_size=64, layers=1)
    assert unit.train_accuracy >= 0.9 and unit.state in ("h", "c") and 0 <= unit.unit < 64
    assert np.mean(unit.predict(f_test) == y_test) >= 0.75  # one unit of 128, chance 0.5
    # Steering values sit on the positive / negative side of the threshold; the file round-trips.
    assert unit.sign * (unit.value(+1) - unit.threshold) > 0 > unit.sign * (unit.value(-1) - unit.threshold)
    assert SentimentUnit.load(unit.save(tmp_path / "unit.json")) == unit
    # The padded batches never leak into a state: one review alone gives the same features.
    alone = review_states(model, vocab, [train[7][0]])
    np.testing.assert_allclose(alone[0], f_train[7], rtol=1e-5, atol=1e-6)
    # The TF-IDF baseline learns the same words.
    clf = tfidf_classifier([t for t, _, _ in train], y_train)
    assert np.mean(clf.predict([t for t, _, _ in test]) == y_test) >= 0.9


def test_single_unit_search_against_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    feats = rng.normal(size=(80, 6))
    feats[:, 4] -= 1.5 * y  # unit 4: lower means positive
    unit = best_single_unit(feats, y, hidden_size=3, layers=2)
    best = (0.0, None)
    for j in range(6):
        for t in np.unique(feats[:, j]):
            for sign in (1, -1):
                acc = np.mean((sign * (feats[:, j] - t) > 0).astype(int) == y)
                best = max(best, (acc, j), key=lambda b: b[0])
    assert (unit.index, unit.state, unit.unit, unit.layer, unit.sign) == (4, "c", 1, 1, -1)
    assert unit.train_accuracy == pytest.approx(best[0])
    assert np.mean(unit.predict(feats) == y) == pytest.approx(unit.train_accuracy)


def test_cli_classify_prints_the_posterior_of_each_review(trained, tmp_path, capsys):
    """`raylstm classify` is a thin layer: its JSON is the library's posterior for the same reviews."""
    import json

    from raylstm.checkpoint import save_checkpoint
    from raylstm.cli import main
    from raylstm.config import Config
    from raylstm.model import build_model

    model, vocab, conds = trained
    cfg = Config()
    cfg.model = model.cfg
    path = save_checkpoint(tmp_path / "c", model, vocab, cfg, step=1, conditions=conds)
    texts = ["The tuner is awful, junk.", "The novel is perfect, great."]
    assert main(["classify", "--checkpoint", str(path), *texts, "--category", "books"]) == 0
    out = json.loads(capsys.readouterr().out)
    post = posterior(model, vocab, conds, texts, "rating", {"category": ["books", "books"]})
    assert [o["text"] for o in out] == texts
    for o, p in zip(out, post.as_dicts()):
        assert o["rating"] == pytest.approx(p)
    assert max(out[0]["rating"], key=out[0]["rating"].get) == "1"
    assert max(out[1]["rating"], key=out[1]["rating"].get) == "5"
    # An unconditioned checkpoint has no rating to read back: a clear error, exit status 2.
    plain = Config()
    plain.model.vocab_size, plain.model.hidden_size, plain.model.num_layers = len(vocab), 8, 1
    torch.manual_seed(0)
    p2 = save_checkpoint(tmp_path / "u", build_model(plain.model), vocab, plain, step=1)
    assert main(["classify", "--checkpoint", str(p2), "fine"]) == 2
    assert "not conditioned" in capsys.readouterr().err


def test_heldout_rating_report_beside_majority_and_tfidf(trained):
    """The held-out figures on the test's own rows: Bayes' rule beats the majority class 5-way and
    binary, and every figure is sklearn's metric of the predictions it names."""
    from sklearn.metrics import f1_score

    from raylstm.classify import heldout_category_report, heldout_rating_report

    model, vocab, conds = trained

    class Ckpt:  # what the report reads of a LoadedCheckpoint
        pass

    ck = Ckpt()
    ck.model, ck.vocab, ck.conditions = model, vocab, conds
    rows = [(t, str(r), c) for t, r, c in corpus(300, seed=21)]
    train = rows[:200] + [(t, "5", c) for t, _, c in rows[:100]]  # 100 more rated 5: 5 is the majority
    test = [(t, str(r), c) for t, r, c in corpus(40, seed=22)]
    rep = heldout_rating_report(ck, train, test)
    five, binary = rep["five_way"], rep["binary"]
    assert five["majority"]["class"] == "5" and five["majority"]["accuracy"] == pytest.approx(0.5)
    assert five["bayes"]["accuracy"] >= 0.9 > five["majority"]["accuracy"]
    assert binary["bayes"]["accuracy"] >= 0.9 and binary["majority"]["class"] == "positive"
    truth = [r for _, r, _ in test]
    maj_f1 = f1_score(truth, ["5"] * len(truth), labels=["1", "5"], average="macro", zero_division=0)
    assert five["majority"]["macro_f1"] == pytest.approx(maj_f1)
    assert rep["test_ratings"] == {"1": 20, "2": 0, "3": 0, "4": 0, "5": 20}
    cat = heldout_category_report(ck, train, test)
    assert cat["bayes"]["accuracy"] >= 0.9 and cat["test_categories"] == {"books": 20, "guitars": 20}


def test_steered_forward_fixes_the_unit_and_is_the_plain_forward_for_unsteered_rows(trained):
    from raylstm.classify import steered_forward

    model, vocab, _ = trained
    ids = torch.as_tensor(vocab.encode("\nThe capo is great, perfect."), dtype=torch.long)[None].repeat(2, 1)
    cond = torch.tensor([[5, 1], [5, 1]])
    with torch.no_grad():
        plain, (h0, c0) = model(ids, None, cond)
        for state_kind in ("h", "c"):
            unit = SentimentUnit(3 if state_kind == "h" else 67, state_kind, 3, 0, 1, 0.0, 1.0, -1.0, 1.0)
            values = torch.tensor([float("nan"), 2.5])
            logits, (h, c) = steered_forward(model, ids, None, unit, values, cond)
            torch.testing.assert_close(logits[0], plain[0], rtol=1e-5, atol=1e-5)  # row 0 not steered
            torch.testing.assert_close(h[:, 0], h0[:, 0], rtol=1e-5, atol=1e-5)
            fixed = (h if state_kind == "h" else c)[0, 1, 3]
            assert fixed.item() == pytest.approx(2.5)
            assert not torch.allclose(logits[1], plain[1], atol=1e-3)  # the fixed unit changes the text
