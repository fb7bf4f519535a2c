"""The Serve app over real HTTP on localhost: one Serve per module, three apps (open, token, reload)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from ray import serve
from test_sample import argmax_text
from test_serve_support import free_port, one_thread, run_dir

from raylstm.checkpoint import write_best
from raylstm.cli import main
from raylstm.config import ServeConfig
from raylstm.sample import SampleParams, Sampler
from raylstm.serve import build_app, start_server

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def _copy_run(base, dest):
    for name in ("ckpt_a", "ckpt_b"):
        shutil.copytree(base / name, dest / name)
    write_best(dest, "ckpt_a", {"val_bpc": 1.0})
    return dest


@pytest.fixture(scope="module")
def srv(ray_session, tmp_path_factory):
    base = run_dir(tmp_path_factory)
    cfg = ServeConfig(max_prompt_chars=500, max_new_chars=400, max_n=4, reload_poll_s=0.3, max_batch_size=16)
    handle = start_server(base, cfg, port=free_port())
    serve.run(build_app(base, cfg, token=TOKEN), name="secure", route_prefix="/secure", blocking=False)
    reload_run = _copy_run(base, tmp_path_factory.mktemp("reload_run"))
    serve.run(build_app(reload_run, cfg, token=""), name="reload", route_prefix="/reload", blocking=False)
    multi_run = _copy_run(base, tmp_path_factory.mktemp("multi_run"))
    multi_cfg = dataclasses.replace(cfg, num_replicas=2, max_replicas=2)
    serve.run(build_app(multi_run, multi_cfg, token=""), name="multi", route_prefix="/multi", blocking=False)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(
        url=handle.url,
        run=base,
        reload_run=reload_run,
        multi_run=multi_run,
        http=client,
        sampler=Sampler.load(base),
    )
    client.close()
    handle.shutdown()


def gen(srv, **body):
    r = srv.http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_models_and_info(srv):
    assert srv.http.get("/healthz").json()["status"] == "ok"
    assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["raylstm"]
    info = srv.http.get("/v1/model").json()
    assert info["checkpoint"].endswith("ckpt_a") and info["step"] == 300
    assert info["vocab_size"] == len(srv.sampler.vocab) and info["val_bpc"] is not None
    assert info["config"]["model"]["hidden_size"] == 64
    assert "/v1/completions" in srv.http.get("/openapi.json").json()["paths"]


def test_same_seed_same_text_cli_generate_completions(srv, capsys):
    prompt, seed, n = "I bought these ", 42, 60
    argv = ["sample", "--checkpoint", str(srv.run), "--prime", prompt, "--temperature", "0.9"]
    assert main([*argv, "--length", str(n), "--seed", str(seed)]) == 0
    cli_text = capsys.readouterr().out.splitlines()[1][len(prompt) :]
    g = gen(srv, prompt=prompt, temperature=0.9, max_chars=n, seed=seed)["samples"][0]
    c = srv.http.post(
        "/v1/completions",
        json={"model": "raylstm", "prompt": prompt, "temperature": 0.9, "max_tokens": n, "seed": seed},
    ).json()
    assert len(cli_text) == n
    assert g["text"] == cli_text == c["choices"][0]["text"]
    assert g["seed"] == seed
    other = gen(srv, prompt=prompt, temperature=0.9, max_chars=n, seed=seed + 1)["samples"][0]["text"]
    assert other != cli_text


def test_temperature_zero_is_argmax(srv):
    got = gen(srv, prompt="The stand ", temperature=0, max_chars=80)["samples"][0]["text"]
    assert got == argmax_text(srv.sampler, "The stand ", 80)


def test_stop_strings_end_output(srv):
    free = gen(srv, prompt="I bought these ", temperature=0, max_chars=200)["samples"][0]["text"]
    cut = free.index(".")
    s = gen(srv, prompt="I bought these ", temperature=0, max_chars=200, stop=["."])["samples"][0]
    assert s["text"] == free[:cut] and s["finish_reason"] == "stop"
    c = srv.http.post(
        "/v1/completions",
        json={"prompt": "I bought these ", "temperature": 0, "max_tokens": 200, "stop": "."},
    ).json()["choices"][0]
    assert c["text"] == free[:cut] and c["finish_reason"] == "stop"


@pytest.mark.parametrize("stop", [None, ["great", "well."]])
def test_sse_stream_equals_non_streamed(srv, stop):
    body = {"prompt": "I bought ", "temperature": 1.0, "max_chars": 150, "seed": 9, "n": 2, "stop": stop}
    whole = gen(srv, **body)["samples"]
    with srv.http.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[0]["type"] == "start" and events[0]["seeds"] == [9, 10] and events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for e in events:
        if isinstance(e, dict) and e["type"] == "delta":
            texts[e["index"]] += e["text"]
    assert [texts[0], texts[1]] == [s["text"] for s in whole]
    assert sum(1 for e in events if isinstance(e, dict) and e["type"] == "delta") > 2  # really incremental

    cbody = {"prompt": "I bought ", "temperature": 1.0, "max_tokens": 150, "seed": 9, "stop": stop}
    cwhole = srv.http.post("/v1/completions", json=cbody).json()["choices"][0]
    with srv.http.stream("POST", "/v1/completions", json={**cbody, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cwhole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == cwhole["finish_reason"]


def test_concurrent_requests_share_model_steps(srv):
    before = srv.http.get("/v1/model").json()
    bodies = [
        {"prompt": f"Great {i} ", "temperature": 1.0, "max_chars": 60 + i, "seed": i} for i in range(12)
    ]
    results: dict[int, str] = {}

    def call(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            results[i] = c.post("/v1/generate", json=bodies[i]).json()["samples"][0]["text"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = srv.http.get("/v1/model").json()
    for i, b in enumerate(bodies):
        ref = srv.sampler.complete(
            b["prompt"], SampleParams(temperature=1.0, max_chars=b["max_chars"], seed=i)
        )
        assert results[i] == ref.text  # batched with strangers == alone
    assert after["mean_rows_per_step"] > before["mean_rows_per_step"]  # rows shared steps


def test_unknown_prompt_chars_reported(srv):
    body = gen(srv, prompt="I bought \u00e9t\u00e9 \u2603 ", temperature=0, max_chars=10)
    assert body["unknown_chars"] == ["\u00e9", "\u2603"]
    assert len(body["samples"][0]["text"]) == 10


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/generate", {"prompt": "a", "temperature": -0.1}, "temperature"),
        ("/v1/generate", {"prompt": "a", "top_p": 1.5}, "top_p"),
        ("/v1/generate", {"prompt": "a", "top_k": -1}, "top_k"),
        ("/v1/generate", {"prompt": "a", "n": 0}, "n"),
        ("/v1/generate", {"prompt": "a", "n": 5}, "n"),  # over the configured cap of 4
        ("/v1/generate", {"prompt": "a", "max_chars": 401}, "max_chars"),  # over the cap of 400
        ("/v1/generate", {"prompt": "a" * 501}, "prompt"),  # over the cap of 500
        ("/v1/generate", {"prompt": ""}, "prompt"),
        ("/v1/generate", {"temperature": 1}, "prompt"),
        ("/v1/generate", {"prompt": "a", "seed": -3}, "seed"),
        ("/v1/generate", {"prompt": "a", "stop": [""]}, "stop"),
        ("/v1/generate", {"prompt": "a", "bogus": 1}, "bogus"),
        ("/v1/generate", {"prompt": "a", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 10_000}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "a", "logprobs": 3}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": []}, "prompt"),
    ],
)
def test_422_names_the_field(srv, path, body, field):
    r = srv.http.post(path, json=body)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(field in loc for loc in locs), locs


def test_malformed_json_is_422_naming_body(srv):
    r = srv.http.post(
        "/v1/generate", content=b'{"prompt": "a",', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][0] == "body"


def test_unknown_model_is_404(srv):
    r = srv.http.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert r.status_code == 404 and "raylstm" in r.json()["detail"]


def test_token_enforced_when_set(srv):
    h = srv.http
    assert h.get("/secure/healthz").status_code == 200
    for method, path, body in [
        ("GET", "/secure/v1/models", None),
        ("GET", "/secure/v1/model", None),
        ("POST", "/secure/v1/generate", {"prompt": "a", "max_chars": 3}),
        ("POST", "/secure/v1/completions", {"prompt": "a", "max_tokens": 3}),
        ("POST", "/secure/admin/reload", {}),
    ]:
        assert h.request(method, path, json=body).status_code == 401, path
        bad = h.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        ok = h.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, (path, ok.text)


def test_openai_client(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["raylstm"]
    whole = client.completions.create(
        model="raylstm", prompt="I bought ", max_tokens=50, temperature=0.7, seed=5
    )
    assert len(whole.choices[0].text) == 50 and whole.usage.completion_tokens == 50
    stream = client.completions.create(
        model="raylstm", prompt="I bought ", max_tokens=50, temperature=0.7, seed=5, stream=True
    )
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == whole.choices[0].text
    ref = srv.sampler.complete("I bought ", SampleParams(temperature=0.7, max_chars=50, seed=5))
    assert whole.choices[0].text == ref.text
    two = client.completions.create(model="raylstm", prompt=["a", "b"], max_tokens=5, n=2, seed=1)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]


def test_openapi_fuzz_finds_no_5xx(srv):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(srv.http.get("/openapi.json").json())
    failures: list[str] = []

    @given(case=schema.as_strategy())
    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        resp = case.call(base_url=srv.url, timeout=30)
        if resp.status_code >= 500:
            failures.append(
                f"{case.method} {case.path} {case.body!r} -> {resp.status_code} {resp.text[:200]}"
            )
        assert resp.status_code < 500

    fuzz()
    assert not failures
    assert srv.http.get("/healthz").status_code == 200


def test_hot_reload_under_load_fails_no_request(srv):
    url, run = f"{srv.url}/reload", srv.reload_run
    stop = threading.Event()
    codes: list[int] = []
    errors: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            k = 0
            while not stop.is_set():
                k += 1
                body = {"prompt": "I bought ", "max_chars": 80, "seed": k, "stream": k % 2 == 0}
                try:
                    r = c.post(f"{url}/v1/generate", json=body)
                    codes.append(r.status_code)
                    if r.status_code != 200 or (body["stream"] and '"type": "error"' in r.text):
                        errors.append(r.text[:200])
                except httpx.HTTPError as e:
                    errors.append(repr(e))

    assert httpx.get(f"{url}/v1/model").json()["checkpoint"].endswith("ckpt_a")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    write_best(run, "ckpt_b", {"val_bpc": 0.9})  # the trainer found a better checkpoint
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/v1/model").json()["checkpoint"].endswith("ckpt_b"):
            break
        time.sleep(0.2)
    time.sleep(1.5)  # keep the load on after the switch
    stop.set()
    for t in threads:
        t.join()
    info = httpx.get(f"{url}/v1/model").json()
    assert info["checkpoint"].endswith("ckpt_b") and info["step"] == 120 and info["reloads"] == 1
    assert len(codes) > 8 and not errors, errors[:3]

    # The explicit route: back to ckpt_a while clients keep going.
    stop.clear()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    r = httpx.post(f"{url}/admin/reload", json={"checkpoint": str(run / "ckpt_a")}, timeout=60)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert r.status_code == 200 and r.json()["reloaded"] and r.json()["checkpoint"].endswith("ckpt_a")
    assert not errors, errors[:3]
    bad = httpx.post(f"{url}/admin/reload", json={"checkpoint": str(run / "nope")}, timeout=60)
    assert bad.status_code == 409 and "nope" in bad.json()["detail"]
    assert httpx.get(f"{url}/v1/model").json()["checkpoint"].endswith("ckpt_a")


def test_every_replica_follows_best_json(srv):
    def infos(k: int) -> list[dict]:
        return [srv.http.get("/multi/v1/model").json() for _ in range(k)]

    first = infos(30)
    assert len({i["replica"] for i in first}) == 2  # two replicas really answer
    assert all(i["checkpoint"].endswith("ckpt_a") for i in first)
    write_best(srv.multi_run, "ckpt_b", {"val_bpc": 0.9})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = infos(20)
        if all(i["checkpoint"].endswith("ckpt_b") for i in seen) and len({i["replica"] for i in seen}) == 2:
            break
        time.sleep(0.3)
    assert all(i["checkpoint"].endswith("ckpt_b") and i["reloads"] == 1 for i in seen)
    assert len({i["replica"] for i in seen}) == 2
