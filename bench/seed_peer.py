"""The original project's published weights (../shared/seed/model.h5) in raylstm's own SeedLSTM, scored the
way they were trained: a peer figure to put beside raylstm's runs on the same held-out text.

    model.h5 (Keras 2.2.5)            raylstm.model.SeedLSTM (kind "seed", hidden 256, vocab 128)
    --------------------------        ----------------------------------------------------------------
    Embedding(128, 128)          ->   embed.weight                        as stored
    CuDNNLSTM(256)                    lstm (one layer, torch gate order i, f, g, o == Keras' i, f, c, o)
      kernel:0 (128, 1024)       ->   weight_ih_l0 (1024, 128)  cuDNN layout -> Keras layout -> transposed
      recurrent_kernel:0 (256,1024) -> weight_hh_l0 (1024, 256)  likewise
      bias:0 (2048,)             ->   bias_ih_l0 = bias[:1024], bias_hh_l0 = bias[1024:]
    Dense(256, relu)             ->   head[0] (Linear: kernel transposed)
    Dropout(0.5)                 ->   head[2] (off in eval)
    Dense(128, softmax)          ->   head[3] (logits; the softmax is in the loss)

Characters: the original fed `ord(c)` of lowercase ASCII text and predicted the next code (128 outputs).
A CharVocab whose id for chr(i) is i (i = 1..127; id 0 is raylstm's unknown symbol, which in the original
is chr(0), never seen) makes the ids identical, so no output row is remapped.

The kernels are in cuDNN's memory layout, not Keras LSTM's: Keras' own CuDNNLSTM -> LSTM conversion
(`keras/engine/saving.py`, `_convert_rnn_weights`) splits each kernel into its 4 gate blocks and turns
the input block `k` into `k.T.reshape(k.shape, order="F")` and the recurrent block `r` into `r.T`; that
is `cudnn_to_keras_lstm` here, and `layout="stored"` skips it (the mistake that scores ~24 bits/char).

Scoring (how it was trained: each prediction reads exactly the 40 chars before it, from a zero state):
on raylstm's held-out test split of the Musical Instruments CSV, cleaned with lowercase + ascii_only (the
original's text), every char of every review from position 40 on is predicted from the 40 before it.
../shared/seed/README.md gives 2.171 bits per char over 250,987 predictions for this.

Rerun: `.venv/bin/python -m bench.seed_peer [--json bench/out/seed_peer.json] [--max-reviews N]` (about
3 minutes on 2 cores for the whole split); also a piece of `make bench` (`--only seed_peer`).
From another benchmark: `from bench.seed_peer import seed_peer_figure; seed_peer_figure()` (a dict with
bpc, predictions, bits, seconds and samples at the original's temperatures).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylstm.config import DataConfig, ModelConfig
from raylstm.model import SeedLSTM
from raylstm.vocab import CharVocab

ROOT = Path(__file__).resolve().parents[1]
SEED_H5 = ROOT.parent / "shared" / "seed" / "model.h5"
AMAZON_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"
CONTEXT = 40  # the original's input_length: every prediction reads exactly this many chars
TEMPERATURES = (0.2, 0.5, 1.0, 1.2)  # the original README's sampling temperatures
PRIME = "i bought this "  # lowercase: the original's text had no capitals
GATES = 4  # i, f, c (g), o: the same order in Keras, cuDNN and torch


def ord_vocab() -> CharVocab:
    """ids == ord(c) for chr(1)..chr(127): the original's character coding, in a CharVocab."""
    return CharVocab([chr(i) for i in range(1, 128)])


def read_h5(path: str | Path = SEED_H5) -> dict[str, np.ndarray]:
    """The model's weight arrays by role: embed, lstm_kernel, lstm_recurrent, lstm_bias, dense{1,2}_{w,b}."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the seed weights are not at {path} (see ../shared/seed/README.md)")
    with h5py.File(path, "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
        kinds = {layer["class_name"]: layer["config"] for layer in layers if layer["class_name"] != "Dense"}
        dense = [layer["config"] for layer in layers if layer["class_name"] == "Dense"]
        if "CuDNNLSTM" not in kinds or len(dense) != 2:
            raise ValueError(f"{path}: expected Embedding -> CuDNNLSTM -> Dense -> Dropout -> Dense")
        w = f["model_weights"]

        def get(layer: dict, name: str) -> np.ndarray:
            return np.asarray(w[layer["name"]][layer["name"]][f"{name}:0"], dtype=np.float32)

        lstm = kinds["CuDNNLSTM"]
        return {
            "embed": get(kinds["Embedding"], "embeddings"),
            "lstm_kernel": get(lstm, "kernel"),
            "lstm_recurrent": get(lstm, "recurrent_kernel"),
            "lstm_bias": get(lstm, "bias"),
            "dense1_w": get(dense[0], "kernel"),
            "dense1_b": get(dense[0], "bias"),
            "dense2_w": get(dense[1], "kernel"),
            "dense2_b": get(dense[1], "bias"),
        }


def cudnn_to_keras_lstm(kernel: np.ndarray, recurrent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras' `_convert_rnn_weights` for CuDNNLSTM -> LSTM, the kernels part, as Keras writes it."""

    def per_gate(k: np.ndarray, fn: Any) -> np.ndarray:
        return np.hstack([fn(block) for block in np.hsplit(k, GATES)])

    return (
        per_gate(kernel, lambda k: k.T.reshape(k.shape, order="F")),
        per_gate(recurrent, lambda r: r.T),
    )


