"""DDP equivalence: one step of 2 workers at batch B gives the weights of 1 worker at batch 2B.

Both runs see the same 2B windows (the train set is exactly 2B windows: one worker takes them all in one
batch, two workers take B each), start from the same seeded init and have no dropout. DDP averages the two
mean gradients, which equals the mean gradient of the 2B batch. Tolerance: |dw| <= 1e-5 absolute for
every weight (1% of the step), against a step that moves weights by ~lr = 1e-3: AdamW's first update is
lr * g / (|g| + 1e-8), so weights whose gradient is ~1e-8 can differ by a fraction of lr through float
summation order alone (measured: 1.2e-6), while a sharding bug (a worker seeing other windows, or gradients
not averaged) moves many weights by ~lr, 100x past the tolerance.
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

B = 8


@pytest.fixture(scope="module")
def windows(ray_session):
    return make_windows(review_sources())


def one_step(
    windows, workers: int, batch: int, storage: Path, name: str
) -> tuple[dict[str, torch.Tensor], dict]:
    rows = windows.train.take(2 * B)
    train = ray.data.from_items([{"ids": np.asarray(r["ids"], np.int32)} for r in rows])
    val = ray.data.from_items([{"ids": np.asarray(r["ids"], np.int32)} for r in windows.val.take(8)])
    cfg = tiny_config(
        num_workers=workers,
        batch_size=batch,
        max_steps=1,
        eval_every=1,
        warmup_steps=0,
        lr=1e-3,
        sample_chars=0,
        grad_clip=1.0,
    )
    result = fit_windows(cfg, windows.vocab, train, val, storage=str(storage), name=name)
    return load_file(str(Path(result.best_checkpoint) / "model.safetensors")), result.best_metrics


@pytest.mark.slow
def test_two_workers_at_b_equal_one_worker_at_2b(windows, tmp_path: Path):
    one, m1 = one_step(windows, workers=1, batch=2 * B, storage=tmp_path, name="one")
    two, m2 = one_step(windows, workers=2, batch=B, storage=tmp_path, name="two")
    cfg = tiny_config()
    cfg.model.vocab_size = len(windows.vocab)
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in init)
    assert moved > 5e-4  # the step really moved the weights (~lr)
    for k in one:
        diff = (one[k] - two[k]).abs().max().item()
        assert diff <= 1e-5, f"{k}: 2x{B} DDP and 1x{2 * B} differ by {diff:.2e}"

    # Validation is over the whole val set on both (each worker evaluates its stride, sums all-reduced):
    # same windows counted, same loss from the same weights.
    assert m1["val_count"] == m2["val_count"] == 8 * 64
    assert m2["val_bpc"] == pytest.approx(m1["val_bpc"], rel=1e-5)
