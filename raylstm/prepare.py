"""`raylstm prepare SOURCE... --out DIR`: clean, dedupe and split once; train many times.

    DIR/train/part-*.parquet  DIR/val/...  DIR/test/...          rows {text, key, rating, verified,
                                                                   category, source}, in hash order
    DIR/vocab.json                                               CharVocab of the train split
    DIR/manifest.json    rows and chars per split, rows skipped per reason, each source file with size
                         and sha256, and the data config that made it (written last: marks completion)

`load_splits` recognises DIR by its manifest.json and reads it back without re-cleaning. DIR may be a local
path or an s3:// URI.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.fs as pafs

from raylstm import storage
from raylstm.config import DataConfig
from raylstm.data import DEMO_CORPUS, SPLITS, WORK_DIR, build_splits, is_prepared_dir

MANIFEST_VERSION = 1


class OutputDirError(FileExistsError, ValueError):
    """--out names something prepare must not overwrite (a ValueError too: the CLI prints it plainly)."""


def _clear_previous(fs: pafs.FileSystem, root: str, out_dir: str) -> None:
    """Reuse an output dir only if it is empty or an earlier `prepare` output (never a stranger's dir)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise OutputDirError(f"--out {out_dir} exists and is not a directory")
    entries = fs.get_file_info(pafs.FileSelector(root))
    if not entries:
        return
    names = {e.base_name for e in entries}
    if not names <= {*SPLITS, WORK_DIR, "vocab.json", "manifest.json"} or not names & {
        "manifest.json",
        WORK_DIR,
    }:
        raise OutputDirError(
            f"--out {out_dir} is not empty and not an earlier prepare output; choose a new directory"
        )
    if "manifest.json" in names:
        fs.delete_file(f"{root}/manifest.json")  # first, so a half-rewritten dir never looks complete
    for e in entries:
        if e.base_name in SPLITS or e.base_name == WORK_DIR:
            fs.delete_dir(e.path)
        elif e.base_name == "vocab.json":
            fs.delete_file(e.path)


def prepare(data_cfg: DataConfig, out_dir: str | Path, override_num_blocks: int | None = None) -> dict:
    """Read, clean, dedupe and split `data_cfg.sources` into `out_dir`; returns the manifest."""
    from raylstm.ray_env import ensure_ray

    ensure_ray()
    out_dir = str(out_dir)
    if data_cfg.sources and is_prepared_dir(list(data_cfg.sources)):
        raise ValueError(f"{data_cfg.sources[0]} is already a prepared directory; train on it directly")
    t0 = time.perf_counter()
    fs, root = storage.resolve(out_dir)
    _clear_previous(fs, root, out_dir)
    fs.create_dir(root, recursive=True)
    sources = list(data_cfg.sources) or [str(DEMO_CORPUS)]
    built, vocab = build_splits(data_cfg, sources, out_dir, override_num_blocks)
    manifest = dict(built)
    manifest["version"] = MANIFEST_VERSION
    manifest["files"] = [{**f, "sha256": storage.sha256(f["path"])} for f in manifest["files"]]
    manifest["vocab_fingerprint"] = vocab.fingerprint()
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    # Whole-file atomic writes (a local temp file renamed; an object PUT): a reader never sees half a
    # vocab.json, and manifest.json, last, appears only once everything it describes is in place.
    storage.write_text(storage.join(out_dir, "vocab.json"), vocab.to_json())
    storage.write_json(storage.join(out_dir, "manifest.json"), manifest)
    return manifest
