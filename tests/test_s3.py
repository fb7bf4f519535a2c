"""Object storage against a real S3-protocol server (moto's server mode on 127.0.0.1).

Fast tests here exercise raylstm.storage and the claim it rests on (pyarrow honours AWS_ENDPOINT_URL).
The end-to-end test (Ray Data reads shards from S3, Ray Train writes checkpoints to S3, Ray Serve serves the
best one from S3) runs the real CLI in subprocesses, each with its own local Ray that inherits the S3
environment: the session Ray of the other tests was started without it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
from moto_s3 import exported_s3_server

from raylstm import storage

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "raylstm-test"


@pytest.fixture(scope="module")
def s3env():
    """The moto server's env, also exported into this process for the storage tests."""
    with exported_s3_server(BUCKET) as env:
        yield env


def _tiny_checkpoint(tmp: Path, step: int, val_bpc: float) -> Path:
    from raylstm.checkpoint import save_checkpoint
    from raylstm.config import Config
    from raylstm.model import build_model
    from raylstm.vocab import CharVocab

    cfg = Config()
    vocab = CharVocab("abcdefgh ")
    cfg.model.vocab_size = len(vocab)
    cfg.model.hidden_size, cfg.model.embed_dim, cfg.model.num_layers = 8, 4, 1
    model = build_model(cfg.model)
    return save_checkpoint(
        tmp / f"checkpoint_{step:06d}", model, vocab, cfg, step=step, metrics={"val_bpc": val_bpc}
    )


def test_pyarrow_honours_aws_endpoint_url(s3env):
    # The reason storage.py needs no endpoint option: from_uri reads AWS_ENDPOINT_URL itself, and the
    # endpoint travels with the pickled filesystem (what Ray ships to read tasks).
    import pickle

    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/probe.txt")
    with fs.open_output_stream(path) as f:
        f.write(b"through moto")
    clone = pickle.loads(pickle.dumps(fs))
    with clone.open_input_stream(path) as f:
        assert f.read() == b"through moto"
    import boto3

    body = boto3.client("s3", endpoint_url=s3env["AWS_ENDPOINT_URL"]).get_object(
        Bucket=BUCKET, Key="probe.txt"
    )
    assert body["Body"].read() == b"through moto"


def test_json_round_trip_and_listing(s3env):
    run = f"s3://{BUCKET}/runs/roundtrip"
    assert not storage.exists(storage.join(run, "best.json"))
    storage.write_json(
        storage.join(run, "best.json"), {"checkpoint": "checkpoint_000010", "metrics": {"val_bpc": 2.5}}
    )
    storage.write_text(storage.join(run, "notes.txt"), "héllo")
    assert storage.read_json(storage.join(run, "best.json"))["metrics"]["val_bpc"] == 2.5
    assert storage.read_text(storage.join(run, "notes.txt")) == "héllo"
    assert storage.list_dir(run) == ["best.json", "notes.txt"]
    # Overwrite replaces (best.json is rewritten as training improves).
    storage.write_json(storage.join(run, "best.json"), {"checkpoint": "checkpoint_000020"})
    assert storage.read_json(storage.join(run, "best.json")) == {"checkpoint": "checkpoint_000020"}


def test_missing_and_bad_objects_name_the_uri(s3env):
    missing = f"s3://{BUCKET}/runs/nope/best.json"
    with pytest.raises(FileNotFoundError, match="runs/nope/best.json"):
        storage.read_json(missing)
    storage.write_text(f"s3://{BUCKET}/runs/bad/best.json", "{not json")
    with pytest.raises(storage.StorageError, match="runs/bad/best.json"):
        storage.read_json(f"s3://{BUCKET}/runs/bad/best.json")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        storage.localize_checkpoint(f"s3://{BUCKET}/runs/empty", cache=Path("/nonexistent-never-used"))


def test_upload_then_localize_best_checkpoint(s3env, tmp_path):
    from raylstm.checkpoint import load_checkpoint

    local_run = tmp_path / "run"
    _tiny_checkpoint(local_run, 10, 3.0)
    best_local = _tiny_checkpoint(local_run, 20, 2.0)
    run = f"s3://{BUCKET}/runs/upload"
    storage.upload_dir(local_run, run)
    storage.write_json(
        storage.join(run, "best.json"), {"checkpoint": best_local.name, "metrics": {"val_bpc": 2.0}}
    )

    cache = tmp_path / "cache"
    local = storage.localize_checkpoint(run, cache=cache)
    assert local.is_relative_to(cache) and local.name.endswith("checkpoint_000020")
    loaded = load_checkpoint(local)  # verifies every file's sha256 after the copy
    assert loaded.step == 20 and loaded.metrics["val_bpc"] == 2.0
    # A second call reuses the cached copy (no download): prove it by deleting the object store copy.
    for name in storage.list_dir(storage.join(run, best_local.name)):
        pafs.FileSystem.from_uri(storage.join(run, best_local.name, name))[0].delete_file(
            f"{BUCKET}/runs/upload/{best_local.name}/{name}"
        )
    assert storage.localize_checkpoint(run, cache=cache) == local
    # A full URI in best.json works too (what a run written elsewhere may record).
    storage.write_json(storage.join(run, "best.json"), {"checkpoint": f"{run}/checkpoint_000010"})
    assert load_checkpoint(storage.localize_checkpoint(run, cache=cache)).step == 10


def test_local_paths_pass_through(tmp_path):
    ck = _tiny_checkpoint(tmp_path, 1, 4.0)
    assert storage.localize_checkpoint(str(ck)) == ck
    assert storage.to_uri(pafs.LocalFileSystem(), str(ck)) == str(ck)
    assert (
        storage.to_uri(pafs.S3FileSystem(anonymous=True, region="us-east-1"), "bkt/runs/x")
        == "s3://bkt/runs/x"
    )
    assert storage.join("s3://b/runs/", "/x/", "best.json") == "s3://b/runs/x/best.json"
    assert (
        storage.is_remote("s3://b/k")
        and not storage.is_remote("file:///tmp/x")
        and not storage.is_remote("/tmp")
    )


def test_train_keeps_an_s3_run_on_s3(tmp_path, monkeypatch):
    # Ray Train gets the bucket URI itself (checkpoints go straight there); the driver's small files go to a
    # local mirror under the cache, copied up as they change.
    from raylstm import train

    monkeypatch.setenv("RAYLSTM_CACHE", str(tmp_path))
    storage_path, run_dir = train.resolve_storage("s3://bkt/runs/", "x")
    assert storage_path == "s3://bkt/runs" and run_dir.is_dir() and run_dir.is_relative_to(tmp_path)
    assert train.run_uri(storage_path, "x") == "s3://bkt/runs/x"
    assert train.run_uri(str(tmp_path / "runs"), "x") is None
