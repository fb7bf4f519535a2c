"""The sampling library on a real trained checkpoint: determinism, argmax, stops, batching, unk, CLI."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_serve_support import one_thread, run_dir

from raylstm.sample import Engine, Job, SampleParams, Sampler, choose_next, run_sample_cli


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def sampler(run):
    return Sampler.load(run)


def argmax_text(sampler: Sampler, prompt: str, n: int) -> str:
    """Greedy decoding written out directly: feed the prompt, then always the most likely character."""
    ids = torch.tensor([sampler.vocab.encode(prompt).tolist()])
    with torch.no_grad():
        logits, state = sampler.model(ids)
        out = []
        for _ in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(sampler.vocab.itos[nxt])
            logits, state = sampler.model(torch.tensor([[nxt]]), state)
    return "".join(out)


def test_loads_best_of_run(sampler, run):
    assert sampler.path == run / "ckpt_a"
    assert sampler.info()["step"] == 300


def test_model_learned_the_text(sampler):
    # The trained checkpoint continues a known prefix with the text it was trained on.
    text = sampler.complete("I bought these strings for my gu", SampleParams(temperature=0, max_chars=5)).text
    assert text == "itar "


def test_temperature_zero_is_argmax(sampler):
    got = sampler.complete("The stand ", SampleParams(temperature=0, max_chars=60)).text
    assert got == argmax_text(sampler, "The stand ", 60)


def test_same_seed_same_text_different_seed_differs(sampler):
    p = SampleParams(temperature=1.5, max_chars=80, seed=7)
    a = sampler.complete("I bought ", p).text
    b = sampler.complete("I bought ", p).text
    c = sampler.complete("I bought ", SampleParams(temperature=1.5, max_chars=80, seed=8)).text
    assert a == b and len(a) == 80
    assert a != c


def test_batched_equals_unbatched_each_with_own_params(sampler):
    prompts = ["I bought ", "The ", "Great product", "x"]
    params = [
        SampleParams(temperature=1.2, top_k=5, max_chars=50, seed=1),
        SampleParams(temperature=0.0, max_chars=30, seed=2),
        SampleParams(
            temperature=0.8,
            top_p=0.9,
            max_chars=70,
            seed=3,
            stop=("."),
        ),
        SampleParams(temperature=2.0, max_chars=40, seed=4),
    ]
    batched = sampler.generate(prompts, params)
    for prompt, p, got in zip(prompts, params, batched):
        alone = sampler.generate([prompt], p)[0][0]
        assert got[0].text == alone.text and got[0].finish_reason == alone.finish_reason


def test_n_samples_use_consecutive_seeds(sampler):
    p = SampleParams(temperature=1.5, max_chars=40, seed=100)
    many = sampler.generate(["I bought "], p, n=3)[0]
    assert [c.seed for c in many] == [100, 101, 102]
    assert (
        many[1].text
        == sampler.complete("I bought ", SampleParams(temperature=1.5, max_chars=40, seed=101)).text
    )
    assert len({c.text for c in many}) > 1


def test_stop_string_ends_output(sampler):
    free = sampler.complete("I bought these ", SampleParams(temperature=0, max_chars=200)).text
    assert "." in free
    stopped = sampler.complete("I bought these ", SampleParams(temperature=0, max_chars=200, stop=(".",)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(".")]


def test_top_k_one_is_argmax(sampler):
    a = sampler.complete("Works ", SampleParams(temperature=3.0, top_k=1, max_chars=40, seed=5)).text
    assert a == argmax_text(sampler, "Works ", 40)


def test_choose_next_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    u = torch.tensor([0.999, 0.999, 0.999, 0.5])
    got = choose_next(
        logits,
        torch.tensor([1.0, 1.0, 1.0, 0.0]),
        torch.tensor([2, 0, 0, 0]),
        torch.tensor([1.0, 1.0, 0.5, 1.0]),
        u,
    )
    # top-k 2 keeps ids {0,1}; no filter reaches the last id; top-p 0.5 keeps only id 0; temp 0 -> argmax.
    assert got.tolist() == [1, 3, 0, 0]


def test_unknown_prompt_chars_are_reported(sampler):
    rows, unknown = sampler.start("I bought \u00e9\u00e9 ok \u2603", SampleParams(max_chars=5, seed=1))
    assert unknown == ["\u00e9", "\u2603"]
    assert len(rows) == 1


def test_invalid_params_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SampleParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SampleParams(temperature=-1)


def test_engine_continuous_batching_matches_generate(sampler):
    eng = Engine(sampler, max_rows=4)
    jobs = [
        Job(f"I bought {i} ", SampleParams(temperature=1.0, max_chars=20 + 7 * i, seed=i), n=2)
        for i in range(5)
    ]
    eng.submit(jobs[:2])
    streamed = {id(j): {0: "", 1: ""} for j in jobs}
    for k in range(400):
        if k == 5:
            eng.submit(jobs[2:])  # joins while others are running
        for ev in eng.step():
            for idx, d in ev.deltas:
                streamed[id(ev.job)][idx] += d
        if not eng.has_work():
            break
    assert eng.rows_stepped / eng.steps > 2  # rows really shared model steps
    for j in jobs:
        ref = sampler.generate([j.prompt], j.params, n=2)[0]
        assert [r.text for r in j.rows] == [c.text for c in ref]
        assert [streamed[id(j)][i] for i in (0, 1)] == [c.text for c in ref]


def test_engine_stream_holds_back_partial_stop(sampler):
    eng = Engine(sampler, max_rows=2)
    job = Job("I bought these ", SampleParams(temperature=0, max_chars=200, stop=("great.", "well.")))
    eng.submit([job])
    text = ""
    while eng.has_work():
        for ev in eng.step():
            text += "".join(d for _, d in ev.deltas)
    assert text == job.rows[0].text
    assert not text.endswith(("great", "well"))


def test_cli_prints_seeded_text(run, capsys):
    args = argparse.Namespace(
        checkpoint=str(run),
        prime="I bought ",
        temperature=[0.0, 1.0],
        length=30,
        top_k=0,
        top_p=1.0,
        stop=[],
        n=1,
        seed=3,
    )
    assert run_sample_cli(args) == 0
    out = capsys.readouterr().out
    sampler = Sampler.load(run)
    want = sampler.complete("I bought ", SampleParams(temperature=1.0, max_chars=30, seed=3)).text
    assert "I bought " + want in out
    assert "I bought " + argmax_text(sampler, "I bought ", 30) in out


def test_cli_main_reports_unknown_chars_and_bad_values(run, capsys):
    from raylstm.cli import main

    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--prime",
                "I bought \u00e9",
                "--length",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "outside the vocabulary" in captured.err and "\u00e9" in captured.err
    assert main(["sample", "--checkpoint", str(run), "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
