"""A small conditioned model for the classify, sampling and serving tests: trained here on reviews whose
rating (1 or 5) and category are obvious from their words, with the training loop's own pieces (no
Ray), in a few seconds on one thread. No test functions live here."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from raylstm.conditions import ConditionVocab
from raylstm.config import Config
from raylstm.data import stream_condition_rows
from raylstm.model import build_model
from raylstm.train_loop import make_optimizer, make_scheduler, train_step
from raylstm.vocab import CharVocab

GOOD = ["love", "great", "perfect", "excellent", "happy with", "recommend"]
BAD = ["hate", "awful", "broken", "terrible", "returned", "junk"]
THINGS = {"guitars": ["guitar", "tuner", "capo", "strap"], "books": ["novel", "story", "author", "plot"]}


def review(rng: random.Random, rating: int, category: str) -> str:
    words = GOOD if rating == 5 else BAD
    a, b = rng.sample(words, 2)
    return f"The {rng.choice(THINGS[category])} is {a}, {b}."


def corpus(n: int, seed: int) -> list[tuple[str, int, str]]:
    """n reviews, (text, rating, category): ratings 1 and 5 alternate, categories every other pair."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rating, category = (5 if i % 2 else 1), ("guitars" if i % 4 < 2 else "books")
        out.append((review(rng, rating, category), rating, category))
    return out


_CACHE: dict[str, tuple] = {}


def trained_conditioned() -> tuple[torch.nn.Module, CharVocab, ConditionVocab, Config]:
    """(model in eval mode, vocab, condition vocabulary, config), trained once per test session."""
    if "model" not in _CACHE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: a second thread only waits (and on a loaded box, spins)
        try:
            _CACHE["model"] = _train()
        finally:
            torch.set_num_threads(threads)
    return _CACHE["model"]


def conditioned_checkpoint(out: Path) -> Path:
    """The model as a run dir (best.json -> its checkpoint), as the trainer writes it."""
    from raylstm.checkpoint import save_checkpoint, write_best

    model, vocab, conds, cfg = trained_conditioned()
    ckpt = save_checkpoint(
        out / "ckpt", model, vocab, cfg, step=250, metrics={"val_bpc": 1.0}, conditions=conds
    )
    write_best(out, ckpt.name, {"val_bpc": 1.0})
    return out


def _train():
    train = corpus(400, seed=1)
    texts = [t for t, _, _ in train]
    vocab = CharVocab.from_counts({c: 5 for c in set("".join(texts) + "\n")})
    joint = {}
    for _, r, c in train:
        joint[(str(r), c)] = joint.get((str(r), c), 0) + 1
    conds = ConditionVocab.from_counts(("rating", "category"), joint)
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.embed_dim, m.hidden_size, m.num_layers, m.dropout = len(vocab), 16, 64, 1, 0.0
    m.conditions, m.condition_dim, m.condition_sizes = ["rating", "category"], 4, conds.sizes
    cfg.train.lr, cfg.train.warmup_steps = 1e-2, 10
    cond = conds.encode_rows(
        {"rating": [float(r) for _, r, _ in train], "category": [c for _, _, c in train]}
    )
    T = 32
    ids, rows = stream_condition_rows(texts, cond, vocab, T + 1, T)
    torch.manual_seed(0)
    model = build_model(m)
    opt = make_optimizer(model, cfg.train)
    steps = 250
    sched = make_scheduler(opt, cfg.train, steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (32,), generator=gen)
        x = torch.as_tensor(ids[pick.numpy()], dtype=torch.long)
        c = torch.as_tensor(rows[pick.numpy()], dtype=torch.long)
        train_step(model, opt, sched, x, None, cfg.train, "full", c)
    return model.eval(), vocab, conds, cfg
