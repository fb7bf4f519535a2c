"""`raylstm prepare`: Parquet shards + vocab.json + manifest.json, read back without re-cleaning."""

from __future__ import annotations

import hashlib
import json

import pytest

from raylstm.cli import main
from raylstm.config import DataConfig
from raylstm.data import DEMO_CORPUS, load_splits
from raylstm.prepare import prepare
from raylstm.vocab import CharVocab


def texts(ds) -> list[str]:
    return sorted(r["text"] for r in ds.take_all())


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "demo"
    cfg = DataConfig(min_char_count=2)
    return cfg, out, prepare(cfg, out)


def test_prepare_writes_shards_vocab_manifest(prepared):
    cfg, out, manifest = prepared
    assert (out / "vocab.json").is_file() and (out / "manifest.json").is_file()
    for split in ("train", "val", "test"):
        assert list((out / split).glob("*.parquet")), split
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    (f,) = on_disk["files"]
    assert f["sha256"] == hashlib.sha256(DEMO_CORPUS.read_bytes()).hexdigest()
    assert f["size"] == DEMO_CORPUS.stat().st_size and f["records"] == on_disk["rows"]["records"]
    assert on_disk["config"]["min_char_count"] == 2
    assert set(on_disk["splits"]) == {"train", "val", "test"}
    assert sum(v["rows"] for v in on_disk["splits"].values()) == on_disk["rows"]["kept"]


def test_prepared_dir_reads_back_identically(prepared):
    cfg, out, manifest = prepared
    fresh = load_splits(cfg)
    back = load_splits(DataConfig(sources=[str(out)]))
    assert back.vocab == fresh.vocab == CharVocab.load(out / "vocab.json")
    assert back.manifest["splits"] == fresh.manifest["splits"]
    for split in ("train", "val", "test"):
        assert texts(getattr(back, split)) == texts(getattr(fresh, split))


def test_prepare_refuses_foreign_dir_and_rewrites_its_own(ray_session, tmp_path, prepared):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(DataConfig(), foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["prepare", "--out", str(foreign)]) == 2  # a plain message from the CLI, no traceback
    with pytest.raises(ValueError, match="already a prepared directory"):
        prepare(DataConfig(sources=[str(prepared[1])]), tmp_path / "again")


def test_cli_prepare_and_strict_error(ray_session, tmp_path, capsys):
    src = tmp_path / "r.json"
    src.write_text(
        '{"reviewerID": "A", "asin": "B", "reviewText": "' + "a fine product, " * 5 + '"}\n{oops\n'
    )
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["skipped"] == {"invalid_json": 1}
        and printed["splits"]["train"]["rows"]
        + printed["splits"]["val"]["rows"]
        + printed["splits"]["test"]["rows"]
        == 1
    )
    # strict: exit code 2 and a message naming the file and line, no traceback
    assert main(["prepare", str(src), "--out", str(tmp_path / "out2"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "r.json: line 2: invalid_json" in err
    # the same run twice into its own output dir works (rewrites it)
    assert main(["prepare", str(src), "--out", str(out)]) == 0


CAPPED_PREPARE = """
import json, sys
import ray
from raylstm.config import DataConfig
from raylstm.prepare import prepare
ray.init(address="local", num_cpus=2, object_store_memory=int(sys.argv[3]), include_dashboard=False,
         logging_level="ERROR", log_to_driver=False)
print("MANIFEST " + json.dumps(prepare(DataConfig(sources=[sys.argv[1]]), sys.argv[2])))
"""


def _shard_digests(out) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*.parquet"))
    }


@pytest.mark.slow
def test_prepare_under_capped_object_store_matches_uncapped(ray_session, tmp_path, amazon_dir):
    """A corpus 1.5x the object store (3x or more Ray Data's share of it) prepares under that cap (its own
    Ray, in a subprocess) to the same manifest and byte-identical shards as in the session's larger
    store: the corpus never has to fit."""
    import os
    import subprocess
    import sys

    from raylstm.synth import generate

    cap = 80 * 1024**2  # Ray's minimum is 75 MiB
    corpus = tmp_path / "corpus"
    made = generate(
        corpus, 3 * cap // 2, [str(amazon_dir / "Musical_instruments_reviews.csv.gz")], shards=6, seed=3
    )
    assert made["text_bytes"] > 1.4 * cap  # its text alone cannot all sit in the store at once
    free = prepare(DataConfig(sources=[str(corpus)]), tmp_path / "free")
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED_PREPARE, str(corpus), str(tmp_path / "capped"), str(cap)],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    capped = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("MANIFEST "))[9:])
    assert free["rows"]["kept"] > 150_000 and free["rows"]["kept"] == free["rows"]["cleaned"]
    # all but the timings and the size of the work files (pass 1's batches follow Ray Data's block split)
    same = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "work_bytes", "phase_seconds")}  # noqa: E731
    assert same(capped) == same(json.loads(json.dumps(free)))
    assert _shard_digests(tmp_path / "capped") == _shard_digests(tmp_path / "free")


def test_pass1_spills_each_read_block_in_the_read_task(ray_session, tmp_path, monkeypatch):
    """With at least as many files as CPUs, pass 1 runs in the read task, one spill file per parsed block
    of SPILL_BATCH_ROWS rows (not per Ray Data block, which a read coalesces or splits as it likes), and
    the block size changes nothing but the work files."""
    import ray

    from raylstm import data

    n_files = int(ray.cluster_resources()["CPU"])
    per_file = 250
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(n_files):
        lines = [
            json.dumps(
                {"reviewerID": f"U{f}-{i}", "asin": "B", "reviewText": f"review {f}-{i}: " + "fine. " * 5}
            )
            for i in range(per_file)
        ]
        (corpus / f"part-{f}.json").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(sources=[str(corpus)])
    whole = prepare(cfg, tmp_path / "whole")
    monkeypatch.setattr(data, "SPILL_BATCH_ROWS", 100)
    small = prepare(cfg, tmp_path / "small")
    assert whole["rows"]["kept"] == n_files * per_file
    assert whole["work_files"] == n_files  # one block per file
    assert small["work_files"] == n_files * 3  # 100 + 100 + 50 rows per file
    timing = ("seconds", "work_bytes", "work_files", "phase_seconds")
    assert {k: v for k, v in small.items() if k not in timing} == {
        k: v for k, v in whole.items() if k not in timing
    }
    assert _shard_digests(tmp_path / "small") == _shard_digests(tmp_path / "whole")
