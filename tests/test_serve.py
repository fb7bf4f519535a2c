"""The Serve app over real HTTP on localhost (one Serve per module: an open app and a token app), checked
against the sampling library and computations written out here with the model itself: seeds, argmax,
stops, streaming, batching, OpenAI's logprobs/echo/penalties/logit_bias/best_of through the official
client, `raylstm evaluate`'s bits, Prometheus metrics, 422s naming the field, auth, and a schemathesis
fuzz (positive and negative) that reads every streamed body to its end."""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace

import httpx
import pytest
import torch
from ray import serve
from test_sample import argmax_text, masked_logprobs, model_logits
from test_serve_support import free_port, one_thread, run_dir

from raylstm.cli import main
from raylstm.config import ServeConfig
from raylstm.evaluate import score_reviews
from raylstm.sample import SampleParams, Sampler
from raylstm.serve import build_app, start_server

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def srv(ray_session, tmp_path_factory):
    base = run_dir(tmp_path_factory)
    cfg = ServeConfig(max_prompt_chars=500, max_new_chars=400, max_n=4, reload_poll_s=0, max_batch_size=16)
    handle = start_server(base, cfg, port=free_port())
    serve.run(build_app(base, cfg, token=TOKEN), name="secure", route_prefix="/secure", blocking=False)
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(url=handle.url, run=base, http=client, sampler=Sampler.load(base))
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
    h = srv.http.get("/healthz").json()
    assert h["status"] == "ok" and h["checkpoint"].endswith("ckpt_a") and h["step"] == 300
    assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["raylstm"]
    info = srv.http.get("/v1/model").json()
    assert info["checkpoint"].endswith("ckpt_a") and info["step"] == 300
    assert info["vocab_size"] == len(srv.sampler.vocab) and info["val_bpc"] is not None
    assert info["vocab"] == {c: i for i, c in enumerate(srv.sampler.vocab.itos)}  # every char's id
    assert info["config"]["model"]["hidden_size"] == 64
    schema = srv.http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/generate", "/metrics"} <= set(schema["paths"])
    ok = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("CompletionResponse")  # /docs shows responses


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
        json={"prompt": "I bought these ", "temperature": 0, "max_tokens": 200, "stop": ".", "logprobs": 1},
    ).json()["choices"][0]
    assert c["text"] == free[:cut] and c["finish_reason"] == "stop"
    assert "".join(c["logprobs"]["tokens"]) == c["text"]  # the stop string's chars are not in logprobs


