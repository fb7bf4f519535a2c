"""The web page at / in a real headless Chromium, driven over the DevTools protocol (CDP).

Needs Debian's `chromium` at /usr/bin/chromium (`apt-get install -y chromium`) and the `websockets`
package (dev extra); skips with the reason when either is absent.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_serve_support import free_port, one_thread, run_dir

from raylstm.config import ServeConfig
from raylstm.serve import start_server

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1100,900",
    "--remote-debugging-port=0",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


class CDP:
    """A minimal DevTools-protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout_s: float = 60.0):
        """Poll expr until it is truthy. An exception counts as not yet (right after Page.navigate the new
        document may have no body for a moment); the last one is named if it never comes true."""
        deadline, error = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                v = self.eval(expr)
            except RuntimeError as e:  # the expression threw in the page (eval raises it as this)
                v, error = None, e
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expr}" + (f" (last error: {error})" if error else ""))


_CHROMIUM: dict = {}  # the session's one Chromium: {"cdp": CDP}


@pytest.fixture(scope="module")
def browser(tmp_path_factory, request):
    """The session's headless Chromium (test_serve_conditions imports this fixture too): started at its
    first use, stopped when pytest ends. Each test navigates its page to its own server first."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not installed at /usr/bin/chromium (apt-get install -y chromium)")
    pytest.importorskip("websockets", reason="the websockets package (dev extra) drives Chromium over CDP")
    if "cdp" not in _CHROMIUM:
        _CHROMIUM["cdp"] = _start_chromium(tmp_path_factory.mktemp("chromium-profile"), request.config)
    cdp = _CHROMIUM["cdp"]
    yield cdp
    cdp.call("Page.navigate", url="about:blank")  # idle until the next module: no page left running


def _start_chromium(profile: Path, config) -> CDP:
    proc = subprocess.Popen(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    cdp = None

    def stop() -> None:
        if cdp is not None:
            cdp.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)

    config.add_cleanup(stop)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.poll() is not None else ""
            pytest.fail(f"chromium did not start its DevTools endpoint: {err}")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
    page = next(p for p in pages if p["type"] == "page")
    cdp = CDP(page["webSocketDebuggerUrl"])
    return cdp


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    handle = start_server(run_dir(tmp_path_factory), ServeConfig(), port=free_port())
    yield handle
    handle.shutdown()


def test_page_streams_generated_text(server, browser, tmp_path):
    from PIL import Image

    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{server.url}/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('go')")
    # The info line is filled from /v1/model.
    assert "step 300" in browser.wait_for(
        "document.getElementById('info').textContent.includes('step') && document.getElementById('info').textContent"
    )
    browser.eval("""
        document.getElementById('prompt').value = 'I bought these ';
        const t = document.getElementById('temperature'); t.value = '0.8'; t.dispatchEvent(new Event('input'));
        document.getElementById('length').value = '400';
        document.getElementById('seed').value = '11';
        document.getElementById('go').click();
    """)
    state = browser.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
    )
    status = browser.eval("document.getElementById('status').textContent")
    assert state == "done", status
    text = browser.eval("document.getElementById('generated').textContent")
    chunks = int(browser.eval("document.getElementById('generated').dataset.chunks || '0'"))
    assert browser.eval("document.getElementById('tval').textContent") == "0.8"
    # What the page streamed is exactly what the API returns for the same request, and it came in pieces.
    want = httpx.post(
        f"{server.url}/v1/generate",
        json={"prompt": "I bought these ", "temperature": 0.8, "max_chars": 400, "seed": 11},
        timeout=60,
    ).json()
    assert text == want["samples"][0]["text"] and len(text) == 400
    assert chunks > 1

    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "page.png").write_bytes(png)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size[0] > 500 and img.size[1] > 400
    colors = img.getcolors(maxcolors=1 << 20) or []
    background = max(colors)[1] if colors else None
    non_bg = sum(n for n, c in colors if c != background) / (img.size[0] * img.size[1])
    assert len(colors) > 20 and non_bg > 0.02, (len(colors), non_bg)  # not a blank page
    # Dark text pixels in the output box (where the generated text is) show the text was rendered.
    box = browser.eval("JSON.stringify(document.getElementById('output').getBoundingClientRect())")
    r = json.loads(box)
    crop = img.crop((int(r["left"]), int(r["top"]), int(r["right"]), int(min(r["bottom"], img.size[1]))))
    dark = sum(1 for p in crop.getdata() if sum(p) < 300)
    assert dark > 200, dark
