"""The warmup + cosine learning-rate schedule: a pure function, and the LambdaLR built on it resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from raylstm.config import TrainConfig
from raylstm.train_loop import lr_multiplier, make_optimizer, make_scheduler


def test_warmup_is_linear_up_to_the_peak():
    got = [lr_multiplier(i, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for i in range(5)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_decays_monotonically_to_the_floor_and_stays_there():
    w, total, floor = 10, 110, 0.1
    after = [lr_multiplier(i, w, total, floor) for i in range(w, total + 50)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_multiplier(w + 50, w, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)  # half-way
    assert lr_multiplier(total, w, total, floor) == pytest.approx(floor)
    assert lr_multiplier(total + 1000, w, total, floor) == pytest.approx(floor)


def test_no_warmup_starts_at_full_lr():
    assert lr_multiplier(0, 0, 100, 0.0) == pytest.approx(1.0)
    assert lr_multiplier(100, 0, 100, 0.0) == pytest.approx(0.0)


def _run(opt, sched, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_follows_the_pure_function_and_resumes_from_its_state():
    tcfg = TrainConfig(lr=1e-2, warmup_steps=3, max_steps=12, min_lr_ratio=0.2)
    model = torch.nn.Linear(3, 3)
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, total_steps=12)
    lrs = _run(opt, sched, 6)
    assert lrs == pytest.approx([1e-2 * lr_multiplier(i, 3, 12, 0.2) for i in range(6)])

    # A fresh optimizer + scheduler restored from the saved state continue exactly where it stopped.
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    opt2 = make_optimizer(model, tcfg)
    sched2 = make_scheduler(opt2, tcfg, total_steps=12)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert _run(opt2, sched2, 6) == pytest.approx([1e-2 * lr_multiplier(i, 3, 12, 0.2) for i in range(6, 12)])


def test_weight_decay_applies_to_matrices_only_and_seed_uses_rmsprop():
    model = torch.nn.LSTM(4, 4)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.05))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="rmsprop")), torch.optim.RMSprop)
    assert not math.isnan(opt.param_groups[0]["lr"])
