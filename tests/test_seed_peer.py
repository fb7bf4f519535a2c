"""The original project's published weights (../shared/seed/model.h5) loaded into raylstm's SeedLSTM
(bench/seed_peer.py): the cuDNN -> Keras -> torch conversion is what makes them a language model."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from tests.conftest import AMAZON, SHARED

SEED_H5 = SHARED / "seed" / "model.h5"
MI_CSV = AMAZON / "Musical_instruments_reviews.csv.gz"

pytestmark = pytest.mark.skipif(
    not (SEED_H5.is_file() and MI_CSV.is_file()), reason=f"needs {SEED_H5} and {MI_CSV} (../shared)"
)


@pytest.fixture(scope="module")
def mi_text(ray_session) -> dict[str, list[str]]:
    """The Musical Instruments reviews through raylstm's pipeline, cleaned as the original's text."""
    from bench.seed_peer import seed_text_splits
    from raylstm.evaluate import split_rows

    splits = seed_text_splits(MI_CSV)
    return {s: [t for _, t, _ in split_rows(getattr(splits, s))] for s in ("train", "test")}


def test_the_ord_vocabulary_is_the_original_character_coding() -> None:
    from bench.seed_peer import ord_vocab

    vocab = ord_vocab()
    text = "i bought this strap, and it's 100% fine!\n"
    assert len(vocab) == 128
    assert list(vocab.encode(text)) == [ord(c) for c in text]
    assert vocab.decode([ord(c) for c in text]) == text


def test_the_cudnn_conversion_is_keras_own_formula() -> None:
    """A gate block k of the input kernel becomes k.T.reshape(k.shape, order="F"), r becomes r.T: checked
    element by element on a labelled array, against the layout cuDNN keeps ((4H, in) row-major)."""
    from bench.seed_peer import cudnn_to_keras_lstm

    n_in, units = 3, 2
    # cuDNN stores each gate's input matrix as W_g (units, n_in) row-major; Keras' h5 file exposes those
    # bytes as a (n_in, units) block. Build such a file layout from known W_g and check the converted
    # Keras kernel is W_g.T, the matrix Keras' LSTM multiplies x by.
    w = [np.arange(units * n_in, dtype=np.float32).reshape(units, n_in) + 10 * g for g in range(4)]
    stored = np.hstack([wg.reshape(n_in, units) for wg in w])  # same bytes, read as (n_in, units)
    u = [np.arange(units * units, dtype=np.float32).reshape(units, units) + 10 * g for g in range(4)]
    stored_r = np.hstack([ug.reshape(units, units) for ug in u])
    kernel, recurrent = cudnn_to_keras_lstm(stored, stored_r)
    for g in range(4):
        assert np.array_equal(kernel[:, g * units : (g + 1) * units], w[g].T)
        assert np.array_equal(recurrent[:, g * units : (g + 1) * units], u[g].T)


def _words(text: str) -> list[str]:
    """Runs of 3+ letters: single letters and pairs ("a", "i", "ar") occur in any letter soup."""
    return [w for w in re.findall(r"[a-z]+", text) if len(w) >= 3]


def _word_fraction(text: str, known: set[str]) -> float:
    words = _words(text)
    return sum(w in known for w in words) / max(1, len(words))


@pytest.mark.slow
def test_converted_weights_are_a_language_model_and_the_stored_layout_is_not(
    mi_text: dict[str, list[str]],
) -> None:
    from bench.seed_peer import PRIME, generate, load_seed_model, seed_bpc

    sample = mi_text["test"][:12]  # ~4k predictions: seconds per layout
    converted = seed_bpc(sample, SEED_H5, layout="cudnn")
    stored = seed_bpc(sample, SEED_H5, layout="stored")
    assert (
        converted["predictions"] == stored["predictions"] == sum(len(t) - 40 for t in sample if len(t) > 40)
    )
    # The README's full-split figure is 2.171; a small sample of the same split scores close to it.
    assert converted["bpc"] < 3.0
    # The stored arrays read as Keras LSTM kernels are worse than knowing nothing (log2(128) = 7 bits).
    assert stored["bpc"] > math.log2(128) > converted["bpc"] + 4

    # Readable: at the original's lowest temperature, almost every word it writes is a word that occurs
    # in the training reviews; the mis-read weights write almost none.
    known = set(Counter(re.findall(r"[a-z]+", " ".join(mi_text["train"]))))
    model, vocab = load_seed_model(SEED_H5, "cudnn")
    text = generate(model, vocab, PRIME, 300, temperature=0.2, seed=0)
    bad_model, _ = load_seed_model(SEED_H5, "stored")
    bad = generate(bad_model, vocab, PRIME, 300, temperature=0.2, seed=0)
    assert len(_words(text)) >= 25  # words, not one long run of letters
    assert _word_fraction(text, known) >= 0.9, text  # 0.975 measured
    assert _word_fraction(bad, known) < 0.3, bad  # 0.0 measured
