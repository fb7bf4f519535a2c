"""CharLSTM / SeedLSTM behaviour and the per-worker pieces of the training loop (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from raylstm.config import ModelConfig, TrainConfig
from raylstm.model import SeedLSTM, build_model
from raylstm.train_loop import (
    TrainingDiverged,
    check_loss,
    loss_sum_and_count,
    make_optimizer,
    split_batch,
)
from raylstm.vocab import CharVocab

TEXT = "I bought this for my guitar and it works great.\n" * 4
VOCAB = CharVocab.from_counts({c: TEXT.count(c) for c in set(TEXT)})


def small(kind: str = "lstm", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind=kind,
        vocab_size=len(VOCAB),
        embed_dim=8,
        hidden_size=16,
        num_layers=2,
        dropout=0.0,
        seed_dense=12,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return build_model(cfg).eval()


def test_state_carrying_equals_reading_the_whole_sequence():
    model = small()
    ids = torch.as_tensor(VOCAB.encode(TEXT[:30]), dtype=torch.long)[None]
    full, _ = model(ids)
    state, steps = None, []
    for t in range(ids.shape[1]):
        out, state = model(ids[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-6)


def test_seed_model_is_the_original_keras_architecture():
    cfg = ModelConfig(
        kind="seed", vocab_size=60, embed_dim=128, hidden_size=128, num_layers=1, dropout=0.5, seed_dense=256
    )
    model = build_model(cfg)
    assert isinstance(model, SeedLSTM)
    dense, relu, drop, out = model.head
    assert (dense.in_features, dense.out_features, out.out_features) == (128, 256, 60)
    assert isinstance(relu, torch.nn.ReLU) and drop.p == 0.5
    # Keras counts one LSTM bias vector; torch keeps two (b_ih, b_hh): the rest matches Keras' summary.
    keras = 60 * 128 + 4 * (128 * (128 + 128) + 128) + (128 * 256 + 256) + (256 * 60 + 60)
    assert model.num_parameters() == keras + 4 * 128


def test_full_mode_supervises_every_position_and_seed_mode_only_the_last():
    ids = torch.as_tensor(VOCAB.encode(TEXT[:11]), dtype=torch.long)[None]
    x, y = split_batch(ids, "full")
    assert torch.equal(x[0], ids[0, :-1]) and torch.equal(y[0], ids[0, 1:])
    x, y = split_batch(ids, "seed")
    assert torch.equal(x[0], ids[0, :-1]) and y.tolist() == [ids[0, -1].item()]

    model = small("seed")
    s, n = loss_sum_and_count(model, ids, "seed")
    assert n == 1
    logits, _ = model(x)
    assert s.item() == pytest.approx(-torch.log_softmax(logits[0, -1], -1)[ids[0, -1]].item(), rel=1e-5)
    _, n_full = loss_sum_and_count(small(), ids, "full")
    assert n_full == 10


@pytest.fixture()
def one_thread():
    """Tiny models are slower with several intra-op threads, badly so on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_small_model_learns_a_repeated_review(one_thread):
    model = small().train()
    opt = make_optimizer(model, TrainConfig(lr=2e-2, weight_decay=0.0))
    ids = torch.as_tensor(VOCAB.encode(TEXT[:96]), dtype=torch.long)[None]
    first = None
    for _ in range(120):
        s, n = loss_sum_and_count(model, ids, "full")
        loss = s / n
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > math.log(len(VOCAB)) * 0.8  # starts near chance
    assert loss.item() < 0.3


def test_loss_guard_names_the_step_and_the_setting():
    check_loss(4.6, step=3, max_loss=20.0)
    for bad in (float("nan"), float("inf"), 25.0):
        with pytest.raises(TrainingDiverged, match=r"step 7.*train\.max_loss"):
            check_loss(bad, step=7, max_loss=20.0)
