"""Object storage glue: one way to turn a path or URI (local, s3://, gs://, ...) into a pyarrow filesystem,
and the few small operations the rest of raylstm needs on it (read/write best.json, list a run, copy a
checkpoint directory down so `checkpoint.load_checkpoint` can verify and load it from local disk).

The S3 endpoint is NOT configured here: pyarrow's S3 filesystem (and boto3, and the aws CLI) read the
standard `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` environment variables themselves, so MinIO, moto or any
S3-protocol server works by exporting one variable (plus the usual AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION). Ray Train (`RunConfig(storage_path="s3://...")`) and Ray Data
(`read_parquet("s3://...")`) build their filesystems with the same `pyarrow.fs.FileSystem.from_uri`, so
they honour it too, in every process that has the variable: on a cluster, pass it to the job's runtime
environment (`ray job submit --runtime-env-json '{"env_vars": {...}}'`, see docs/cluster.md).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

# "s3://bucket/key", "gs://...", "file:///..." -- anything with a scheme; a Windows drive ("C:\") is not one.
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


class StorageError(OSError):
    """A storage path that cannot be resolved, read or written; the message names the URI."""


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` (s3://, gs://, file://), False for plain local paths."""
    return bool(_URI.match(str(path)))


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True when the path lives on object storage (anything with a scheme other than file://)."""
    return is_uri(path) and not str(path).startswith("file://")


def resolve(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths become absolute; URIs go through pyarrow's from_uri."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{path}: cannot open this storage URI ({e})") from e


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `resolve`: Ray Train reports checkpoint paths without a scheme plus a filesystem object;
    this turns them back into something a user (and best.json) can name, e.g. "s3://bucket/runs/x"."""
    if isinstance(fs, pafs.LocalFileSystem) or is_uri(path):
        return path
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path.lstrip('/')}"


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path segments with '/', keeping a URI a URI (os.path.join would be wrong on Windows and for
    absolute parts)."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


COMPRESSION_SUFFIXES = (".gz", ".gzip", ".bz2", ".zst", ".zstd", ".lz4", ".br")
_GLOB_CHARS = "*?["


def extension(path: str | os.PathLike[str]) -> str:
    """The lower-case extension under any compression suffix: "a/B.JSON.gz" -> ".json", "x.tsv" -> ".tsv"."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    for suf in COMPRESSION_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    return os.path.splitext(name)[1]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("_")


def _walk(fs: pafs.FileSystem, root: str, keep: Callable[[str], bool]) -> list[tuple[str, int]]:
    """Files under `root`, recursively, that `keep` accepts; hidden files and directories (".x", "_x")
    left out."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for i in infos:
        rel = i.path[len(root) :].lstrip("/")
        if i.type != pafs.FileType.File or any(_hidden(part) for part in rel.split("/")):
            continue
        if keep(i.path):
            files.append((i.path, i.size))
    return sorted(files)


def expand(
    source: str | os.PathLike[str], keep: Callable[[str], bool] = lambda p: True
) -> list[tuple[pafs.FileSystem, str, int]]:
    """(filesystem, path, size) of every file a source names: a file; a directory, walked recursively for
    files `keep` accepts; or a glob (local or on object storage; a matching directory is walked too).
    Sorted, for determinism. A missing file or directory raises FileNotFoundError; a glob may match none."""
    src = str(source)
    fs, path = resolve(src)
    found: list[tuple[str, int]] = []
    if any(ch in path for ch in _GLOB_CHARS):
        if isinstance(fs, pafs.LocalFileSystem):
            matches = sorted(globlib.glob(path, recursive=True))
        else:
            base = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            matches = sorted(i.path for i in infos if fnmatch.fnmatch(i.path, path))
        for m in matches:
            info = fs.get_file_info(m)
            if info.type == pafs.FileType.File:
                found.append((m, info.size))
            elif info.type == pafs.FileType.Directory:
                found.extend(_walk(fs, m, keep))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"review source not found: {src}")
        if info.type == pafs.FileType.Directory:
            found.extend(_walk(fs, path, keep))
        else:
            found.append((path, info.size))
    return [(fs, p, s) for p, s in found]


def sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's stored bytes (a .gz is hashed as stored, not gunzipped), streamed; local or URI.
    The one file hash of raylstm: checkpoints, prepare's manifest and downloads all use it."""
    fs, p = resolve(path)
    h = hashlib.sha256()
    try:
        # compression=None: pyarrow would otherwise gunzip .gz files ("detect") and hash the wrong bytes.
        with fs.open_input_stream(p, compression=None) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e
    return h.hexdigest()


def exists(path: str | os.PathLike[str]) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e
    except OSError as e:
        raise StorageError(f"{path}: cannot read ({e})") from e


def read_text(path: str | os.PathLike[str]) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike[str]) -> Any:
    raw = read_text(path)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"{path}: not valid JSON ({e})") from e


