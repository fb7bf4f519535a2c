"""Training end to end on a real local Ray: review text is learned (val bpc far below the unigram entropy)
with 2 workers, validation is over the whole val set, and the run dir holds best.json, metrics, a
learning curve and samples. Presets load with the values they promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_support import ROOT, make_windows, review_sources, tiny_config

from raylstm.checkpoint import load_checkpoint, resolve_checkpoint
from raylstm.config import load_config
from raylstm.train import fit_windows, read_metrics


@pytest.mark.slow
def test_two_workers_learn_review_text(learned_run):
    """The session's learned run (conftest): 2 workers, 200 steps of tiny_config, evaluated every 50."""
    windows, result, run = learned_run.windows, learned_run.result, learned_run.run
    rows = read_metrics(run)
    evals = [r for r in rows if r.get("val_bpc") is not None]
    assert [r["step"] for r in evals] == [50, 100, 150, 200]

    # Learned: far below what a model of character frequencies alone can do on the same text.
    best = min(r["val_bpc"] for r in evals)
    print(f"val bpc {best:.3f} vs unigram entropy {windows.unigram_bits:.3f}")
    assert best < windows.unigram_bits - 1.0, (best, windows.unigram_bits)
    assert evals[-1]["val_bpc"] < evals[0]["val_bpc"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0

    # Validation scores every char of every val review once (each review whole, strided over workers,
    # then all-reduced), whatever the worker count.
    assert all(r["val_count"] == windows.n_val_chars for r in evals)
    assert rows[-1]["world_size"] == 2
    assert rows[-1]["chars_per_s_total"] > rows[-1]["chars_per_s"]

    # best.json names the kept checkpoint with the lowest val bpc; it loads and matches its metrics.
    best_json = json.loads((run / "best.json").read_text())
    assert best_json["metrics"]["val_bpc"] == pytest.approx(best)
    ckpt = load_checkpoint(resolve_checkpoint(run))
    assert ckpt.metrics["val_bpc"] == pytest.approx(best) and ckpt.step in (150, 200)
    assert Path(result.best_checkpoint) == ckpt.path

    assert (run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run / "samples.txt").read_text()
    assert all(f"temperature {t}" in samples for t in ("0.2", "0.5", "1", "1.2"))
    logged = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in logged] == [50, 100, 150, 200]
    assert set(logged[-1]["samples"]) == {"0.2", "0.5", "1", "1.2"}
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == len(windows.vocab)


def test_presets_load_with_what_they_promise():
    seed = load_config(ROOT / "configs" / "seed.toml")
    assert (
        seed.model.kind,
        seed.model.embed_dim,
        seed.model.hidden_size,
        seed.model.seed_dense,
        seed.model.dropout,
    ) == ("seed", 128, 128, 256, 0.5)
    assert (seed.data.window_mode, seed.data.seed_context, seed.data.seed_step) == ("seed", 40, 3)
    assert seed.data.lowercase and seed.data.ascii_only and seed.train.optimizer == "rmsprop"
    assert seed.train.sample_prime == seed.train.sample_prime.lower()  # no unknown chars in its samples

    gpu = load_config(ROOT / "configs" / "amazon-gpu.toml")
    assert (gpu.model.num_layers, gpu.model.hidden_size, gpu.data.seq_len) == (3, 1024, 256)
    assert gpu.train.use_gpu and gpu.train.precision == "bf16" and gpu.train.num_workers > 1

    demo = load_config(ROOT / "configs" / "demo.toml", ["train.lr=1e-3", "model.hidden_size=64"])
    assert demo.train.num_workers == 2 and demo.train.cpus_per_worker < 1  # leaves Ray Data a CPU
    assert (demo.train.lr, demo.model.hidden_size) == (1e-3, 64)  # overrides win over the file