@pytest.mark.parametrize("stop", [None, ["great", "well."]])
def test_sse_stream_equals_non_streamed(srv, stop):
    body = {
        "prompt": "I bought ",
        "temperature": 1.0,
        "max_chars": 150,
        "seed": 9,
        "n": 2,
        "stop": stop,
        "logprobs": 2,
    }
    whole = gen(srv, **body)["samples"]
    with srv.http.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[0]["type"] == "start" and events[0]["seeds"] == [9, 10] and events[-1] == "[DONE]"
    texts, lps = {0: "", 1: ""}, {0: [], 1: []}
    for e in events:
        if isinstance(e, dict) and e["type"] == "delta":
            assert e["logprobs"]["text_offset"][0] == len(texts[e["index"]])
            texts[e["index"]] += e["text"]
            lps[e["index"]] += e["logprobs"]["token_logprobs"]
    assert [texts[0], texts[1]] == [s["text"] for s in whole]
    assert [lps[0], lps[1]] == [s["logprobs"]["token_logprobs"] for s in whole]
    assert sum(1 for e in events if isinstance(e, dict) and e["type"] == "delta") > 2  # really incremental

    cbody = {"prompt": "I bought ", "temperature": 1.0, "max_tokens": 150, "seed": 9, "stop": stop}
    cwhole = srv.http.post("/v1/completions", json=cbody).json()["choices"][0]
    with srv.http.stream("POST", "/v1/completions", json={**cbody, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
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
    cleaned = gen(srv, prompt="I bought &amp; ", temperature=0, max_chars=5)
    assert cleaned["prompt"] == "I bought & " and cleaned["prompt_changes"] == ["HTML entities or tags"]


def test_openai_client_logprobs_equal_the_model(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["raylstm"]
    prompt = "I bought "
    whole = client.completions.create(
        model="raylstm", prompt=prompt, max_tokens=50, temperature=0.7, seed=5, logprobs=5
    )
    choice = whole.choices[0]
    assert len(choice.text) == 50 and whole.usage.completion_tokens == 50
    lp = choice.logprobs
    assert lp.tokens == list(choice.text) and lp.text_offset == list(range(50))
    direct = masked_logprobs(srv.sampler, model_logits(srv.sampler, prompt + choice.text))[
        len(prompt) - 1 : -1
    ]
    for i, ch in enumerate(choice.text):
        assert lp.token_logprobs[i] == pytest.approx(float(direct[i, srv.sampler.vocab.stoi[ch]]), abs=1e-5)
        top = direct[i].topk(5)
        want = {srv.sampler.itos[j]: float(v) for v, j in zip(top.values, top.indices)}
        assert all(lp.top_logprobs[i][k] == pytest.approx(v, abs=1e-5) for k, v in want.items())
    stream = client.completions.create(
        model="raylstm", prompt=prompt, max_tokens=50, temperature=0.7, seed=5, logprobs=5, stream=True
    )
    tokens, values, offsets, tops = [], [], [], []
    for ch in stream:
        if ch.choices and ch.choices[0].logprobs:
            tokens += ch.choices[0].logprobs.tokens
            values += ch.choices[0].logprobs.token_logprobs
            offsets += ch.choices[0].logprobs.text_offset
            tops += ch.choices[0].logprobs.top_logprobs
    assert (tokens, values, offsets, tops) == (lp.tokens, lp.token_logprobs, lp.text_offset, lp.top_logprobs)
    ref = srv.sampler.complete(prompt, SampleParams(temperature=0.7, max_chars=50, seed=5))
    assert choice.text == ref.text
    two = client.completions.create(model="raylstm", prompt=["a", "b"], max_tokens=5, n=2, seed=1)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    ids = [srv.sampler.vocab.stoi[c] for c in prompt]  # token-id prompts: the ids are characters
    by_ids = client.completions.create(model="raylstm", prompt=ids, max_tokens=50, temperature=0.7, seed=5)
    assert by_ids.choices[0].text == choice.text


def test_echo_scores_a_text_as_evaluate_does(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    review = "The strap is comfortable and long enough for me. Highly recommended."
    r = client.completions.create(
        model="raylstm", prompt="\n" + review + "\n", max_tokens=0, echo=True, logprobs=0
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "\n" + review + "\n" and lp.tokens == list(r.choices[0].text)
    assert lp.token_logprobs[0] is None and lp.top_logprobs is None
    bits, chars, _ = score_reviews(srv.sampler.model, srv.sampler.vocab, [review])
    assert chars == len(lp.token_logprobs) - 1
    assert -sum(lp.token_logprobs[1:]) / math.log(2) == pytest.approx(bits, rel=1e-4)
    # echo + logprobs + a continuation: the prompt's entries, then the generated ones, offsets running on.
    r2 = client.completions.create(
        model="raylstm", prompt="I bought", max_tokens=5, echo=True, logprobs=2, seed=3
    )
    lp2 = r2.choices[0].logprobs
    assert lp2.text_offset == list(range(len("I bought") + 5)) and lp2.token_logprobs[0] is None
    assert lp2.tokens == list(r2.choices[0].text) and r2.choices[0].text.startswith("I bought")


def test_penalties_and_logit_bias_follow_their_formulas(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    s = srv.sampler
    prompt = "I bought these "
    e_id, a_id = s.vocab.stoi["e"], s.vocab.stoi["a"]
    r = client.completions.create(
        model="raylstm", prompt=prompt, max_tokens=30, seed=2, logprobs=20, presence_penalty=0.8,
        frequency_penalty=0.5, logit_bias={str(e_id): 2.5, str(a_id): -4.0},
        extra_body={"repetition_penalty": 1.2},
    )  # fmt: skip
    text, lp = r.choices[0].text, r.choices[0].logprobs
    logits = model_logits(s, prompt + text)[len(prompt) - 1 : -1]
    for i in range(len(text)):
        z = logits[i].clone()
        z[s.vocab.unk_id] = -math.inf
        z[e_id] += 2.5
        z[a_id] -= 4.0
        for ch in set(prompt + text[:i]):  # vLLM's repetition penalty: prompt and output so far
            j = s.vocab.stoi[ch]
            z[j] = z[j] / 1.2 if z[j] > 0 else z[j] * 1.2
        counts = torch.zeros(len(s.vocab), dtype=torch.float64)
        for ch in text[:i]:
            counts[s.vocab.stoi[ch]] += 1
        want = torch.log_softmax(z - 0.5 * counts - 0.8 * (counts > 0), -1)
        for ch, v in lp.top_logprobs[i].items():
            assert v == pytest.approx(float(want[s.vocab.stoi[ch]]), abs=1e-5), (i, ch)
    best = client.completions.create(
        model="raylstm", prompt=prompt, max_tokens=20, n=2, best_of=4, seed=7, temperature=1.3
    )
    every = s.generate([prompt], SampleParams(temperature=1.3, max_chars=20, seed=7), n=4)[0]
    ranked = sorted(every, key=lambda c: -c.mean_logprob)[:2]
    assert [c.text for c in best.choices] == [c.text for c in ranked]
    mp = gen(srv, prompt=prompt, max_chars=30, seed=4, min_p=0.3, temperature=1.0)["samples"][0]["text"]
    assert mp == s.complete(prompt, SampleParams(max_chars=30, seed=4, min_p=0.3)).text


def test_metrics_parse_and_move_with_traffic(srv):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        r = srv.http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for smp in fam.samples:
                out[(smp.name, tuple(sorted((k, v) for k, v in smp.labels.items() if k != "replica")))] = (
                    smp.value
                )
        return out

    before = scrape()
    lengths = [17, 23, 31]
    for k, n in enumerate(lengths):
        gen(srv, prompt="Great ", max_chars=n, seed=k)
    assert srv.http.post("/v1/generate", json={"prompt": "a", "top_p": 3}).status_code == 422
    after = scrape()

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("raylstm_requests_total", route="/v1/generate", status="200") == 3
    assert moved("raylstm_requests_total", route="/v1/generate", status="422") == 1
    assert moved("raylstm_chars_generated_total") == sum(lengths)
    assert moved("raylstm_time_to_first_char_seconds_count") == 3
    assert moved("raylstm_step_seconds_count") == sum(lengths)  # one at a time: a step per character
    assert after[("raylstm_checkpoint_step", ())] == 300
    assert after[("raylstm_rows_active", ())] == 0 and after[("raylstm_queue_depth", ())] == 0
    assert after[("raylstm_checkpoint_val_bpc", ())] == pytest.approx(srv.sampler.info()["val_bpc"])


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
        ("/v1/generate", {"prompt": "\u200b"}, "prompt"),  # nothing left after cleaning
        ("/v1/generate", {"temperature": 1}, "prompt"),
        ("/v1/generate", {"prompt": "a", "seed": -3}, "seed"),
        ("/v1/generate", {"prompt": "a", "stop": [""]}, "stop"),
        ("/v1/generate", {"prompt": "a", "bogus": 1}, "bogus"),
        ("/v1/generate", {"prompt": "a", "temperature": "hot"}, "temperature"),
        ("/v1/generate", {"prompt": "a", "logit_bias": {"999": 1}}, "logit_bias"),  # no such character id
        ("/v1/generate", {"prompt": "a", "logit_bias": {"0": 1}}, "logit_bias"),  # the unknown symbol
        ("/v1/generate", {"prompt": "a", "logit_bias": {"e": 1}}, "logit_bias"),
        ("/v1/generate", {"prompt": "a", "n": 2, "best_of": 1}, "best_of"),
        ("/v1/generate", {"prompt": "a", "best_of": 6}, "best_of"),  # over the cap of 4
        ("/v1/generate", {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 10_000}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "a", "frequency_penalty": -2.5}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"3": 101}}, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "min_p": 1.5}, "min_p"),
        ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
        ("/v1/completions", {"prompt": "a", "best_of": 2, "n": 1, "stream": True}, "best_of"),
        ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [100000]}, "prompt"),  # no such character id
        # This model is not conditioned: asking for a rating or category, or steering, names the field.
        ("/v1/generate", {"prompt": "a", "rating": 5}, "rating"),
        ("/v1/completions", {"prompt": "a", "category": "Books"}, "category"),
        ("/v1/generate", {"prompt": "a", "steer_sentiment": 1}, "steer_sentiment"),
        ("/v1/generate", {"prompt": "a", "steer_sentiment": 9}, "steer_sentiment"),
    ],
)
def test_422_names_the_field(srv, path, body, field):
    r = srv.http.post(path, json=body)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(field in loc or any(field in str(p) for p in loc) for loc in locs), locs