def write_bytes(path: str | os.PathLike[str], data: bytes) -> str:
    """Write a small file whole. Object stores replace an object atomically on PUT; for local paths we
    write a temporary sibling and rename it, so a reader (the server polling best.json) never sees half a
    file."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{Path(p).name}.", dir=Path(p).parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return p
    try:
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as e:
        raise StorageError(f"{path}: cannot write ({e})") from e
    return str(path)


def write_text(path: str | os.PathLike[str], text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> str:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def list_dir(path: str | os.PathLike[str]) -> list[str]:
    """Names (not paths) of the entries directly under `path`, sorted; [] when it does not exist."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos)


def upload_dir(local_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Copy a local directory tree to `dest` (a URI or local path)."""
    fs, p = resolve(dest)
    try:
        pafs.copy_files(
            str(Path(local_dir).resolve()),
            p,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    except OSError as e:
        raise StorageError(f"{dest}: cannot upload {local_dir} ({e})") from e
    return str(dest)


def download_dir(src: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> Path:
    """Copy the directory `src` (URI or local path) to `local_dir` and return it. Goes to a temporary sibling
    first and is renamed into place, so a half-copied checkpoint is never left where a loader looks."""
    fs, p = resolve(src)
    info = fs.get_file_info(p)
    # Object stores have no real directories: a prefix with objects under it reports NotFound or Directory.
    if info.type == pafs.FileType.File:
        raise StorageError(f"{src}: is a file, expected a directory")
    if not fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False)):
        raise FileNotFoundError(f"{src}: no such directory (or it is empty)")
    local_dir = Path(local_dir)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", dir=local_dir.parent))
    try:
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if local_dir.exists():
            shutil.rmtree(local_dir)
        os.replace(tmp, local_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return local_dir


def cache_dir() -> Path:
    """Where remote checkpoints are copied to: $RAYLSTM_CACHE, else ~/.cache/raylstm."""
    return Path(os.environ.get("RAYLSTM_CACHE") or Path.home() / ".cache" / "raylstm").expanduser()


def cache_key(uri: str) -> str:
    """A directory name for a URI: "s3://b/runs/x" -> "b_runs_x" (scheme dropped, separators flattened)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(uri).split("://", 1)[-1]).strip("_")


def best_checkpoint_uri(run_or_checkpoint: str) -> str:
    """For a remote run dir, the checkpoint its best.json names (as a URI); a checkpoint URI unchanged."""
    if exists(join(run_or_checkpoint, "meta.json")):
        return str(run_or_checkpoint)
    best = join(run_or_checkpoint, "best.json")
    if not exists(best):
        raise FileNotFoundError(
            f"{run_or_checkpoint}: neither a checkpoint (no meta.json) nor a run (no best.json)"
        )
    try:
        target = str(read_json(best)["checkpoint"])
    except (KeyError, TypeError) as e:
        raise StorageError(f"{best}: no 'checkpoint' entry ({e})") from e
    # best.json names the checkpoint relative to the run dir (portable: the run can be copied) or as a URI.
    if is_uri(target):
        return target
    if target.startswith("/"):
        raise StorageError(f"{best}: names a local path {target!r}, which does not exist on object storage")
    return join(run_or_checkpoint, target)


def localize_checkpoint(path: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """A local directory for `path`: local paths are returned as they are; a remote checkpoint, or a remote
    run dir (through its best.json), is copied into the cache once (keyed by its URI) and that copy returned.
    `checkpoint.load_checkpoint` then verifies every file's sha256, so a stale or broken copy is refused."""
    if not is_remote(path):
        return Path(str(path).removeprefix("file://"))
    uri = best_checkpoint_uri(str(path))
    dest = Path(cache or cache_dir()) / "checkpoints" / cache_key(uri)
    if not (dest / "meta.json").exists():
        download_dir(uri, dest)
    return dest
