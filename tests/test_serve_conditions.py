"""A conditioned model served over real HTTP (one Serve app for the module): `rating`/`category` on
/v1/generate and as an extension of /v1/completions give exactly the library's text; an unknown value is
a 422 naming the field and listing the valid ones; POST /v1/classify is the library's Bayes posterior
and reads the test's own reviews' obvious ratings; and the web page's star selector reaches the API in a
real headless Chromium (the browser fixture of test_web)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conditioned_support import conditioned_checkpoint, corpus
from test_serve_support import free_port, one_thread
from test_web import browser  # noqa: F401  (the module's Chromium, a fixture)

from raylstm.classify import classify_reviews
from raylstm.config import ServeConfig
from raylstm.sample import SampleParams, Sampler
from raylstm.serve import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def srv(ray_session, tmp_path_factory):
    run = conditioned_checkpoint(tmp_path_factory.mktemp("cond_run"))
    handle = start_server(run, ServeConfig(max_batch_size=16), port=free_port())
    client = httpx.Client(base_url=handle.url, timeout=60)
    yield SimpleNamespace(url=handle.url, run=run, http=client, sampler=Sampler.load(run))
    client.close()
    handle.shutdown()


def library_text(srv, prompt: str, **kw) -> str:
    conditions = {k: kw.pop(k) for k in ("rating", "category") if k in kw}
    return srv.sampler.generate([prompt], [SampleParams(conditions=conditions, **kw)])[0][0].text


def test_generate_and_completions_write_the_requested_rating(srv):
    info = srv.http.get("/v1/model").json()
    assert info["conditions"] == {"rating": ["1", "2", "3", "4", "5"], "category": ["books", "guitars"]}
    texts = {}
    for rating in (1, 5):
        body = {"prompt": "The ", "temperature": 0.8, "seed": 5, "rating": rating, "category": "guitars"}
        r = srv.http.post("/v1/generate", json={**body, "max_chars": 60})
        assert r.status_code == 200, r.text
        texts[rating] = r.json()["samples"][0]["text"]
        assert texts[rating] == library_text(
            srv, "The ", temperature=0.8, seed=5, max_chars=60, rating=rating, category="guitars"
        )
        c = srv.http.post("/v1/completions", json={**body, "max_tokens": 60})
        assert c.status_code == 200, c.text
        assert c.json()["choices"][0]["text"] == texts[rating]  # the same request through the OpenAI API
    assert texts[1] != texts[5]
    # Streamed: the deltas add up to the same text.
    with srv.http.stream(
        "POST",
        "/v1/generate",
        json={"prompt": "The ", "temperature": 0.8, "seed": 5, "max_chars": 60, "rating": 1, "category": "guitars", "stream": True},
    ) as r:  # fmt: skip
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    import json

    assert "".join(e["text"] for e in map(json.loads, events[:-1]) if e["type"] == "delta") == texts[1]


@pytest.mark.parametrize(
    "path,body,field,valid",
    [
        ("/v1/generate", {"rating": 7}, "rating", "valid values: 1, 2, 3, 4, 5"),
        ("/v1/generate", {"rating": "five", "stream": True}, "rating", "valid values: 1, 2, 3, 4, 5"),
        ("/v1/generate", {"category": "garden"}, "category", "valid values: 'books', 'guitars'"),
        ("/v1/completions", {"rating": 0}, "rating", "valid values: 1, 2, 3, 4, 5"),
        ("/v1/completions", {"category": "Books"}, "category", "valid values: 'books', 'guitars'"),
        (
            "/v1/classify",
            {"text": "fine", "category": "garden"},
            "category",
            "valid values: 'books', 'guitars'",
        ),
    ],
)
def test_an_unknown_condition_is_422_naming_the_field_and_the_valid_values(srv, path, body, field, valid):
    r = srv.http.post(path, json={"prompt": "The ", **body} if path != "/v1/classify" else body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", field]
    assert valid in detail[0]["msg"]


def test_classify_is_the_library_posterior_and_reads_obvious_ratings(srv):
    new = corpus(16, seed=123)  # reviews the test writes (1 and 5 stars alternate), not the training ones
    texts = [t for t, _, _ in new]
    r = srv.http.post("/v1/classify", json={"text": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    want = classify_reviews(srv.sampler.ckpt, texts)
    for got, ref in zip(results, want):
        for field in ("rating", "category"):
            np.testing.assert_allclose(
                [got["posterior"][field][v] for v in ref[field]], list(ref[field].values()), rtol=1e-6
            )
    accuracy = np.mean(
        [res["predicted"]["rating"] == str(rating) for res, (_, rating, _) in zip(results, new)]
    )
    assert accuracy >= 0.9, accuracy  # chance: 0.5 between the two ratings written
    # The category known: one review.
    one = srv.http.post("/v1/classify", json={"text": texts[0], "category": new[0][2]}).json()["results"]
    assert len(one) == 1 and one[0]["predicted"]["rating"] == str(new[0][1])


def test_page_star_selector_reaches_the_api(srv, browser):  # noqa: F811
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{srv.url}/")
    # The selector appears once /v1/model said the model is conditioned.
    assert browser.wait_for("document.body.dataset.conditions") == "rating,category"
    assert browser.eval("document.getElementById('stars').hidden") is False
    browser.eval("""
        document.querySelector('label[for="star-1"]').click();
        document.getElementById('category').value = 'guitars';
        document.getElementById('prompt').value = 'The ';
        const t = document.getElementById('temperature'); t.value = '0.8'; t.dispatchEvent(new Event('input'));
        document.getElementById('length').value = '60';
        document.getElementById('seed').value = '11';
        document.getElementById('go').click();
    """)
    state = browser.wait_for(
        "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
    )
    assert state == "done", browser.eval("document.getElementById('status').textContent")
    assert browser.eval("document.getElementById('stars-said').textContent") == "1 star"
    text = browser.eval("document.getElementById('generated').textContent")
    one = library_text(srv, "The ", temperature=0.8, seed=11, max_chars=60, rating=1, category="guitars")
    five = library_text(srv, "The ", temperature=0.8, seed=11, max_chars=60, rating=5, category="guitars")
    assert text == one and one != five