def test_an_unconditioned_model_lists_no_conditions_and_has_no_rating_to_classify(srv):
    assert srv.http.get("/v1/model").json()["conditions"] == {}
    r = srv.http.post("/v1/classify", json={"text": "Great strings."})
    assert r.status_code == 400 and "not conditioned" in r.json()["detail"]


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
    assert h.get("/secure/metrics").status_code == 200  # counts and latencies, no model data
    for method, path, body in [
        ("GET", "/secure/v1/models", None),
        ("GET", "/secure/v1/model", None),
        ("POST", "/secure/v1/generate", {"prompt": "a", "max_chars": 3}),
        ("POST", "/secure/v1/completions", {"prompt": "a", "max_tokens": 3}),
    ]:
        assert h.request(method, path, json=body).status_code == 401, path
        bad = h.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        ok = h.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, (path, ok.text)
    assert "401" in h.get("/secure/metrics").text  # the refusals were counted


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_finds_no_5xx_and_no_error_event(srv, mode):
    schemathesis = pytest.importorskip("schemathesis")
    import requests
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(srv.http.get("/openapi.json").json())
    failures: list[str] = []

    @given(case=schema.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        # The request is sent with requests itself, which reads every body to its end: schemathesis 4's
        # case.call() stops reading an event stream after 20 events (its max_stream_events), and a
        # generation stream cut there would look like one that never sent [DONE].
        resp = requests.request(**case.as_transport_kwargs(base_url=srv.url), timeout=60)
        text = resp.text
        bad = resp.status_code >= 500
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
            bad |= not events or events[-1] != "[DONE]"
            bad |= any('"error"' in e and ('"type":"error"' in e or e.startswith('{"error"')) for e in events)
        if bad:
            failures.append(f"{case.method} {case.path} {case.body!r} -> {resp.status_code} {text[-300:]}")
        assert not bad, failures[-1]

    fuzz()
    assert not failures
    assert srv.http.get("/healthz").status_code == 200
