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


@pytest.fixture(scope="module")
def windows(ray_session):
    return make_windows(review_sources())


@pytest.mark.slow
def test_two_workers_learn_review_text(windows, tmp_path: Path):
    cfg = tiny_config(max_steps=200, eval_every=50)
    result = fit_windows(cfg, windows.vocab, windows.train, windows.val, storage=str(tmp_path), name="learn")
    run = Path(result.run_dir)
    rows = read_metrics(run)
    evals = [r for r in rows if r.get("val_bpc") is not None]
    assert [r["step"] for r in evals] == [50, 100, 150, 200]

    # Learned: far below what a model of character frequencies alone can do on the same text.
    best = min(r["val_bpc"] for r in evals)
    print(f"val bpc {best:.3f} vs unigram entropy {windows.unigram_bits:.3f}")
    assert best < windows.unigram_bits - 1.0, (best, windows.unigram_bits)
    assert evals[-1]["val_bpc"] < evals[0]["val_bpc"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0

    # Validation covers the whole val set once, whatever the worker count (strided, then all-reduced).
    assert all(r["val_count"] == windows.n_val * 64 for r in evals)
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
