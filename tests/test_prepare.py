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
