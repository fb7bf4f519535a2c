"""`raylstm download` against a real local HTTP server (no internet): resume, checksum, errors."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from raylstm.download import DownloadError, category_url, download, download_category

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB: several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    # Behaviour switches set per test on the server object.
    def do_GET(self):  # noqa: N802
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if not self.path.startswith("/files/"):
            self.send_error(404, "Not Found")
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng and srv.ranges else 0
        if start >= len(PAYLOAD) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            self.wfile.write(body[: srv.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.requests, srv.ranges, srv.cut_after = [], True, None
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv, name="Musical_Instruments.jsonl.gz"):
    return f"http://127.0.0.1:{srv.server_address[1]}/files/{name}"


def test_full_download_verified_with_sidecar(server, tmp_path):
    path = download_category("Musical_Instruments", tmp_path, url=url(server), sha256=SHA)
    assert path == tmp_path / "Musical_Instruments.jsonl.gz"
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "Musical_Instruments.jsonl.gz.sha256").read_text().split()[0] == SHA
    assert not (tmp_path / "Musical_Instruments.jsonl.gz.part").exists()
    # already there and verified: no second request
    n = len(server.requests)
    assert download_category("Musical_Instruments", tmp_path, url=url(server), sha256=SHA) == path
    assert len(server.requests) == n


def test_resume_from_half_written_file(server, tmp_path):
    half = len(PAYLOAD) // 2 + 17
    (tmp_path / "Musical_Instruments.jsonl.gz.part").write_bytes(PAYLOAD[:half])
    path = download_category("Musical_Instruments", tmp_path, url=url(server), sha256=SHA)
    assert server.requests[-1][1] == f"bytes={half}-"
    assert path.read_bytes() == PAYLOAD


def test_interrupted_then_resumed(server, tmp_path):
    server.cut_after = 300_000
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download(url(server), tmp_path / "f.gz", sha256=SHA)
    assert (tmp_path / "f.gz.part").stat().st_size == 300_000
    server.cut_after = None
    assert download(url(server), tmp_path / "f.gz", sha256=SHA).read_bytes() == PAYLOAD
    assert server.requests[-1][1] == "bytes=300000-"


def test_server_without_ranges_restarts_cleanly(server, tmp_path):
    server.ranges = False
    (tmp_path / "f.gz.part").write_bytes(b"garbage that is not the start of the file")
    assert download(url(server), tmp_path / "f.gz", sha256=SHA).read_bytes() == PAYLOAD


def test_complete_part_file_and_416(server, tmp_path):
    (tmp_path / "f.gz.part").write_bytes(PAYLOAD)
    assert download(url(server), tmp_path / "f.gz", sha256=SHA).read_bytes() == PAYLOAD


def test_checksum_mismatch_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(url(server), tmp_path / "f.gz", sha256="0" * 64)
    assert not (tmp_path / "f.gz").exists() and not (tmp_path / "f.gz.part").exists()


def test_http_errors_are_clear(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"http://127.0.0.1:{server.server_address[1]}/missing/x.gz", tmp_path / "x.gz")
    srv_port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(DownloadError, match="cannot connect"):
        download(f"http://127.0.0.1:{srv_port}/files/x.gz", tmp_path / "y.gz", timeout=5)


def test_category_url(monkeypatch):
    assert category_url("All_Beauty").endswith("/raw/review_categories/All_Beauty.jsonl.gz")
    assert category_url("Books", base_url="http://mirror/x/") == "http://mirror/x/Books.jsonl.gz"
    monkeypatch.setenv("RAYLSTM_DOWNLOAD_BASE", "http://env-mirror")
    assert category_url("Books") == "http://env-mirror/Books.jsonl.gz"
    with pytest.raises(DownloadError, match="expected a name like"):
        category_url("../etc/passwd")
