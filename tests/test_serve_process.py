"""The engine in its own process (serve.engine_process = true), over real HTTP on a real local Ray: the same
answers as the in-process engine for the same requests (text, logprobs, echo, streamed and not); a
reload between checkpoints of different shapes reaches the engine process while a request started
before it finishes on the old model (checked from its text); a client that goes away frees its rows in
the engine process; deadlines give 503 and overload 429 from there too; /metrics counts its steps; a
SIGKILLed replica leaves no engine process behind and Serve brings one back; a deleted app drains its
requests and its engine process exits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from types import SimpleNamespace

import httpx
import pytest
from ray import serve
from test_serve_ops import PROMPT, Load, LongRequest
from test_serve_support import free_port, one_thread, run_dir

from raylstm.checkpoint import write_best
from raylstm.config import ServeConfig
from raylstm.sample import SampleParams, Sampler
from raylstm.serve import build_app, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def proc(ray_session, tmp_path_factory):
    base = run_dir(tmp_path_factory)
    run = tmp_path_factory.mktemp("proc_run")
    for name in ("ckpt_a", "ckpt_b"):
        shutil.copytree(base / name, run / name)
    write_best(run, "ckpt_a", {"val_bpc": 1.0})
    common = dict(num_cpus=0.25, reload_poll_s=0, max_new_chars=20_000, max_n=4)
    # This one follows the run's best.json: a new best is loaded in place (reconfigure's path too).
    cfg = ServeConfig(engine_process=True, **{**common, "reload_poll_s": 0.3})
    handle = start_server(run, cfg, port=free_port(), name="proc")
    serve.run(
        build_app(run, ServeConfig(engine_process=False, **common)),
        name="inproc",
        route_prefix="/inproc",
        blocking=False,
    )
    tight = ServeConfig(engine_process=True, max_batch_size=2, max_queued=2, retry_after_s=2, **common)
    serve.run(build_app(run, tight), name="tight", route_prefix="/tight", blocking=False)
    slow = ServeConfig(engine_process=True, request_timeout_s=0.3, **common)
    serve.run(build_app(run, slow), name="slow", route_prefix="/slow", blocking=False)
    yield SimpleNamespace(
        url=handle.url, run=run, handle=handle, a=Sampler.load(run / "ckpt_a"), b=Sampler.load(run / "ckpt_b")
    )
    handle.shutdown()


def info(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", timeout=30).json()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited too (its parent, the dead replica, never reaped it).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def _without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created", "replica")}


def _joined(events: list[dict]) -> dict:
    """A streamed body per sample: its text, logprobs and finish joined (how the text is cut into chunks
    depends on timing: events queued while the event loop was busy come merged)."""
    out: dict = {}
    for ev in events:
        if ev.get("type") == "delta":  # /v1/generate
            key, text, lp, reason = ev["index"], ev["text"], ev["logprobs"], None
        elif ev.get("type") in ("start", "finish"):
            out.setdefault(ev["type"], []).append(ev)
            continue
        else:  # a /v1/completions chunk
            c = ev["choices"][0]
            key, text, lp, reason = c["index"], c["text"], c["logprobs"], c["finish_reason"]
        into = out.setdefault(key, {"text": "", "logprobs": {}, "finish": []})
        into["text"] += text
        for k, v in (lp or {}).items():
            into["logprobs"].setdefault(k, []).extend(v or [None] * len(text))
        if reason:
            into["finish"].append(reason)
    return out


def test_the_engine_runs_in_its_own_process(proc):
    i = info(proc.url)
    assert i["engine_pid"] not in (None, i["pid"]) and alive(i["engine_pid"])
    with open(f"/proc/{i['engine_pid']}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == i["pid"]  # a child of the replica
    assert info(f"{proc.url}/inproc")["engine_pid"] is None


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/generate", {"prompt": PROMPT, "max_chars": 60, "seed": 3, "logprobs": 3, "n": 2}),
        ("/v1/generate", {"prompt": PROMPT, "max_chars": 60, "seed": 4, "best_of": 3, "n": 2, "stop": ["e"]}),
        ("/v1/completions", {"prompt": [PROMPT, "The"], "max_tokens": 40, "seed": 5, "logprobs": 2, "echo": True}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}),
    ],
)  # fmt: skip
def test_answers_equal_the_in_process_engine(proc, path, body):
    for stream in (False,) if "best_of" in body else (False, True):  # best_of > n is never streamed
        got = []
        for prefix in ("", "/inproc"):
            r = httpx.post(f"{proc.url}{prefix}{path}", json={**body, "stream": stream}, timeout=60)
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
                got.append(_joined([_without_ids(e) for e in events]))
            else:
                got.append(_without_ids(r.json()))
        assert got[0] == got[1]


def wait_serving(url: str, name: str) -> None:
    deadline = time.monotonic() + 60
    while not info(url)["checkpoint"].endswith(name):
        assert time.monotonic() < deadline, info(url)
        time.sleep(0.1)


def test_reload_reaches_the_engine_process_and_old_rows_finish_on_the_old_model(proc):
    replica = info(proc.url)["replica"]
    with Load(proc.url, clients=2) as load:
        long = LongRequest(proc.url, 3000, seed=77)  # on ckpt_a, still generating during the swap
        write_best(proc.run, "ckpt_b", {"val_bpc": 0.9})
        wait_serving(proc.url, "ckpt_b")
        assert long.thread.is_alive()  # the swap came while it was generating
        time.sleep(0.5)
        started_on, text = long.result()
    assert info(proc.url)["replica"] == replica and info(proc.url)["reloads"] == 1  # in place
    assert not load.failures(), load.failures()[:3]
    assert started_on.endswith("ckpt_a")
    assert text == proc.a.complete(PROMPT, SampleParams(max_chars=3000, seed=77)).text
    # Every answer is its own checkpoint's text (the new shape after the swap, never a mix).
    for r in load.done:
        sampler = proc.a if r["checkpoint"].endswith("ckpt_a") else proc.b
        assert r["text"] == sampler.complete(PROMPT, SampleParams(max_chars=80, seed=r["body"]["seed"])).text
    assert {r["checkpoint"].rsplit("/", 1)[-1] for r in load.done} == {"ckpt_a", "ckpt_b"}
    write_best(proc.run, "ckpt_a", {"val_bpc": 0.8})
    wait_serving(proc.url, "ckpt_a")


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))


@pytest.mark.parametrize("prefix", ["", "/inproc"])
def test_a_client_that_goes_away_frees_its_rows(proc, prefix):
    url = f"{proc.url}{prefix}"
    before = metric(url, "raylstm_chars_generated_total")
    body = {"prompt": PROMPT, "max_chars": 20_000, "stream": True}
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith('data: {"type":"delta"'):
                break
    deadline = time.monotonic() + 30
    while info(url)["active_rows"] != 0:
        assert time.monotonic() < deadline, "the abandoned row kept generating"
        time.sleep(0.05)
    time.sleep(0.5)  # the engine's last step records have reached /metrics
    assert metric(url, "raylstm_chars_generated_total") - before < 20_000  # it stopped short


def test_deadline_503_and_overload_429_from_the_engine_process(proc):
    r = httpx.post(f"{proc.url}/slow/v1/generate", json={"prompt": PROMPT, "max_chars": 20_000}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] and "timed out" in r.json()["detail"]
    with Load(f"{proc.url}/tight", clients=12, max_chars=120) as load:
        time.sleep(4)
    statuses = {r["status"] for r in load.done}
    assert statuses == {200, 429}, {r["status"]: r["error"] for r in load.failures()}
    for r in [r for r in load.done if r["status"] == 200][:5]:
        assert r["text"] == proc.a.complete(PROMPT, SampleParams(max_chars=120, seed=r["body"]["seed"])).text


def test_metrics_count_the_engine_process_steps(proc):
    def steps() -> float:
        return metric(proc.url, "raylstm_step_seconds_count")

    before = steps()
    httpx.post(f"{proc.url}/v1/generate", json={"prompt": PROMPT, "max_chars": 50, "seed": 1}, timeout=60)
    deadline = time.monotonic() + 10
    while steps() < before + 50:  # the engine flushes its step records with the last event
        assert time.monotonic() < deadline, (before, steps())
        time.sleep(0.1)


def test_a_killed_replica_leaves_no_engine_process_and_comes_back(proc):
    victim = info(proc.url)
    with Load(proc.url, clients=3, max_chars=200) as load:
        time.sleep(1.0)
        os.kill(victim["pid"], signal.SIGKILL)
        assert wait_gone(victim["engine_pid"]), "the engine process outlived its replica"
        time.sleep(2)
    assert len(load.failures()) <= 3
    deadline = time.monotonic() + 90
    while True:
        try:
            back = info(proc.url)
            if back["replica"] != victim["replica"]:
                break
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert back["engine_pid"] != victim["engine_pid"] and alive(back["engine_pid"])


def test_a_deleted_app_drains_and_its_engine_process_exits(proc):
    cfg = ServeConfig(engine_process=True, num_cpus=0.25, reload_poll_s=0, max_new_chars=3000)
    serve.run(build_app(proc.run, cfg), name="drain", route_prefix="/drain", blocking=False)
    engine_pid = info(f"{proc.url}/drain")["engine_pid"]
    long = LongRequest(f"{proc.url}/drain", 2500, seed=5)
    serve.delete("drain", _blocking=False)
    started_on, text = long.result()
    sampler = proc.a if started_on.endswith("ckpt_a") else proc.b
    assert text == sampler.complete(PROMPT, SampleParams(max_chars=2500, seed=5)).text
    assert wait_gone(engine_pid, 60)
