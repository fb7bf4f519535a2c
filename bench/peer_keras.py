"""Peer baseline: the original project's model in Keras 3 (torch backend), beside raylstm's `seed` and
default presets, each trained on the same text for the same wall time on this machine.

    keras     Embedding(128) -> LSTM(128) -> Dense(256, ReLU) -> Dropout(0.5) -> Dense(V, softmax),
              40-char windows every 3 chars, one prediction per window, RMSprop(1e-3), batch 128
              (configs/seed.toml's optimizer settings), Keras' own train_on_batch.
    seed      raylstm.model.SeedLSTM with configs/seed.toml: the same model and samples, in torch.
    default   raylstm.model.CharLSTM with the default Config: every position of 128-char windows
              supervised, AdamW + warmup + cosine (over the wall-time budget).

All three run as plain single-process loops on the driver (torch threads = cores) for the same number of
seconds, so the comparison is model + objective + framework, not Ray: what Ray Train adds over a bare
loop is measured by bench_train. Everyone trains on the same cleaned, case-kept text (the default
DataConfig; the seed preset's lowercase/ASCII switches are off so all three see identical characters)
and is scored on the same held-out string, the first `eval_chars` chars of the test split:
  - seed-style models (keras, seed) predict each char from the 40 chars before it in the stream (how
    they were trained: they never saw a longer context);
  - the full-sequence model reads each review from a zero state after "\\n" (raylstm.evaluate).

`.venv/bin/python -m bench.peer_keras [--seconds 60] [--quick]`
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AMAZON_CSV = ROOT.parent / "shared" / "data" / "amazon" / "Musical_instruments_reviews.csv.gz"
CONTEXT, STEP = 40, 3  # the original's windows: 40 chars of context, a new sample every 3 chars


@dataclass
class PeerText:
    train_reviews: list[str]
    test_reviews: list[str]
    vocab: Any  # raylstm.vocab.CharVocab
    source: str
    train_ids: np.ndarray = field(init=False)
    test: str = field(init=False)

    def __post_init__(self) -> None:
        from raylstm.evaluate import join_reviews

        self.train_ids = self.vocab.encode(join_reviews(self.train_reviews)).astype(np.int64)
        self.test = join_reviews(self.test_reviews)


def load_text(source: Path | None = None, quick: bool = False) -> PeerText:
    """Train/test reviews of `source` (default: the Musical Instruments CSV, else the demo corpus)
    through raylstm's own pipeline: the same cleaning, split and vocabulary as `raylstm train`."""
    from raylstm.config import DataConfig
    from raylstm.data import load_splits
    from raylstm.evaluate import split_rows
    from raylstm.ray_env import ensure_ray

    if source is None and AMAZON_CSV.exists():
        source = AMAZON_CSV
    cfg = DataConfig(sources=[str(source)] if source else [])
    ensure_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    splits = load_splits(cfg)
    train = [t for _, t, _ in split_rows(splits.train)]
    test = [t for _, t, _ in split_rows(splits.test)]
    if quick:  # a quarter of the corpus is plenty for a 10-second run and keeps the encode cheap
        train = train[: max(1, len(train) // 4)]
    return PeerText(train, test, splits.vocab, str(source) if source else "demo corpus")


def seed_batches(ids: np.ndarray, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the original's samples: x = 40 ids, y = the id after them, at random multiples of 3."""
    n_windows = (len(ids) - CONTEXT - 1) // STEP + 1
    starts = rng.integers(0, n_windows, size=batch) * STEP
    x = ids[starts[:, None] + np.arange(CONTEXT)]
    return x, ids[starts + CONTEXT]


def _stream_windows(text: str, vocab: Any, context_text: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, 40], y [N]): every char of `text` with the 40 chars before it in the stream."""
    pre = vocab.encode(context_text[-CONTEXT:].rjust(CONTEXT, "\n")).astype(np.int64)
    ids = np.concatenate([pre, vocab.encode(text).astype(np.int64)])
    x = np.lib.stride_tricks.sliding_window_view(ids[:-1], CONTEXT)
    return x, ids[CONTEXT:]


# --- Keras --------------------------------------------------------------------------------------------
def build_keras(vocab_size: int, lr: float = 1e-3):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    from keras import layers

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"bench.peer_keras needs KERAS_BACKEND=torch, got {keras.backend.backend()!r}")
    model = keras.Sequential(
        [
            keras.Input((CONTEXT,), dtype="int32"),
            layers.Embedding(vocab_size, 128),
            layers.LSTM(128),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(vocab_size, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=lr), loss="sparse_categorical_crossentropy"
    )
    return model


def keras_bpc(model: Any, x: np.ndarray, y: np.ndarray, batch: int = 2048) -> float:
    bits = 0.0
    for i in range(0, len(y), batch):
        p = np.asarray(model.predict_on_batch(x[i : i + batch].astype(np.int32)), dtype=np.float64)
        bits += float(-np.log2(np.clip(p[np.arange(len(p)), y[i : i + batch]], 1e-12, 1.0)).sum())
    return bits / len(y)


def train_keras(text: PeerText, seconds: float, batch: int = 128, lr: float = 1e-3, seed: int = 0) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.utils.set_random_seed(seed)
    model = build_keras(len(text.vocab), lr)
    rng = np.random.default_rng(seed)
    x, y = seed_batches(text.train_ids, batch, rng)
    model.train_on_batch(x.astype(np.int32), y.astype(np.int32))  # build + first step outside the clock
    curve, samples, losses = [], 0, []
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        x, y = seed_batches(text.train_ids, batch, rng)
        losses.append(float(model.train_on_batch(x.astype(np.int32), y.astype(np.int32))))
        samples += batch
        if len(losses) % 5 == 0:
            curve.append((elapsed, samples, float(np.mean(losses[-10:])) / math.log(2)))
    elapsed = time.perf_counter() - t0
    return {
        "model": model,
        "seconds": elapsed,
        "windows": samples,
        "preds": samples,
        "input_chars": samples * CONTEXT,
        "curve": curve,
    }


# --- raylstm's models, same budget --------------------------------------------------------------------
def _preset(name: str):
    from raylstm.config import Config, load_config

    if name == "default":
        return Config()
    path = ROOT / "configs" / f"{name}.toml"
    cfg = load_config(path)
    # Same text for everyone: the comparison is about the model and the objective, not the cleaning.
    cfg.data.lowercase = cfg.data.ascii_only = False
    return cfg


def train_torch(
    preset: str,
    text: PeerText,
    seconds: float,
    seed: int = 0,
    device: str = "cpu",
    overrides: list[str] | None = None,
) -> dict:
    """A bare loop over raylstm's model with the preset's model/optimizer settings, for `seconds`.
    On CUDA it runs under bf16 autocast, as raylstm's training loop does."""
    import torch

    from raylstm.config import apply_override
    from raylstm.model import build_model

    cfg = _preset(preset)
    for item in overrides or []:
        apply_override(cfg, item)
    cfg.model.vocab_size = len(text.vocab)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(cfg.model).to(device)
    cuda = device.startswith("cuda")
    tc = cfg.train
    params = [p for p in model.parameters()]
    if tc.optimizer == "rmsprop":
        # Keras' RMSprop: rho 0.9, eps 1e-7 (torch's defaults are 0.99 and 1e-8).
        opt = torch.optim.RMSprop(params, lr=tc.lr, alpha=0.9, eps=1e-7)
    else:
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    seed_mode = cfg.data.window_mode == "seed"
    T, B = cfg.data.seq_len, tc.batch_size
    ids = torch.from_numpy(text.train_ids).to(device)
    n_full = (len(ids) - 1) // T
    curve, windows, preds, losses, step = [], 0, 0, [], 0
    model.train()

    def one_step(lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if seed_mode:
                x, y = seed_batches(text.train_ids, B, rng)
                logits, _ = model(torch.from_numpy(x).to(device))
                loss = torch.nn.functional.cross_entropy(
                    logits[:, -1].float(), torch.from_numpy(y).to(device)
                )
            else:
                starts = torch.from_numpy(rng.integers(0, n_full, size=B) * T).to(device)
                win = ids[starts[:, None] + torch.arange(T + 1, device=device)]
                logits, _ = model(win[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), win[:, 1:].reshape(-1)
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        return float(loss.detach())

    one_step(0.0)  # allocate outside the clock (lr 0: no update)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        # The preset's warmup + cosine, stretched over the time budget instead of max_steps.
        frac = elapsed / seconds
        warm = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
        lr = tc.lr * warm * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        losses.append(one_step(lr))
        step += 1
        windows += B
        preds += B if seed_mode else B * T
        if step % 5 == 0:
            curve.append((elapsed, preds, float(np.mean(losses[-10:])) / math.log(2)))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "model": model.eval(),
        "seconds": elapsed,
        "windows": windows,
        "preds": preds,
        "input_chars": windows * (CONTEXT if seed_mode else T),
        "curve": curve,
        "seed_mode": seed_mode,
        "config": cfg,
    }


def torch_bpc(
    result: dict, text: PeerText, eval_reviews: list[str], eval_text: str, device: str = "cpu"
) -> float:
    import torch

    from raylstm.evaluate import score_reviews

    model = result["model"]
    if not result["seed_mode"]:
        bits, chars, _ = score_reviews(model, text.vocab, eval_reviews, device=device)
        return bits / chars
    x, y = _stream_windows(eval_text, text.vocab, "\n")
    bits = 0.0
    with torch.inference_mode():
        for i in range(0, len(y), 2048):
            logits, _ = model(torch.from_numpy(np.ascontiguousarray(x[i : i + 2048])).to(device))
            nll = torch.nn.functional.cross_entropy(
                logits[:, -1].float(), torch.from_numpy(y[i : i + 2048]).to(device), reduction="sum"
            )
            bits += float(nll) / math.log(2)
    return bits / len(y)


# --- the benchmark ------------------------------------------------------------------------------------
def _eval_set(text: PeerText, eval_chars: int) -> tuple[list[str], str]:
    """Whole test reviews from the start of the (key-sorted) test split, up to eval_chars chars."""
    from raylstm.evaluate import join_reviews

    out, n = [], 0
    for t in text.test_reviews:
        if n >= eval_chars:
            break
        out.append(t)
        n += len(t) + 1
    return out, join_reviews(out)


def compare(text: PeerText, seconds: float, eval_chars: int, device: str = "cpu") -> dict[str, Any]:
    """Keras peer, raylstm seed, raylstm default: each trained `seconds`, scored on the same text.
    Keras picks its device itself (the torch backend uses CUDA when torch sees a GPU)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    eval_reviews, eval_text = _eval_set(text, eval_chars)
    rows: dict[str, Any] = {}
    kr = train_keras(text, seconds)
    x, y = _stream_windows(eval_text, text.vocab, "\n")
    kr["bpc"] = keras_bpc(kr.pop("model"), x, y)
    rows["keras (peer)"] = kr
    for preset in ("seed", "default"):
        r = train_torch(preset, text, seconds, device=device)
        r["bpc"] = torch_bpc(r, text, eval_reviews, eval_text, device=device)
        r.pop("model")
        r.pop("config")
        rows[f"raylstm {preset}"] = r
    return {
        "rows": rows,
        "eval_chars": len(eval_text),
        "eval_reviews": len(eval_reviews),
        "train_chars": int(len(text.train_ids)),
        "source": text.source,
        "seconds": seconds,
        "device": device,
    }


def to_markdown(res: dict[str, Any], command: str) -> str:
    rows = res["rows"]
    base = rows["keras (peer)"]
    lines = [
        "## Peer: the original Keras model vs raylstm's presets, same text, same wall time",
        "",
        f"Text: {res['source']} ({res['train_chars']:,} training chars); each model trained "
        f"{res['seconds']:.0f} s in a plain loop on this machine; held-out bpc on the same "
        f"{res['eval_chars']:,} chars ({res['eval_reviews']} test reviews). Seed-style models are scored with "
        "the 40 chars before each char; the full-sequence model reads each review from a zero state.",
        "",
        "| model | windows/s | supervised preds/s | input chars/s | preds/s vs keras | held-out bpc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        pps = r["preds"] / r["seconds"]
        lines.append(
            f"| {name} | {r['windows'] / r['seconds']:,.0f} | {pps:,.0f} | {r['input_chars'] / r['seconds']:,.0f} "
            f"| {pps / (base['preds'] / base['seconds']):.2f}x | {r['bpc']:.3f} |"
        )
    lines += ["", f"Rerun: `{command}`", ""]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seconds: float | None = None) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = seconds if seconds is not None else (10.0 if quick else 45.0)
    text = load_text(quick=quick)
    res = compare(text, seconds, eval_chars=10_000 if quick else 40_000)
    (out_dir / "peer.json").write_text(json.dumps(res, indent=2, default=str))
    cmd = (
        ".venv/bin/python -m bench.peer_keras"
        + (" --quick" if quick else "")
        + (f" --seconds {seconds:g}" if seconds not in (10.0, 45.0) else "")
    )
    return to_markdown(res, cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 s per model, a quarter of the text")
    ap.add_argument("--seconds", type=float, default=None, help="wall time per model (default 45, quick 10)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    md = run(Path(args.out), args.quick, args.seconds)
    (Path(args.out) / "peer.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
