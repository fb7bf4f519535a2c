"""DDP equivalence: 3 steps of 2 workers at batch B give the weights of 1 worker at batch 2B, for plain SGD
and for AdamW, within 1e-5. The 1 x 2B side is an independent reference: the loop's own train_step in a
bare torch loop (no Ray, no DDP), so the DDP run is compared with what one process computes.

The train set is exactly 2B windows, so every step is one epoch: 1 worker takes all 2B in one batch, 2
workers take B each, whichever B the split hands to which worker. The model starts from the same seeded
init and has no dropout. DDP averages the two mean gradients, which equals the mean gradient of the 2B
batch; the only difference left is float summation order (measured: under 1e-6).

Why SGD: an SGD update is linear in the gradient, so a gradient-scale bug (summed instead of averaged
over workers, a loss divided by the wrong count) moves every weight by a multiple of lr * g. AdamW
normalises the gradient away (its first step is lr * g / |g|), so it is blind to a scale bug; it is
checked for what it does see: which windows each step averaged. Grad clipping is off for SGD (clipping
to a norm would also hide a scale), on for AdamW (clipping after DDP's all-reduce is part of the check).
Each test first asserts that the bug it guards against would move the weights 100x past the tolerance:
SGD with a doubled gradient (lr x 2, the same for SGD), and AdamW on one worker's half of the batch.
Checked by hand as well: multiplying the loss by the world size in train_step fails the SGD test at
~5e-3 (500x the tolerance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file
from train_support import make_windows, review_sources, tiny_config

from raylstm.model import build_model
from raylstm.train import fit_windows
from raylstm.train_loop import make_optimizer, make_scheduler, train_step

B = 8
STEPS = 3
TOL = 1e-5


@pytest.fixture(scope="module")
def windows(ray_session):
    w = make_windows(review_sources())
    rows = np.stack([np.asarray(r["ids"], np.int32) for r in w.train.take(2 * B)])
    return w, rows


def config(optimizer: str, workers: int, batch: int):
    return tiny_config(
        num_workers=workers,
        batch_size=batch,
        max_steps=STEPS,
        eval_every=STEPS,
        warmup_steps=0,
        optimizer=optimizer,
        lr=0.5 if optimizer == "sgd" else 1e-3,
        grad_clip=0.0 if optimizer == "sgd" else 1.0,
        sample_chars=0,
    )


def fit(windows, optimizer: str, workers: int, batch: int, storage: Path) -> dict[str, torch.Tensor]:
    w, rows = windows
    train = ray.data.from_items([{"ids": r} for r in rows])
    val = w.val.limit(8)
    cfg = config(optimizer, workers, batch)
    name = f"{optimizer}-{workers}x{batch}"
    result = fit_windows(cfg, w.vocab, train, val, storage=str(storage), name=name)
    assert result.best_metrics["step"] == STEPS
    return load_file(str(Path(result.best_checkpoint) / "model.safetensors"))


def reference(windows, optimizer: str, lr_scale: float = 1.0, rows: slice = slice(None)):
    """1 worker x 2B without Ray: the loop's own train_step on the whole batch, STEPS times."""
    w, all_rows = windows
    cfg = config(optimizer, 1, 2 * B)
    cfg.model.vocab_size = len(w.vocab)
    cfg.train.lr *= lr_scale
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train, STEPS)
    ids = torch.as_tensor(all_rows[rows], dtype=torch.long)
    for _ in range(STEPS):
        train_step(model, opt, sched, ids, None, cfg.train, "full")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    return max(((a[k] - b[k]).abs().max().item(), k) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_workers_at_b_equal_one_worker_at_2b_over_three_steps(windows, optimizer, tmp_path: Path):
    ref = reference(windows, optimizer)
    w, _ = windows
    cfg = config(optimizer, 1, 2 * B)
    cfg.model.vocab_size = len(w.vocab)
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    assert max_diff(ref, init)[0] > 100 * TOL  # the steps really moved the weights

    # The bug this test guards against would fail it by far (see the module docstring).
    bug = reference(windows, optimizer, lr_scale=2.0) if optimizer == "sgd" else None
    if bug is None:
        bug = reference(windows, optimizer, rows=slice(0, B))  # gradients of one worker, not averaged
    assert max_diff(ref, bug)[0] > 100 * TOL

    # One Ray fit per optimizer: a 1-worker fit through Ray would add ~30 s of Train start-up to CI and
    # nothing the bare reference does not already check (the same train_step on the same 2B windows).
    two = fit(windows, optimizer, workers=2, batch=B, storage=tmp_path)
    diff, key = max_diff(two, ref)
    assert diff <= TOL, f"{optimizer}: 2x{B} DDP differs from 1x{2 * B} by {diff:.2e} at {key}"
