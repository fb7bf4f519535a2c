"""The serving engine without Ray or HTTP: its step thread and asyncio streams against the sampler run
alone, the bounded queue, deadlines, cancellation, a failing model, and hot swaps mid-generation."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_serve_support import one_thread, run_dir

from raylstm.engine import Engine, EngineCore, GenerationFailed, Job, QueueFull, RequestTimeout
from raylstm.sample import SampleParamError, SampleParams, Sampler


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def sampler(run):
    return Sampler.load(run)


async def collect_texts(engine: Engine, prompt: str, params: SampleParams, n: int = 1) -> list[str]:
    stream = engine.submit([prompt], params, n)
    texts = [""] * n
    async for ev in stream:
        for d in ev.deltas:
            texts[d.index] += d.text
    return texts


def test_async_streams_equal_the_sampler_alone(sampler):
    async def main():
        engine = Engine(sampler, max_rows=8)
        engine.start()
        try:
            params = [
                SampleParams(temperature=1.0, max_chars=30 + 5 * i, seed=i, logprobs=1) for i in range(6)
            ]
            got = await asyncio.gather(
                *(collect_texts(engine, f"I bought {i} ", p, n=2) for i, p in enumerate(params))
            )
        finally:
            engine.stop()
        return params, got

    params, got = asyncio.run(main())
    for i, (p, texts) in enumerate(zip(params, got)):
        ref = sampler.generate([f"I bought {i} "], p, n=2)[0]
        assert texts == [c.text for c in ref]


def test_queue_bound_refuses_at_once(sampler):
    core = EngineCore(sampler, max_rows=1, max_queued=2, retry_after_s=3)
    jobs = [Job(p, SampleParams(max_chars=5)) for p in "abc"]
    core.submit(jobs)  # one takes the free row at the next step, two wait
    with pytest.raises(QueueFull) as e:
        core.submit([Job("d", SampleParams(max_chars=5))])
    assert e.value.retry_after_s == 3 and "2" in str(e.value)
    while not jobs[0].finished:  # the first finishes, the second takes its row: a queue slot frees up
        core.step()
    core.step()
    core.submit([Job("d", SampleParams(max_chars=5))])


def test_deadline_frees_rows_with_a_timeout_error(sampler):
    core = EngineCore(sampler, max_rows=4, timeout_s=0.05)
    slow = Job("I bought ", SampleParams(max_chars=10_000, seed=1))
    core.submit([slow])
    core.step()
    time.sleep(0.1)
    events = core.step()
    assert isinstance(slow.error, RequestTimeout) and any(e.done and e.job is slow for e in events)
    assert not core.has_work() and core.active_rows == 0


def test_cancelled_jobs_leave_the_batch(sampler):
    core = EngineCore(sampler, max_rows=4)
    a, b = (
        Job("I bought ", SampleParams(max_chars=200, seed=1)),
        Job("The ", SampleParams(max_chars=200, seed=2)),
    )
    core.submit([a, b])
    for _ in range(5):
        core.step()
    core.cancel([a])
    core.step()
    assert core.active == [b] and core.active_rows == 1


def test_bad_parameter_for_this_model_is_a_typed_error(sampler):
    core = EngineCore(sampler)
    job = Job("a", SampleParams(logit_bias={9999: 1.0}))
    core.submit([job])
    core.step()
    assert isinstance(job.error, SampleParamError) and job.error.field == "logit_bias"


def test_a_failing_model_fails_what_is_in_flight_and_keeps_serving(run):
    broken = Sampler.load(run)

    async def main():
        engine = Engine(broken, max_rows=4)
        engine.start()
        real_forward = broken._forward
        calls = {"n": 0}

        def forward(ids, state, *rows):  # rows: the batch's condition ids and steering values
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("device lost")
            return real_forward(ids, state, *rows)

        broken._forward = forward
        try:
            with pytest.raises(GenerationFailed, match="device lost"):
                await collect_texts(engine, "I bought ", SampleParams(max_chars=50, seed=1))
            again = await collect_texts(engine, "I bought ", SampleParams(max_chars=20, seed=1))
        finally:
            engine.stop()
        return again

    again = asyncio.run(main())
    assert again == [Sampler.load(run).complete("I bought ", SampleParams(max_chars=20, seed=1)).text]
    assert torch.get_num_threads() == 1


def test_swap_mid_generation_finishes_running_rows_on_the_old_model(run, sampler):
    new = Sampler.load(run / "ckpt_b")  # a different shape (2 x 32)
    core = EngineCore(sampler, max_rows=8)
    old_job = Job("I bought ", SampleParams(max_chars=60, seed=3))
    core.submit([old_job])
    for _ in range(10):
        core.step()
    core.set_sampler(new)
    new_job = Job("I bought ", SampleParams(max_chars=60, seed=3))
    core.submit([new_job])
    while core.has_work():
        core.step()
    assert old_job.rows[0].text == sampler.complete("I bought ", SampleParams(max_chars=60, seed=3)).text
    assert new_job.rows[0].text == new.complete("I bought ", SampleParams(max_chars=60, seed=3)).text
    assert old_job.rows[0].text != new_job.rows[0].text
