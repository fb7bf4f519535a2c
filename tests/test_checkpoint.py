"""Checkpoints: identical logits after a round trip, exact resume of the optimizer, corrupt ones refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint

from raylstm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_training_state,
    read_meta,
    save_checkpoint,
)
from raylstm.config import Config, ConfigError
from raylstm.model import build_model
from raylstm.train_loop import loss_sum_and_count, make_optimizer, make_scheduler, restore
from raylstm.vocab import CharVocab

TEXT = "Great strings, they stay in tune for weeks.\nToo bright for my taste.\n"
VOCAB = CharVocab.from_counts({c: TEXT.count(c) for c in set(TEXT)})
IDS = torch.as_tensor(VOCAB.encode(TEXT * 3), dtype=torch.long).reshape(3, -1)


def make() -> tuple[Config, torch.nn.Module]:
    cfg = Config()
    cfg.model.vocab_size, cfg.model.embed_dim, cfg.model.hidden_size, cfg.model.dropout = (
        len(VOCAB),
        8,
        16,
        0.0,
    )
    cfg.train.warmup_steps, cfg.train.max_steps = 2, 10
    torch.manual_seed(1)
    return cfg, build_model(cfg.model)


def steps(model, opt, sched, n):
    for _ in range(n):
        s, c = loss_sum_and_count(model, IDS, "full")
        opt.zero_grad()
        (s / c).backward()
        opt.step()
        sched.step()


def test_round_trip_gives_identical_logits_and_exact_resume(tmp_path: Path):
    cfg, model = make()
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train, 10)
    steps(model, opt, sched, 3)
    path = save_checkpoint(
        tmp_path / "c",
        model,
        VOCAB,
        cfg,
        step=3,
        epoch=0,
        metrics={"val_bpc": 2.5},
        optimizer=opt,
        scheduler=sched,
        data_position={"batch_in_epoch": 3},
    )
    loaded = load_checkpoint(path)
    model.eval()
    torch.testing.assert_close(loaded.model(IDS)[0], model(IDS)[0], rtol=0, atol=0)
    assert (loaded.step, loaded.metrics["val_bpc"], loaded.data_position) == (3, 2.5, {"batch_in_epoch": 3})

    # Resuming (weights + optimizer + scheduler) and training on equals never having stopped.
    model.train()
    steps(model, opt, sched, 4)
    resumed = loaded.model.train()
    opt2 = make_optimizer(resumed, cfg.train)
    sched2 = make_scheduler(opt2, cfg.train, 10)
    state = load_training_state(path)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    steps(resumed, opt2, sched2, 4)
    for (k, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    cfg, model = make()
    opt = make_optimizer(model, cfg.train)
    return save_checkpoint(
        tmp_path / "c", model, VOCAB, cfg, step=1, optimizer=opt, scheduler=make_scheduler(opt, cfg.train, 10)
    )


def test_a_flipped_byte_in_the_weights_is_refused(ckpt: Path):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*checksum"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "vocab.json"])
def test_a_deleted_file_is_refused_by_name(ckpt: Path, name: str):
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ".*missing"):
        read_meta(ckpt)


def test_missing_or_corrupt_meta_is_refused(ckpt: Path):
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(ckpt)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


def test_a_checkpoint_from_an_older_version_loads_despite_removed_options(ckpt: Path):
    """A config.json that names an option this version no longer has (as checkpoints written before the
    serving rewrite name serve.batch_wait_timeout_s) still loads, with the same logits, and says what it
    ignored; a field that exists keeps being read."""
    want = load_checkpoint(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["serve"]["batch_wait_timeout_s"] = 0.01
    meta["config"]["train"]["lr"] = 0.125
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"serve\.batch_wait_timeout_s"):
        got = load_checkpoint(ckpt)
    assert got.config.train.lr == 0.125
    with torch.no_grad():
        assert torch.equal(got.model(IDS)[0], want.model(IDS)[0])
    with pytest.raises(ConfigError, match="batch_wait_timeout_s"):  # a user's config stays strict
        Config.from_dict(meta["config"])


def test_restore_loads_weights_optimizer_and_schedule_and_refuses_another_vocabulary(tmp_path: Path):
    cfg, model = make()
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train, 10)
    steps(model, opt, sched, 3)
    path = save_checkpoint(tmp_path / "c", model, VOCAB, cfg, step=3, optimizer=opt, scheduler=sched)

    # Fresh objects (another init): restore must overwrite every piece of state, not just the counters.
    torch.manual_seed(99)
    fresh = build_model(cfg.model)
    opt2 = make_optimizer(fresh, cfg.train)
    sched2 = make_scheduler(opt2, cfg.train, 10)
    other = CharVocab([*VOCAB.chars, "Z"])
    with pytest.raises(CheckpointError, match="different vocabulary"):
        restore(Checkpoint.from_directory(str(path)), other, fresh, opt2, sched2)
    loaded = restore(Checkpoint.from_directory(str(path)), VOCAB, fresh, opt2, sched2)
    assert loaded.step == 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for (i, a), (_, b) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{i}.{name}")
    assert sched2.last_epoch == sched.last_epoch == 3
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
