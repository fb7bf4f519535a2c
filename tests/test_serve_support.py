"""Real checkpoints for the sampling and serving tests, trained once per test session.

A tiny CharLSTM (hidden 64) trained with a plain torch loop for a few hundred steps on review-like text,
written with checkpoint.save_checkpoint + write_best, like the trainer does. Two checkpoints (different
seeds and steps) so hot reload has somewhere to switch to. No test functions live here.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from raylstm.checkpoint import save_checkpoint, write_best
from raylstm.config import Config
from raylstm.model import build_model
from raylstm.vocab import CharVocab

TEXT = (
    "I bought these strings for my guitar and they sound great. The tone is warm and bright. "
    "I bought this cable to replace an old one and it works well. Good value for the price. "
    "These picks are thin and easy to hold. I would buy them again. Great product, fast shipping. "
    "The stand is sturdy and holds my bass without a problem. Five stars. "
    "I bought these for my son and he loves them. The sound is clear and the build is solid. "
    "Works as described. The strap is comfortable and long enough for me. Highly recommended. "
)

_CACHE: dict[str, Path] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(
    out: Path,
    name: str,
    steps: int,
    seed: int,
    hidden: int = 64,
    *,
    lowercase: bool = False,
    seed_context: int = 0,
    layers: int = 1,
) -> Path:
    """Train a small CharLSTM on TEXT and save it as checkpoint `out/name`; returns the checkpoint dir.

    lowercase: trained on lowercased text with data.lowercase/ascii_only set (no capitals in its vocab).
    seed_context > 0: a `seed`-kind model with data.window_mode = "seed" and that window."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread(): ~40x faster on a busy 2-core box
    try:
        return _train_tiny(out, name, steps, seed, hidden, lowercase, seed_context, layers)
    finally:
        torch.set_num_threads(old)


def _train_tiny(
    out: Path, name: str, steps: int, seed: int, hidden: int, lowercase: bool, seed_context: int, layers: int
) -> Path:
    torch.manual_seed(seed)
    text = TEXT.lower() if lowercase else TEXT
    counts: dict[str, int] = {}
    for ch in text + "\n":
        counts[ch] = counts.get(ch, 0) + 1
    vocab = CharVocab.from_counts(counts, min_count=1)
    cfg = Config()
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.embed_dim, cfg.model.dropout = (
        hidden,
        layers,
        16,
        0.0,
    )
    cfg.data.lowercase = cfg.data.ascii_only = lowercase
    if seed_context:
        cfg.model.kind, cfg.data.window_mode, cfg.data.seed_context = "seed", "seed", seed_context
        cfg.model.seed_dense = 32
    cfg.model.vocab_size = len(vocab)
    model = build_model(cfg.model)
    data = torch.from_numpy(vocab.encode((text + "\n") * 4).astype("int64"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    T, B = 48, 16
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,))
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    bpc = float(loss.detach()) / 0.6931471805599453
    model.eval()
    return save_checkpoint(out / name, model, vocab, cfg, step=steps, metrics={"val_bpc": bpc})


def one_thread():
    """Generator for an autouse fixture: torch on one thread. On a shared 2-core box, torch's default
    thread pool spins against other processes and small-model steps run ~40x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_dir(tmp_path_factory) -> Path:
    """A run dir whose best.json names checkpoint `ckpt_a`; `ckpt_b` sits next to it for reloads, with a
    different shape (2 layers of 32 instead of 1 of 64), so a reload really swaps the model."""
    if "run" not in _CACHE:
        run = tmp_path_factory.mktemp("serve_run")
        a = train_tiny(run, "ckpt_a", steps=300, seed=1)
        train_tiny(run, "ckpt_b", steps=120, seed=2, hidden=32, layers=2)
        write_best(run, a.name, {"val_bpc": 1.0})
        _CACHE["run"] = run
    return _CACHE["run"]


def lowercase_checkpoint(tmp_path_factory) -> Path:
    """A model trained on lowercased ASCII text (data.lowercase = ascii_only = true): no capitals."""
    if "lower" not in _CACHE:
        _CACHE["lower"] = train_tiny(
            tmp_path_factory.mktemp("lower"), "ckpt", steps=200, seed=3, lowercase=True
        )
    return _CACHE["lower"]


def seed_mode_checkpoint(tmp_path_factory) -> Path:
    """A `seed`-kind model whose data config says window_mode = "seed", seed_context = 12."""
    if "seedmode" not in _CACHE:
        _CACHE["seedmode"] = train_tiny(
            tmp_path_factory.mktemp("seedmode"), "ckpt", steps=150, seed=4, seed_context=12
        )
    return _CACHE["seedmode"]
