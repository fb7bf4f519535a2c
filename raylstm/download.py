"""`raylstm download CATEGORY`: fetch one McAuley-Lab Amazon Reviews 2023 category file, resumably.

The files are large (hundreds of MB to tens of GB), so an interrupted download resumes from the bytes
already on disk with an HTTP Range request, and the result can be checked against a known sha256. The
file is written as `<name>.part` and renamed only when complete (and verified), so a finished-looking file
is never half a file. A `<name>.sha256` sidecar records the digest of what was downloaded.

HTTP through the standard library (urllib); the file hash is `storage.sha256`, the one raylstm uses.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from raylstm import storage

# The 2023 release's raw review files, one per category: <base>/<Category>.jsonl.gz
# (https://amazon-reviews-2023.github.io/). Override with --url, or the base with RAYLSTM_DOWNLOAD_BASE.
DEFAULT_BASE_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/review_categories"
CHUNK = 1 << 20


class DownloadError(ValueError):
    """A download that cannot complete: HTTP error, unreachable host, short read, checksum mismatch."""


def category_url(category: str, base_url: str | None = None) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+", category):
        raise DownloadError(f"category {category!r}: expected a name like Musical_Instruments or All_Beauty")
    base = (base_url or os.environ.get("RAYLSTM_DOWNLOAD_BASE") or DEFAULT_BASE_URL).rstrip("/")
    return f"{base}/{category}.jsonl.gz"


def _open(url: str, start: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": "raylstm-download/1"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            return e  # range past the end: the partial file may already be complete
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: cannot connect: {getattr(e, 'reason', e)}") from e


def download(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` if present; verify `sha256` when given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    want = sha256.lower() if sha256 else None
    if dest.exists():
        if want is None or storage.sha256(dest) == want:
            return dest
        raise DownloadError(f"{dest} exists but its sha256 is not {want}; move it away to download again")
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    resp = _open(url, start, timeout)
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        if status == 416:
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            if total is None or total != start:
                raise DownloadError(f"{url}: server refused to resume at byte {start} (HTTP 416)")
        else:
            if start and status != 206:
                start = 0  # the server ignored the Range header and sends the whole file: start over
            length = resp.headers.get("Content-Length")
            expected = start + int(length) if length is not None else None
            with part.open("ab" if start else "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
            got = part.stat().st_size
            if expected is not None and got != expected:
                raise DownloadError(
                    f"{url}: connection closed at {got} of {expected} bytes; "
                    "run the same command again to resume"
                )
    digest = storage.sha256(part)
    if want is not None and digest != want:
        part.unlink()
        raise DownloadError(
            f"{url}: sha256 mismatch: expected {want}, got {digest}; the download was removed"
        )
    part.rename(dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    return dest


def _total_from_content_range(value: str | None) -> int | None:
    m = re.fullmatch(r"bytes \*/(\d+)", (value or "").strip())
    return int(m.group(1)) if m else None


def download_category(
    category: str,
    out_dir: str | Path,
    url: str | None = None,
    sha256: str | None = None,
    base_url: str | None = None,
) -> Path:
    """Fetch one Amazon Reviews 2023 category (`Musical_Instruments`, `All_Beauty`, ...) into `out_dir`.

    `url` replaces the category URL entirely; the file keeps the URL's file name.
    """
    url = url or category_url(category, base_url)
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or f"{category}.jsonl.gz"
    return download(url, Path(out_dir) / name, sha256=sha256)