@pytest.mark.slow
def test_a_run_that_runs_out_of_epochs_before_max_steps_ends_on_a_checkpoint(ray_session, tmp_path: Path):
    """Streamed data (not counted up front): the loop only finds out that the epochs ran out when they do."""
    w = make_windows(review_sources(n_reviews=150), seq_len=32, segment_windows=4)
    cfg = tiny_config(seq_len=32, segment_windows=4, max_steps=10_000, eval_every=10_000, sample_chars=0)
    cfg.data.materialize, cfg.train.epochs = False, 2
    result = fit_windows(cfg, w.vocab, w.train, w.val, storage=str(tmp_path), name="ep")
    per_epoch = (w.n_train // 2) // 32 * 4  # equal split over 2 workers, whole batches, 4 windows each
    rows = read_metrics(result.run_dir)
    assert rows[-1]["step"] == 2 * per_epoch and rows[-1].get("checkpoint") and rows[-1]["val_bpc"] > 0
    ckpt = load_checkpoint(result.best_checkpoint)
    # Its position is "both epochs read": a rerun of the same name has nothing left to train.
    assert ckpt.step == 2 * per_epoch and (ckpt.epoch, ckpt.data_position["steps_in_epoch"]) == (2, 0)
    # Rank 0 left its training shard's Ray Data stats (what bench/bench_stream.py reads the feed rate from)
    stats = (Path(result.run_dir) / "train_data_stats.txt").read_text()
    assert "MapBatches(_windows)" in stats and "iter_batches" in stats, stats[:2000]


@pytest.mark.slow
def test_a_diverged_loss_stops_the_run_at_once_naming_the_setting_to_change(ray_session, tmp_path: Path):
    """`raylstm train` on this session's Ray with a learning rate that explodes the loss: the first step
    over train.max_loss ends the run (max_failures=2 is not spent on it: one attempt, no retry) and the
    command exits 3 with the message and no traceback."""
    import os
    import subprocess
    import sys

    import ray

    sources = review_sources(n_reviews=150)
    cmd = [sys.executable, "-m", "raylstm.cli", "train", "--config", str(ROOT / "configs" / "demo.toml")]
    cmd += ["--data", *sources, "--storage", str(tmp_path), "--name", "boom"]
    cmd += ["--address", ray.get_runtime_context().gcs_address]
    for s in ("data.dedupe=false", "data.seq_len=32", "model.hidden_size=32", "train.lr=30.0",
              "train.warmup_steps=0", "train.grad_clip=0.0", "train.max_failures=2", "train.max_steps=200",
              "train.eval_every=100", "train.log_every=1"):  # fmt: skip
        cmd += ["--set", s]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "training diverged at step" in p.stderr and "train.lr" in p.stderr and "train.max_loss" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    rows = read_metrics(tmp_path / "boom")
    stop = [r for r in rows if r.get("diverged")]
    assert len(stop) == 1 and stop[0]["step"] < 100 and rows[-1] == stop[0]
    assert {r["pid"] for r in rows} == {stop[0]["pid"]} and {r["restored_from_step"] for r in rows} == {-1}
    assert not (tmp_path / "boom" / "best.json").exists()  # no checkpoint was written after it
    # where a diverged run's data time went is still written (raw sources: the windows map reads them)
    assert "iter_batches" in (tmp_path / "boom" / "train_data_stats.txt").read_text()


def test_in_loop_validation_shares_every_review_once_between_workers(tmp_path: Path):
    """train_loop.evaluate with 2 ranks (each its reviews of every batch; a 1-process group stands in for
    the all-reduce so each rank's share is seen alone): the shares add up to scoring every val review
    whole once (evaluate.score_reviews, the `raylstm evaluate` path), none twice, none skipped."""
    import math

    import numpy as np
    import torch
    import torch.distributed as dist

    from raylstm.config import ModelConfig
    from raylstm.evaluate import score_reviews
    from raylstm.model import build_model
    from raylstm.train_loop import evaluate
    from raylstm.vocab import CharVocab

    rng = np.random.default_rng(0)
    words = ["strings", "tuner", "sound", "great", "pedal", "cable", "the", "it", "works"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 30)))) for _ in range(23)]
    vocab = CharVocab(sorted(set("\n".join(texts) + "\n")))
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), embed_dim=8, hidden_size=16, num_layers=1))
    batches = [{"text": np.array(texts[i : i + 5], dtype=object)} for i in range(0, len(texts), 5)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shares = [
            evaluate(model, batches, "full", torch.device("cpu"), rank=r, world_size=2, vocab=vocab)
            for r in (0, 1)
        ]
    finally:
        dist.destroy_process_group()
    bits, chars, _ = score_reviews(model, vocab, texts)
    assert sum(n for _, n in shares) == chars and all(n > 0 for _, n in shares)
    assert sum(loss * n for loss, n in shares) / math.log(2) == pytest.approx(bits, rel=1e-5)


def test_materialize_is_refused_for_windows_the_object_store_cannot_hold():
    """data.materialize = true on a prepared corpus whose windows would take over half the object store
    streams instead, with the reason; a corpus that fits, or no manifest, keeps the setting."""
    from raylstm.data import window_bytes
    from raylstm.train import materialize_refusal

    cfg = tiny_config(seq_len=64)
    gib = 2**30
    # ~4 GB of text as bench_scale prepares it: 5% val, 5% test
    manifest = {
        "splits": {
            "train": {"rows": 6_450_000, "chars": 3_600_000_000},
            "val": {"rows": 360_000, "chars": 200_000_000},
        }
    }
    # full windows: an int32 id per character and per review's "\n", 65 ids every 64 (each window shares
    # its last id with the next)
    stream = 3_600_000_000 + 6_450_000
    assert window_bytes(cfg.data, manifest["splits"]["train"]) == pytest.approx(
        4 * stream * 65 / 64, rel=1e-6
    )
    why = materialize_refusal(cfg, manifest, store_bytes=1 * gib)
    assert "stream" in why and "object store (1.00 GiB)" in why
    small = {"splits": {"train": {"rows": 9_000, "chars": 5_000_000}, "val": {"rows": 500, "chars": 280_000}}}
    assert materialize_refusal(cfg, small, store_bytes=1 * gib) == ""
    assert materialize_refusal(cfg, None, store_bytes=1 * gib) == ""
    # seed windows overlap (41 ids every 3): the same text is ~14x the bytes, and conditions add 2 per field
    cfg.data.window_mode, cfg.data.segment_windows = "seed", 1
    assert window_bytes(cfg.data, small["splits"]["train"]) > 13 * window_bytes(
        tiny_config(seq_len=64).data, small["splits"]["train"]
    )
    assert materialize_refusal(cfg, small, store_bytes=200 * 2**20) != ""
