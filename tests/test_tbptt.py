"""Stateful truncated BPTT, the pieces without Ray: segment layout, the carried state, resume positions.

The reference for the carried state is the model reading the whole segment in one pass: an LSTM that
reads window after window from the state the previous one ended in computes exactly that (truncation
only cuts the gradient, never the forward pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raylstm.config import Config, DataConfig, ModelConfig, TrainConfig
from raylstm.data import EOR, stream_rows, window_shape
from raylstm.model import build_model
from raylstm.train_loop import Position, Worker, make_optimizer, make_scheduler, segment_windows, train_step
from raylstm.vocab import CharVocab

REVIEWS = [
    "These strings sound bright for a week, then go dull.",
    "Great tuner, clips on the headstock and stays put.",
    "Too quiet for a band practice but fine at home.",
    "The pedal hums unless I use a separate power supply.",
] * 6
VOCAB = CharVocab.from_counts({c: 1 for c in set("".join(REVIEWS) + EOR)})
T, N = 16, 5  # seq_len, segment_windows


def segments() -> torch.Tensor:
    width, stride = window_shape(DataConfig(seq_len=T, segment_windows=N))
    rows = stream_rows(REVIEWS, VOCAB, width, stride)
    assert rows.shape[0] >= 3
    return torch.as_tensor(rows[:3], dtype=torch.long)


def model_and_optimizer(lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, object, TrainConfig]:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=len(VOCAB), embed_dim=8, hidden_size=24, num_layers=2, dropout=0.0)
    )
    tcfg = TrainConfig(optimizer="sgd", lr=lr, grad_clip=0.0, warmup_steps=0, min_lr_ratio=1.0)
    opt = make_optimizer(model, tcfg)
    return model, opt, make_scheduler(opt, tcfg, 100), tcfg


def test_segments_are_the_stream_cut_into_consecutive_windows():
    width, stride = window_shape(DataConfig(seq_len=T, segment_windows=N))
    assert (width, stride) == (N * T + 1, N * T)
    stream = VOCAB.encode(EOR.join(REVIEWS) + EOR)
    rows = stream_rows(REVIEWS, VOCAB, width, stride)
    assert rows.shape == ((len(stream) - 1) // stride, width)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row, stream[i * stride : i * stride + width])
        windows = list(segment_windows(torch.as_tensor(row[None]), T))
        assert len(windows) == N
        # Window j+1's first input is window j's last target: together they are the segment, once each.
        for a, b in zip(windows, windows[1:]):
            assert a[0, -1] == b[0, 0]
        joined = torch.cat([windows[0][0]] + [wd[0, 1:] for wd in windows[1:]])
        np.testing.assert_array_equal(joined.numpy(), row)


def test_carried_state_equals_reading_the_concatenated_windows_in_one_pass():
    ids = segments()
    model, opt, sched, tcfg = model_and_optimizer(lr=0.0)  # lr 0: the same weights for every window
    with torch.no_grad():
        logits, final = model(ids[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        nll = nll.view(ids.shape[0], -1)
    state, carried, reset = None, [], []
    for window in segment_windows(ids, T):
        loss, n, state = train_step(model, opt, sched, window, state, tcfg, "full")
        carried.append(loss)
        assert n == ids.shape[0] * T and not state[0].requires_grad  # detached: truncated BPTT
        loss0, _, _ = train_step(model, opt, sched, window, None, tcfg, "full")
        reset.append(loss0)
    one_pass = [nll[:, j * T : (j + 1) * T].mean() for j in range(N)]
    torch.testing.assert_close(torch.stack(carried), torch.stack(one_pass), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[0], final[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1], final[1], rtol=1e-5, atol=1e-6)
    # The reference has power: restarting every window from zero reads differently after window 0.
    assert torch.allclose(reset[0], one_pass[0], rtol=1e-5, atol=1e-6)
    assert all(abs(float(r - o)) > 1e-3 for r, o in zip(reset[1:], one_pass[1:]))


def test_gradients_stop_at_the_window_boundary():
    """Truncated BPTT: window 1's loss must not reach window 0's inputs (its state is detached)."""
    ids = segments()
    model, opt, sched, tcfg = model_and_optimizer(lr=0.0)
    w0, w1 = list(segment_windows(ids, T))[:2]
    _, _, state = train_step(model, opt, sched, w0, None, tcfg, "full")
    emb = model.embed.weight
    used_by_w0_only = sorted(set(w0[:, :-1].flatten().tolist()) - set(w1[:, :-1].flatten().tolist()))
    loss, _, _ = train_step(model, opt, sched, w1, state, tcfg, "full")
    # After window 1's backward, embedding rows read only in window 0 got no gradient.
    assert used_by_w0_only and emb.grad is not None
    assert emb.grad[used_by_w0_only].abs().max() == 0


def _worker(world: int, batch: int, n: int) -> Worker:
    cfg = Config()
    cfg.train.batch_size, cfg.data.segment_windows = batch, n
    return Worker(cfg, VOCAB, 100, None, "reviews", 0, world, torch.device("cpu"))


def test_a_resume_position_is_exact_on_the_same_workers_and_a_whole_share_on_others():
    w2 = _worker(world=2, batch=8, n=4)
    saved = Position(step=52, epoch=1, steps_in_epoch=12).to_dict(w2)
    assert saved["windows_in_epoch"] == 12 * 8 * 2
    assert Position.from_checkpoint(52, 1, saved, w2) == Position(52, 1, 12)
    # One worker: the same 192 windows are 24 steps of 8; 24 is a whole number of 4-window segments.
    assert Position.from_checkpoint(52, 1, saved, _worker(1, 8, 4)).steps_in_epoch == 24
    # Three workers: 192 / 24 = 8 steps, rounded down to whole segments (never into the middle of one).
    assert Position.from_checkpoint(52, 1, saved, _worker(3, 8, 4)).steps_in_epoch == 8
    assert Position.from_checkpoint(52, 1, saved, _worker(3, 8, 3)).steps_in_epoch == 6
    # Checkpoints written before segments recorded batches per worker.
    old = {"epoch": 1, "batch_in_epoch": 10, "world_size": 2}
    assert Position.from_checkpoint(52, 1, old, _worker(1, 8, 1)).steps_in_epoch == 20


def test_stateful_windows_need_full_mode():
    with pytest.raises(ValueError, match="segment_windows"):
        window_shape(DataConfig(window_mode="seed", segment_windows=4))
