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


@pytest.mark.parametrize("prefill_thread", [True, False], ids=["prefill-thread", "prefill-in-step"])
def test_async_streams_equal_the_sampler_alone(sampler, prefill_thread):
    async def main():
        engine = Engine(sampler, max_rows=8, prefill_thread=prefill_thread, admit_hold_s=0.005)
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


def test_prompts_of_different_lengths_read_together_are_read_as_alone(run):
    """One start_many over prompts of 4 lengths (some asking for prompt logprobs) = each started alone:
    the same state, next-char logits, prompt logprobs and text."""
    sampler = Sampler.load(run)
    prompts = ["I bought these strings ", "The ", "I bought these strings ", "Great product, fast", "a"]
    params = [
        SampleParams(temperature=1.0, max_chars=40, seed=i, prompt_logprobs=2 if i % 2 else None)
        for i in range(len(prompts))
    ]
    together = [g[0] for g in sampler.start_many([(p, sp, 1) for p, sp in zip(prompts, params)])]
    for p, sp, row in zip(prompts, params, together):
        alone = sampler.start(p, sp)[0]
        torch.testing.assert_close(row.state, alone.state, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(row.logits, alone.logits, rtol=1e-6, atol=1e-6)
        if sp.prompt_logprobs is not None:
            assert row.prompt.logprobs.token_logprobs[0] is None
            assert row.prompt.logprobs.token_logprobs[1:] == pytest.approx(
                alone.prompt.logprobs.token_logprobs[1:], rel=1e-6, abs=1e-6
            )
    while any(not r.finished for r in together):
        sampler.step(together)
    for p, sp, row in zip(prompts, params, together):
        assert row.text == sampler.complete(p, sp).text


def test_a_held_job_waits_for_company_then_runs_as_alone(sampler):
    """admit_hold_s: while rows are generating, a new job waits (up to the hold) for others to arrive
    so that their prompts are read together; its text is what it writes alone."""
    core = EngineCore(sampler, max_rows=8, admit_hold_s=0.2)
    first = Job("I bought ", SampleParams(max_chars=500, seed=1))
    core.submit([first])
    core.step()  # nothing else generates: admitted at once
    assert core.active == [first]
    late = [Job(f"The {i} ", SampleParams(max_chars=30, seed=10 + i)) for i in range(2)]
    core.submit(late[:1])
    core.step()
    assert late[0] in core.waiting  # held: rows are generating and the batch has room
    core.submit(late[1:])
    time.sleep(0.25)
    core.step()
    assert not core.waiting and all(j in core.active for j in late)  # read together after the hold
    full = EngineCore(sampler, max_rows=2, admit_hold_s=10.0)
    full.submit([Job("I bought ", SampleParams(max_chars=50, seed=1))])
    full.step()
    filler = Job("The ", SampleParams(max_chars=5, seed=2))
    full.submit([filler])
    full.step()
    assert filler in full.active  # the waiting rows fill the batch: no hold
    while core.has_work():
        core.step()
    for j in late:
        assert j.rows[0].text == sampler.complete(j.prompt, j.params).text


def test_events_queued_while_the_loop_was_busy_come_as_one_chunk(sampler):
    """Steps whose events pile up before the request's event loop reads them are merged into one event
    per job (one SSE chunk), with the same text and logprobs as the steps gave one by one."""

    async def main():
        engine = Engine(sampler, max_rows=4, prefill_thread=False)  # stepped here, not by its thread
        params = SampleParams(temperature=1.0, max_chars=12, seed=5, logprobs=2)
        stream = engine.submit(["I bought "], params, n=2)
        for _ in range(6):  # the loop is not reading: six steps' events wait in the queue
            engine.deliver(engine.core.step())
        await asyncio.sleep(0)  # call_soon_threadsafe's callbacks run
        seen = []
        async for ev in stream:
            seen.append(ev)
            if len(seen) == 1:
                while engine.core.has_work():
                    engine.deliver(engine.core.step())
        return seen, stream.jobs[0]

    seen, job = asyncio.run(main())
    first = seen[0]
    assert first.started and [d.index for d in first.deltas] == [0, 1]
    assert all(len(d.text) == 6 and d.offset == 0 for d in first.deltas)  # a char per step, from the first
    texts, lps = ["", ""], [[], []]
    for ev in seen:
        for d in ev.deltas:
            assert d.offset == len(texts[d.index])
            texts[d.index] += d.text
            lps[d.index] += d.logprobs.token_logprobs
    ref = sampler.generate(["I bought "], job.params, n=2)[0]
    assert texts == [c.text for c in ref]
    assert lps == [c.logprobs.token_logprobs for c in ref]
    assert seen[-1].done and sorted(i for ev in seen for i, _ in ev.finished) == [0, 1]
