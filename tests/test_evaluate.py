"""Evaluation: compressor and unigram baselines checked against independent computations, model bpc
checked against a direct per-character computation, and the `raylstm evaluate` path end to end."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from raylstm import evaluate as ev

_WORDS = (
    "this guitar strap is great and the pick guard fits my old bass well but the tuner broke after "
    "two weeks so I returned it . sound quality is clear , cables feel solid , price was fair !"
).split()


def _review_text(n_reviews: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 60))) for _ in range(n_reviews)]


@pytest.fixture(scope="module")
def small() -> tuple[str, str]:
    """(train, test) strings: ~20 kB and ~2 kB of review-like text, each review + "\\n"."""
    reviews = _review_text(300)
    return ev.join_reviews(reviews[:270]), ev.join_reviews(reviews[270:])


def _cli_bits(cmd: list[str], data: bytes) -> int:
    return 8 * len(subprocess.run(cmd, input=data, capture_output=True, check=True).stdout)


# The command-line tools are separate programs (GNU gzip has its own deflate; bzip2/xz are the reference
# CLIs): they agree with the in-process figures to within container-header noise, not bit for bit.
CLI = {"gzip": ["gzip", "-9", "-n", "-c"], "bz2": ["bzip2", "-9", "-c"], "xz": ["xz", "-9e", "-c"]}


@pytest.mark.parametrize("name", sorted(CLI))
def test_compressor_bpc_matches_command_line_tools(name: str, small: tuple[str, str]) -> None:
    train, test = small
    if shutil.which(CLI[name][0]) is None:
        pytest.skip(f"{CLI[name][0]} not installed")
    ours = ev.compressor_bpc(test, names=[name])[name]
    theirs = _cli_bits(CLI[name], test.encode()) / len(test)
    assert ours == pytest.approx(theirs, abs=0.05)
    # Conditional: the same definition (size(train+test) - size(train)) computed by the CLI.
    ours_c = ev.compressor_bpc(test, train, names=[name])[name]
    theirs_c = (_cli_bits(CLI[name], (train + test).encode()) - _cli_bits(CLI[name], train.encode())) / len(
        test
    )
    assert ours_c == pytest.approx(theirs_c, abs=0.05)


def test_conditional_bpc_uses_the_context(small: tuple[str, str]) -> None:
    train, test = small
    plain = ev.compressor_bpc(test)
    given_train = ev.compressor_bpc(test, train)
    given_itself = ev.compressor_bpc(test, test)
    for name in ("gzip", "bz2", "xz", "ppmd"):
        # Having read similar text helps; having read the identical text helps more.
        assert given_train[name] < plain[name]
        assert given_itself[name] < given_train[name]
    # xz finds the whole repeat in its window: the second copy is almost free.
    assert given_itself["xz"] < 0.25 * plain["xz"]


def test_ppmd_is_a_real_code_and_matches_7zip(small: tuple[str, str]) -> None:
    pyppmd = pytest.importorskip("pyppmd")
    train, test = small
    data = (train + test).encode()
    packed = pyppmd.compress(data, max_order=6, mem_size=16 << 20, variant="H")
    # A size only means something if the bytes decode back to the text.
    assert pyppmd.Ppmd7Decoder(6, 16 << 20).decode(packed, len(data)) == data
    assert ev.compressed_bits("ppmd", train + test) == 8 * len(packed)
    seven = shutil.which("7zz") or shutil.which("7z")
    if seven is None:
        pytest.skip("7-Zip not installed (apt-get install 7zip) for the independent PPMd check")

    def size_7z(text: str) -> int:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "t.txt").write_text(text)
            subprocess.run(
                [seven, "a", "-bd", "-m0=PPMd:o=6:mem=16m", "t.7z", "t.txt"],
                cwd=d,
                check=True,
                capture_output=True,
            )
            return 8 * (Path(d) / "t.7z").stat().st_size

    theirs = (size_7z(train + test) - size_7z(train)) / len(test)
    ours = ev.compressor_bpc(test, train, names=["ppmd"])["ppmd"]
    assert ours == pytest.approx(theirs, abs=0.05)


def test_unigram_entropy_matches_direct_formula() -> None:
    text = "".join(_review_text(40, seed=3))
    counts = Counter(text)
    direct = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    assert ev.unigram_entropy_bpc(text) == pytest.approx(direct, rel=1e-12)
    assert ev.unigram_entropy_bpc("abab") == pytest.approx(1.0)
    assert ev.unigram_entropy_bpc("aaaa") == pytest.approx(0.0)
    # Under frequencies of other text the cost can only be higher than the text's own entropy.
    assert ev.unigram_cross_entropy_bpc(text, "".join(_review_text(40, seed=4))) > ev.unigram_entropy_bpc(
        text
    )


def test_empty_text_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        ev.compressor_bpc("")
    with pytest.raises(ValueError, match="empty"):
        ev.unigram_entropy_bpc("")


@pytest.mark.slow
def test_reference_xz_figure_reproduced(amazon_dir: Path) -> None:
    """The published "xz: 2.10 bpc, last 10% of the Musical Instruments reviews given the first 90%"."""
    got = ev.reference_figures(amazon_dir / "Musical_instruments_reviews.csv.gz", names=["xz"])
    assert got["xz"] == pytest.approx(2.10, abs=0.01)


# --- model bpc ----------------------------------------------------------------------------------------


def _tiny_vocab_and_model(texts: list[str], hidden: int = 32):
    import torch

    from raylstm.config import ModelConfig
    from raylstm.model import CharLSTM
    from raylstm.vocab import CharVocab

    vocab = CharVocab.from_counts(Counter(ev.join_reviews(texts)), min_count=1)
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), embed_dim=8, hidden_size=hidden, num_layers=2))
    return vocab, model.eval()


def test_batched_review_scoring_equals_char_by_char_loop() -> None:
    """Length-sorted padded batches must give exactly the bits of feeding each review one char at a time."""
    import torch

    texts = [t[:60] for t in _review_text(7, seed=5)] + ["ok"]
    vocab, model = _tiny_vocab_and_model(texts)
    # A small batch budget forces several batches with padding of different lengths.
    bits, chars, unknown = ev.score_reviews(model, vocab, texts, max_batch_chars=150, max_batch=3)
    each, each_chars, _ = ev.review_bits(model, vocab, texts, max_batch_chars=150, max_batch=3)
    direct = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of 1-char steps: thread hand-offs would dominate on a busy machine
    with torch.inference_mode():
        for t in texts:
            ids = torch.from_numpy(vocab.encode("\n" + t + "\n").astype("int64"))
            state, review = None, 0.0
            for i in range(len(ids) - 1):
                logits, state = model(ids[i : i + 1].view(1, 1), state)
                review -= float(torch.log_softmax(logits[0, -1], -1)[ids[i + 1]]) / math.log(2)
            direct.append(review)
    torch.set_num_threads(threads)
    assert chars == sum(len(t) + 1 for t in texts)
    assert list(each_chars) == [len(t) + 1 for t in texts]
    assert unknown == 0
    assert bits == pytest.approx(sum(direct), rel=1e-5)
    # Per review, in the caller's order (not the length-sorted batch order): what per-file sums need.
    assert list(each) == pytest.approx(direct, rel=1e-5)
    by_file = ev.bits_by_source(["a", "b", "a", "b", "a", "b", "a", "b"], each, each_chars, each_chars * 0)
    assert by_file["a"]["bits"] == pytest.approx(sum(direct[0::2]), rel=1e-5)
    assert by_file["b"]["chars"] == sum(len(t) + 1 for t in texts[1::2])
    # An untrained model is close to uniform over the vocabulary: a sanity bound that could fail.
    assert bits / chars == pytest.approx(math.log2(len(vocab)), abs=0.5)


def test_unknown_chars_are_counted() -> None:
    vocab, model = _tiny_vocab_and_model(["abc abc"])
    _, chars, unknown = ev.score_reviews(model, vocab, ["abz", "zz"])
    assert (chars, unknown) == (7, 3)


# --- evaluate() and `raylstm evaluate` on a real checkpoint ----------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(ray_session, tmp_path_factory) -> Path:
    """A small CharLSTM trained briefly on the demo corpus's train split, saved as a real checkpoint."""
    import numpy as np
    import torch

    from raylstm.checkpoint import save_checkpoint
    from raylstm.config import Config
    from raylstm.data import load_splits
    from raylstm.model import build_model

    cfg = Config()
    cfg.model.embed_dim, cfg.model.hidden_size, cfg.model.num_layers, cfg.model.dropout = 16, 64, 1, 0.0
    splits = load_splits(cfg.data)
    cfg.model.vocab_size = len(splits.vocab)
    stream = ev.join_reviews(t for _, t, _ in ev.split_rows(splits.train))
    ids = torch.from_numpy(splits.vocab.encode(stream).astype(np.int64))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=gen)
        win = ids[starts[:, None] + torch.arange(65)]
        logits, _ = model(win[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", model, splits.vocab, cfg, step=120)


@pytest.mark.slow
def test_evaluate_reports_model_and_baselines_on_the_same_text(
    trained_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    from raylstm.cli import main
    from raylstm.config import DataConfig
    from raylstm.data import load_splits

    res = ev.evaluate(trained_checkpoint, split="test")
    splits = load_splits(DataConfig())
    test = ev.join_reviews(t for _, t, _ in ev.split_rows(splits.test))
    train = ev.join_reviews(t for _, t, _ in ev.split_rows(splits.train))
    assert res["chars"] == len(test) == res["model"]["chars"]
    # The baselines were computed on exactly that string, given exactly the training split.
    assert res["baselines"]["xz"]["bpc"] == pytest.approx(ev.compressor_bpc(test, train, ["xz"])["xz"])
    assert res["baselines"]["unigram"]["bpc"] == pytest.approx(ev.unigram_entropy_bpc(test))
    assert set(res["baselines"]) >= {"unigram", "gzip", "bz2", "xz", "ppmd"}
    # 120 steps of a small LSTM already beat any order-0 model of the held-out text.
    assert res["model"]["bpc"] < res["baselines"]["unigram"]["bpc"]

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(trained_checkpoint), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("model", "unigram", "gzip", "bz2", "xz", "ppmd"):
        assert f"\n{name} " in printed
    import json

    assert json.loads(out.read_text())["model"]["bpc"] == pytest.approx(res["model"]["bpc"])


def test_evaluate_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    from raylstm.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2


def _write_word_salad_reviews(path: Path, n: int = 300) -> Path:
    import json

    with open(path, "w") as f:
        for i, text in enumerate(t for t in _review_text(n, seed=9) if len(t) >= 40):
            row = {
                "reviewerID": f"U{i}",
                "asin": "B0TEST",
                "reviewText": text,
                "overall": 4.0,
                "summary": "ok",
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_per_file_bpc_of_a_prepared_dir_equals_each_file_scored_alone(
    trained_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """`raylstm evaluate --data PREPARED_DIR` prints per-file bpc from one scoring of the split (a
    group-by over the shards' `source` column); each figure must be the bits of that file's own held-out
    reviews, found independently by splitting the file alone and scoring its reviews directly."""
    import json

    from raylstm.checkpoint import load_checkpoint
    from raylstm.cli import main
    from raylstm.config import DataConfig
    from raylstm.data import DEMO_CORPUS, load_splits
    from raylstm.prepare import prepare

    files = [str(DEMO_CORPUS), str(_write_word_salad_reviews(tmp_path / "salad.json"))]
    prepared = tmp_path / "prepared"
    prepare(DataConfig(sources=files), prepared)

    out = tmp_path / "eval.json"
    argv = ["evaluate", "--checkpoint", str(trained_checkpoint), "--data", str(prepared), "--no-baselines"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    per_source = json.loads(out.read_text())["per_source"]
    assert sorted(per_source) == sorted(files)

    ckpt = load_checkpoint(trained_checkpoint)
    total_bits, total_chars = 0.0, 0
    for path in files:
        alone = [t for _, t, _ in ev.split_rows(load_splits(DataConfig(sources=[path])).test)]
        bits, chars, _ = ev.score_reviews(ckpt.model, ckpt.vocab, alone)
        assert per_source[path]["reviews"] == len(alone) > 0
        assert per_source[path]["chars"] == chars
        assert per_source[path]["bits"] == pytest.approx(bits, rel=1e-6)
        # The printed table carries the same figure, naming the file.
        line = next(ln for ln in printed.splitlines() if ln.endswith(f"reviews  {path}"))
        assert float(line.split()[0]) == pytest.approx(bits / chars, abs=1e-4)
        total_bits, total_chars = total_bits + bits, total_chars + chars
    model = json.loads(out.read_text())["model"]
    assert (model["chars"], model["bits"]) == (total_chars, pytest.approx(total_bits, rel=1e-6))
    # Trained on the demo corpus, not on shuffled word salad: the figures must tell the files apart.
    assert per_source[files[0]]["bpc"] < per_source[files[1]]["bpc"]

    # The same files as raw sources (read, cleaned, split in memory): the same per-file figures.
    raw = ev.evaluate(trained_checkpoint, sources=files, compressors=False)
    for path in files:
        assert raw["per_source"][path]["chars"] == per_source[path]["chars"]
        assert raw["per_source"][path]["bits"] == pytest.approx(per_source[path]["bits"], rel=1e-9)


@pytest.mark.slow
def test_ray_data_scoring_matches_driver_scoring(trained_checkpoint: Path) -> None:
    """Large splits are scored by parallel Ray Data actors: per-review scoring makes the sum identical."""
    from raylstm.checkpoint import load_checkpoint
    from raylstm.config import DataConfig
    from raylstm.data import DEMO_CORPUS, load_splits

    splits = load_splits(DataConfig())
    ckpt = load_checkpoint(trained_checkpoint)
    texts = [t for _, t, _ in ev.split_rows(splits.train)]
    by_source = ev.ray_score_by_source(trained_checkpoint, splits.train.repartition(3), concurrency=2)
    d_bits, d_chars, d_unknown = ev.score_reviews(ckpt.model, ckpt.vocab, texts)
    assert list(by_source) == [str(DEMO_CORPUS)]
    got = by_source[str(DEMO_CORPUS)]
    assert (got["chars"], got["unknown"], got["reviews"]) == (d_chars, d_unknown, len(texts))
    assert got["bits"] == pytest.approx(d_bits, rel=1e-4)


# --- the Keras peer (bench/peer_keras.py) ------------------------------------------------------------------


def test_peer_stream_windows_predict_every_char_from_the_40_before() -> None:
    from bench.peer_keras import CONTEXT, _stream_windows
    from raylstm.vocab import CharVocab

    text = ev.join_reviews(_review_text(5, seed=1))
    vocab = CharVocab.from_counts(Counter(text + "tail of the training text\n"))
    x, y = _stream_windows(text, vocab, context_text="tail of the training text\n" * 3)
    assert len(y) == len(text)  # every held-out char is predicted once
    for i in (0, 17, len(text) - 1):
        ctx = ("tail of the training text\n" * 3)[-CONTEXT:] + text
        assert vocab.decode(x[i]) == ctx[i : i + CONTEXT]
        assert vocab.decode([y[i]]) == text[i]


@pytest.mark.slow
def test_keras_peer_learns_and_scores() -> None:
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported
    pytest.importorskip("keras")
    import numpy as np

    from bench.peer_keras import build_keras, keras_bpc, seed_batches
    from raylstm.vocab import CharVocab

    text = ev.join_reviews(_review_text(200, seed=2))
    vocab = CharVocab.from_counts(Counter(text))
    ids = vocab.encode(text).astype(np.int64)
    model = build_keras(len(vocab), lr=1e-2)
    x, y = seed_batches(ids, 64, np.random.default_rng(0))
    before = keras_bpc(model, x, y)
    assert before == pytest.approx(math.log2(len(vocab)), abs=0.5)  # untrained: near uniform
    for _ in range(40):  # memorising one batch: a check that the model trains, not of its quality
        model.train_on_batch(x.astype(np.int32), y.astype(np.int32))
    assert keras_bpc(model, x, y) < before - 1.0