def torch_state_dict(arrays: dict[str, np.ndarray], layout: str = "cudnn") -> dict[str, torch.Tensor]:
    """SeedLSTM's state_dict from `read_h5` arrays. layout "cudnn" converts the kernels from cuDNN's
    memory layout (correct for this file); "stored" takes them as if they were Keras LSTM kernels."""
    kernel, recurrent = arrays["lstm_kernel"], arrays["lstm_recurrent"]
    if layout == "cudnn":
        kernel, recurrent = cudnn_to_keras_lstm(kernel, recurrent)
    elif layout != "stored":
        raise ValueError(f"layout must be 'cudnn' or 'stored', got {layout!r}")
    bias_ih, bias_hh = np.split(arrays["lstm_bias"], 2)  # cuDNN keeps both bias sets, as torch does
    sd = {
        "embed.weight": arrays["embed"],
        # Keras computes x @ kernel (in, 4H); torch computes W @ x with W (4H, in).
        "lstm.weight_ih_l0": kernel.T,
        "lstm.weight_hh_l0": recurrent.T,
        "lstm.bias_ih_l0": bias_ih,
        "lstm.bias_hh_l0": bias_hh,
        "head.0.weight": arrays["dense1_w"].T,
        "head.0.bias": arrays["dense1_b"],
        "head.3.weight": arrays["dense2_w"].T,
        "head.3.bias": arrays["dense2_b"],
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def load_seed_model(path: str | Path = SEED_H5, layout: str = "cudnn") -> tuple[SeedLSTM, CharVocab]:
    """The published model as a raylstm SeedLSTM in eval mode, with its ord() vocabulary."""
    arrays = read_h5(path)
    vocab = ord_vocab()
    n_out, hidden = arrays["dense2_w"].shape[1], arrays["lstm_recurrent"].shape[0]
    if n_out != len(vocab):
        raise ValueError(f"{path}: {n_out} outputs, expected {len(vocab)} (ord() codes 0..127)")
    cfg = ModelConfig(
        kind="seed",
        vocab_size=n_out,
        embed_dim=arrays["embed"].shape[1],
        hidden_size=hidden,
        num_layers=1,
        dropout=0.5,
        seed_dense=arrays["dense1_w"].shape[1],
    )
    model = SeedLSTM(cfg)
    model.load_state_dict(torch_state_dict(arrays, layout), strict=True)
    return model.eval(), vocab


def review_windows(texts: list[str], vocab: CharVocab) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, 40], y [N]): every char of every review from position 40 on, with the 40 chars before it."""
    xs, ys = [], []
    for t in texts:
        if len(t) <= CONTEXT:
            continue
        ids = vocab.encode(t).astype(np.int64)
        xs.append(np.lib.stride_tricks.sliding_window_view(ids[:-1], CONTEXT))
        ys.append(ids[CONTEXT:])
    if not xs:
        return np.zeros((0, CONTEXT), np.int64), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


@torch.inference_mode()
def score_windows(model: SeedLSTM, x: np.ndarray, y: np.ndarray, batch: int = 2048) -> float:
    """Total bits of predicting y[i] from x[i] (each window from a zero LSTM state)."""
    bits = 0.0
    for i in range(0, len(y), batch):
        xb = torch.from_numpy(x[i : i + batch])
        yb = torch.from_numpy(y[i : i + batch])
        logits, _ = model(xb)
        nll = torch.nn.functional.cross_entropy(logits[:, -1].float(), yb, reduction="sum")
        bits += float(nll) / math.log(2)
    return bits


def seed_text_splits(source: str | Path = AMAZON_CSV) -> Any:
    """raylstm's splits of `source` (a `raylstm.data.ReviewSplits`), cleaned as the original's text was:
    lowercase, ASCII only. Needs a Ray session."""
    from raylstm.data import load_splits

    return load_splits(DataConfig(sources=[str(source)], lowercase=True, ascii_only=True))


def heldout_reviews(source: str | Path = AMAZON_CSV, split: str = "test") -> list[str]:
    """The reviews of `split` of `seed_text_splits(source)`, in key order."""
    from raylstm.evaluate import split_rows

    return [t for _, t, _ in split_rows(getattr(seed_text_splits(source), split))]


def seed_bpc(texts: list[str], path: str | Path = SEED_H5, layout: str = "cudnn") -> dict[str, Any]:
    """Bits per char of the published weights on `texts`, scored the way they were trained."""
    model, vocab = load_seed_model(path, layout)
    x, y = review_windows(texts, vocab)
    if not len(y):
        raise ValueError(f"no review is longer than {CONTEXT} chars: nothing to predict")
    t0 = time.perf_counter()
    bits = score_windows(model, x, y)
    return {
        "bpc": bits / len(y),
        "bits": bits,
        "predictions": int(len(y)),
        "reviews": len(texts),
        "seconds": time.perf_counter() - t0,
        "layout": layout,
        "weights": str(path),
    }


# How the original was trained (and sampled): 40-char windows from a zero state, lowercase ASCII text.
SEED_DATA = DataConfig(lowercase=True, ascii_only=True, window_mode="seed", seed_context=CONTEXT)


def generate(
    model: SeedLSTM, vocab: CharVocab, prime: str, n_chars: int, temperature: float, seed: int = 0
) -> str:
    """raylstm's own sampler in seed mode: each new char from the last 40 chars, read from a zero state,
    as the original sampled (temperature 0 is argmax; the unknown id, chr(0), is never produced)."""
    from raylstm.sample import SampleParams, Sampler

    params = SampleParams(temperature=temperature, max_chars=n_chars, seed=seed)
    return Sampler(model, vocab, SEED_DATA).complete(prime, params).text


def seed_peer_figure(
    texts: list[str] | None = None,
    path: str | Path = SEED_H5,
    sample_chars: int = 300,
    temperatures: tuple[float, ...] = TEMPERATURES,
) -> dict[str, Any]:
    """The peer figure for bench/REPORT.md: the published weights' bpc on raylstm's held-out MI test
    split (or `texts`), and samples from PRIME at the original's temperatures. Needs a Ray session when
    `texts` is None (the split is computed by raylstm's own pipeline)."""
    if texts is None:
        texts = heldout_reviews()
    result = seed_bpc(texts, path)
    model, vocab = load_seed_model(path)
    result["prime"] = PRIME
    result["samples"] = {f"{t:g}": generate(model, vocab, PRIME, sample_chars, t) for t in temperatures}
    return result


def markdown(fig: dict[str, Any], command: str) -> str:
    """The figure as a bench/REPORT.md section."""
    lines = [
        "## Seed peer: the original project's published weights",
        "",
        f"Command: `{command}`. `../shared/seed/model.h5` (Keras 2.2.5, CuDNNLSTM(256)) converted into",
        "raylstm's SeedLSTM (bench/seed_peer.py) and scored the way it was trained: each char of each",
        "held-out review from position 40 on, predicted from the 40 chars before it (lowercase ASCII text).",
        "",
        "| weights | held-out reviews | predictions | bits/char | seconds |",
        "|---|---:|---:|---:|---:|",
        f"| seed model.h5 (cuDNN layout converted) | {fig['reviews']:,} | {fig['predictions']:,} "
        f"| {fig['bpc']:.3f} | {fig['seconds']:.0f} |",
        "",
        f"Samples from `{fig['prime']}` (raylstm's sampler in seed mode: each char from the last 40):",
        "",
    ]
    for t, text in fig["samples"].items():
        shown = (fig["prime"] + text).replace("\n", " / ").replace("`", "'")
        lines.append(f"- T={t}: `{shown}`")
    return "\n".join(lines) + "\n"


def run(out_dir: Path, quick: bool = False) -> str:
    """bench.run_all's entry point: the figure on the whole held-out split (quick: 60 reviews)."""
    from raylstm.ray_env import ensure_ray

    ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    texts = heldout_reviews()
    if quick:
        texts = texts[:60]
    fig = seed_peer_figure(texts)
    (Path(out_dir) / "seed_peer.json").write_text(json.dumps(fig, indent=2))
    return markdown(fig, ".venv/bin/python -m bench.seed_peer" + (" --quick" if quick else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(SEED_H5), help="the published model.h5")
    ap.add_argument("--source", default=str(AMAZON_CSV), help="reviews whose held-out test split is scored")
    ap.add_argument("--max-reviews", type=int, default=0, help="score only the first N held-out reviews")
    ap.add_argument(
        "--quick", action="store_true", help="the first 60 held-out reviews (bench.run_all --quick)"
    )
    ap.add_argument("--json", dest="json_out", help="also write the figure as JSON here")
    args = ap.parse_args(argv)
    if args.quick and not args.max_reviews:
        args.max_reviews = 60

    from raylstm.ray_env import ensure_ray

    ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    texts = heldout_reviews(args.source)
    if args.max_reviews:
        texts = texts[: args.max_reviews]
    fig = seed_peer_figure(texts, args.weights)
    print(
        f"seed weights ({args.weights}): {fig['bpc']:.3f} bits/char over {fig['predictions']:,} predictions "
        f"({fig['reviews']} held-out reviews of {args.source}, lowercase ASCII, 40-char contexts) "
        f"in {fig['seconds']:.0f} s"
    )
    for t, text in fig["samples"].items():
        print(f"--- temperature {t} ---\n{PRIME}{text}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(fig, indent=2))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
