"""The serving engine: continuous batching over `sample.Sampler` in a step thread, with admission, a bounded
queue, deadlines, cancellation and typed errors. No Ray, no HTTP (serve.py maps the errors to statuses).

    request handler (asyncio)                      step thread (one per engine)
    -------------------------                      ----------------------------------------------------
    stream = engine.submit(prompts, params, n)     EngineCore.step():
      QueueFull / EngineStopped raised here,         deadlines -> RequestTimeout; cancelled jobs dropped
      before any response goes out                   admit waiting jobs while their rows fit max_rows
    async for event in stream:  <-- events --        one model call per sampler for every active row
      (closing the stream cancels its jobs)          events: started / text deltas / finished / done
                                                     (handed to each job's event loop, thread-safely)
                                                   prefill thread (Engine(prefill_thread=True)):
                                                     reads the prompts of admitted jobs (start_many)
                                                     while the step thread steps; they join the batch
                                                     at the next step
    async for over the stream: events already queued (the loop fell behind) come merged per job

`EngineCore` is the synchronous part (tests and benchmarks step it directly; it reads prompts inside
`step`); `Engine` adds the threads and the asyncio side. A prompt costs ~2-3 steps to read alone and
little more read with others (bench_serve's prefill row), and requests arriving one by one over HTTP
were each read alone: on the step thread that was a quarter of its time under 32 clients. Hence two
options: `prefill_thread` (read prompts beside the steps, not inside them) and `admit_hold_s` (hold a
new job briefly while rows are generating, so prompts arriving close together are read as one batch).
Their defaults are the best of bench/ab_serve.py's A/B.

New jobs start on the current sampler; after `set_sampler` (hot reload) jobs already running finish on
the sampler they started with, so a reload fails no request.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from raylstm.sample import Completion, Prompt, Row, SampleParams, Sampler, TokenLogprobs, best_completions

log = logging.getLogger("ray.serve")


# --- errors -----------------------------------------------------------------------------------------------
class EngineError(Exception):
    """Why a request was not (fully) served. serve.py maps each kind to an HTTP status."""


class QueueFull(EngineError):
    """More requests are waiting than the engine may queue: retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(EngineError):
    """The request's deadline passed (while queued or generating); its rows were freed."""


class EngineStopped(EngineError):
    """The engine is shutting down and takes no new requests."""


class GenerationFailed(EngineError):
    """The model step raised (a device or model error); every request in flight fails with it."""


# --- jobs and events --------------------------------------------------------------------------------------
_job_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One prompt of a request: n samples (best_of > n: that many run, the best n are kept)."""

    prompt: str | list[int]  # text, or character ids (OpenAI's token-id prompts)
    params: SampleParams
    n: int = 1
    best_of: int | None = None
    index: int = 0  # which prompt of its request
    stream: bool = True  # per-step deltas; False: only the final event (a non-streamed response)
    id: int = field(default_factory=lambda: next(_job_ids))
    rows: list[Row] = field(default_factory=list)
    prompt_info: Prompt | None = None
    sampler: Sampler | None = None
    error: BaseException | None = None
    cancelled: bool = False
    submitted: float = 0.0  # time.monotonic() at submit
    deadline: float | None = None
    first_char_at: float | None = None
    # Where events go: the request handler's queue, on its event loop (set by Engine.submit).
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None

    @property
    def width(self) -> int:
        return max(self.n, self.best_of or self.n)

    @property
    def streams(self) -> bool:
        """Rows are final as they go (no best_of ranking at the end): their text can be streamed."""
        return self.width == self.n

    @property
    def finished(self) -> bool:
        return self.error is not None or (bool(self.rows) and all(r.finished for r in self.rows))

    def completions(self) -> list[Completion]:
        return best_completions([r.result() for r in self.rows], self.n)


@dataclass
class Delta:
    index: int  # which sample
    offset: int  # where `text` starts in that sample's text
    text: str
    logprobs: TokenLogprobs | None = None


@dataclass
class Event:
    """What one engine step produced for a job: new text per sample, and samples that just finished."""

    job: Job
    started: bool = False
    deltas: list[Delta] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)  # (index, finish_reason)
    done: bool = False


class StepObserver(Protocol):
    """What the engine reports as it goes (serve.py's Prometheus metrics implement it)."""

    def on_step(self, seconds: float, rows: int, active_rows: int, waiting: int) -> None:
        """One step took `seconds` and generated one character for each of `rows` rows."""

    def on_first_char(self, seconds: float) -> None:
        """A request's first character came `seconds` after it was submitted."""


# --- the synchronous core ---------------------------------------------------------------------------------
class EngineCore:
    """Steps every active row together, admitting waiting jobs between steps (continuous batching).

    `max_rows` caps the rows in one model step (the batch size): waiting jobs are admitted in order when
    their rows fit (a job wider than the cap runs alone). `max_queued` caps what waits for a slot, in
    rows beyond the free ones (0 = no cap): past it `submit` raises QueueFull at once. `timeout_s` is
    each job's deadline from submit (0 = none). `submit` and `cancel` may be called from any thread; `step` runs in one thread.
    """

    def __init__(
        self,
        sampler: Sampler,
        max_rows: int = 32,
        max_queued: int = 0,
        timeout_s: float = 0.0,
        retry_after_s: float = 1.0,
        admit_hold_s: float = 0.0,
    ) -> None:
        self.sampler = sampler
        self.max_rows = max(1, int(max_rows))
        # Prompts read together cost far less than one by one (a batch-1 read streams the weights once
        # per character: bench_serve's prefill row). While other rows are generating, a waiting job is
        # held up to admit_hold_s for others to arrive, unless the waiting ones already fill the free rows.
        self.admit_hold_s = max(0.0, float(admit_hold_s))
        self.max_queued = max(0, int(max_queued))
        self.timeout_s = float(timeout_s)
        self.retry_after_s = float(retry_after_s)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        # Prefill off the step thread (Engine): jobs taken from `waiting` by take_admissible() are
        # `reserved` (their rows count against max_rows) until step() moves them from `ready` to active.
        self.prefill_in_step = True
        self.ready: list[Job] = []
        self.reserved_rows = 0
        self._lock = threading.Lock()
        self.closed = False
        self.steps = 0
        self.rows_stepped = 0

    def set_sampler(self, sampler: Sampler) -> None:
        self.sampler = sampler

    @property
    def active_rows(self) -> int:
        return sum(len(j.rows) for j in self.active)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue the jobs of one request, all or none."""
        now = time.monotonic()
        with self._lock:
            if self.closed:
                raise EngineStopped("the server is shutting down: no new requests")
            # Rows the next step admits (free ones) are not queued: only what waits beyond them counts.
            free = max(0, self.max_rows - self.active_rows - self.reserved_rows)
            rows = sum(j.width for j in self.waiting) + sum(j.width for j in jobs)
            if self.max_queued and rows - free > self.max_queued:
                raise QueueFull(
                    f"{len(self.waiting)} requests are already waiting (the cap is {self.max_queued}): "
                    f"retry in {self.retry_after_s:g} s",
                    self.retry_after_s,
                )
            for j in jobs:
                j.submitted = now
                j.deadline = now + self.timeout_s if self.timeout_s > 0 else None
            self.waiting.extend(jobs)

    def cancel(self, jobs: Sequence[Job]) -> None:
        """The client went away: its rows are dropped at the next step (waiting ones at once)."""
        with self._lock:
            for j in jobs:
                j.cancelled = True
            if any(j in self.waiting for j in jobs):
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.active) or self.reserved_rows > 0

    def steppable(self) -> bool:
        """step() has something to do without reading a prompt (prefill on its own thread)."""
        return bool(self.active) or bool(self.ready) or (self.prefill_in_step and bool(self.waiting))

    def _expire(self, now: float) -> list[Event]:
        events = []
        with self._lock:
            for queue in (self.waiting, self.active):
                for job in queue:
                    if job.deadline is not None and now > job.deadline and job.error is None:
                        where = "generating" if job.rows else "waiting for a batch slot"
                        job.error = RequestTimeout(
                            f"request timed out after {now - job.submitted:.1f} s ({where}); "
                            f"the limit is {self.timeout_s:g} s"
                        )
                        events.append(Event(job, done=True))
            if events:
                self.waiting = collections.deque(j for j in self.waiting if j.error is None)
        self.active = [j for j in self.active if j.error is None]
        return events

    def take_admissible(self) -> list[Job]:
        """Take waiting jobs in order while their rows fit beside the active and reserved ones (a job
        wider than max_rows goes alone); with prefill off the step thread, their rows are reserved."""
        admitted: list[Job] = []
        with self._lock:
            rows = self.active_rows + self.reserved_rows
            if self._holding(rows):
                return admitted
            while self.waiting:
                job = self.waiting[0]
                if rows and rows + job.width > self.max_rows:
                    break
                self.waiting.popleft()
                if not job.cancelled:
                    admitted.append(job)
                    rows += job.width
            if not self.prefill_in_step:
                self.reserved_rows += sum(j.width for j in admitted)
        return admitted

    def _holding(self, rows: int) -> bool:
        """Keep waiting jobs back a little (admit_hold_s) so that prompts arriving close together are
        read in one batch; never when nothing else is generating, or when they already fill the batch."""
        if not (self.admit_hold_s and rows and self.waiting):
            return False
        if time.monotonic() - self.waiting[0].submitted >= self.admit_hold_s:
            return False
        return sum(j.width for j in self.waiting) < self.max_rows - rows

    def hold_left(self) -> float | None:
        """Seconds until the waiting jobs' hold ends; None when they are not held."""
        with self._lock:
            if not self._holding(self.active_rows + self.reserved_rows):
                return None
            return max(0.0, self.admit_hold_s - (time.monotonic() - self.waiting[0].submitted))

    def prefill(self, admitted: list[Job]) -> None:
        """Read the prompts of jobs from take_admissible() and hand them to the step thread (`ready`);
        a job this model cannot serve, or a failing model, sets its error. Runs on the prefill thread."""
        try:
            self._start(admitted)
        except Exception as e:  # a device or model error: these jobs fail, the engine keeps serving
            log.exception("raylstm: reading a prompt failed")
            for job in admitted:
                job.error = job.error or GenerationFailed(f"generation failed: {type(e).__name__}: {e}")
        with self._lock:
            self.ready.extend(admitted)

    def _join_ready(self) -> list[Event]:
        with self._lock:
            ready, self.ready = self.ready, []
            self.reserved_rows -= sum(j.width for j in ready)
            for job in ready:
                if job.error is None and not job.cancelled:
                    self.active.append(job)
        return [Event(job, started=job.error is None, done=job.error is not None) for job in ready]

    def _admit(self) -> list[Event]:
        """Take waiting jobs in order while their rows fit; start them together (one batched prefill
        per prompt length), or one by one when one of them is bad for this model."""
        admitted = self.take_admissible()
        if not admitted:
            return []
        self._start(admitted)
        events = []
        for job in admitted:
            if job.error is not None:
                events.append(Event(job, done=True))
                continue
            self.active.append(job)
            events.append(Event(job, started=True))
        return events

    def _start(self, admitted: list[Job]) -> None:
        """Read the prompts: job.rows, prompt_info and sampler set, or job.error for a bad one."""
        sampler = self.sampler
        try:
            started = sampler.start_many([(self._prompt(sampler, j), j.params, j.width) for j in admitted])
        except ValueError:  # SampleParamError: find it, start the others
            started = []
            for job in admitted:
                try:
                    started.append(sampler.start(self._prompt(sampler, job), job.params, job.width))
                except ValueError as e:
                    job.error = e
                    started.append([])
        for job, job_rows in zip(admitted, started):
            if job.error is None:
                job.rows, job.prompt_info, job.sampler = job_rows, job_rows[0].prompt, sampler

    @staticmethod
    def _prompt(sampler: Sampler, job: Job) -> str | Prompt:
        return sampler.prompt_from_ids(job.prompt) if isinstance(job.prompt, list) else job.prompt

    def step(self) -> list[Event]:
        """Expire, admit what fits, advance every active row by one character, report what changed."""
        events = {e.job.id: e for e in self._expire(time.monotonic())}
        events.update({e.job.id: e for e in (self._admit() if self.prefill_in_step else self._join_ready())})
        by_sampler: dict[int, tuple[Sampler, list[Row]]] = {}
        active = []
        for job in self.active:
            if job.cancelled:
                continue
            active.append(job)
            if job.sampler is not None:
                rows = by_sampler.setdefault(id(job.sampler), (job.sampler, []))[1]
                rows.extend(r for r in job.rows if r.finish_reason is None)
        for sampler, rows in by_sampler.values():
            if rows:
                sampler.step(rows)
                self.steps += 1
                self.rows_stepped += len(rows)
        still = []
        for job in active:
            ev = events.get(job.id)
            if job.stream and job.streams:  # per-step deltas; a non-streamed job hears only its end
                ev = ev or Event(job)
                for r in job.rows:
                    offset, text = r.take_delta()
                    if text:
                        ev.deltas.append(
                            Delta(r.index, offset, text, r.logprobs_slice(offset, offset + len(text)))
                        )
                    if r.finished and not r.reported:
                        r.reported = True
                        ev.finished.append((r.index, r.finish_reason or "length"))
            if job.finished:
                ev = ev or Event(job)
                ev.done = True
            else:
                still.append(job)
            if ev is not None and (ev.started or ev.deltas or ev.finished or ev.done):
                events[job.id] = ev
        self.active = still
        return list(events.values())

    def fail_all(self, error: BaseException) -> list[Event]:
        """Every job in flight fails with `error` (the step raised): report them done, keep serving."""
        with self._lock:
            jobs = list(self.active) + list(self.waiting) + self.ready
            self.reserved_rows -= sum(j.width for j in self.ready)
            self.active, self.waiting, self.ready = [], collections.deque(), []
        for job in jobs:
            job.error = error
        return [Event(job, done=True) for job in jobs]


# --- the asyncio side -------------------------------------------------------------------------------------
def coalesce(events: list[Event]) -> list[Event]:
    """Consecutive events merged per job (started, text and logprobs joined per sample, finishes kept
    in order), in the order the jobs first appear; a failed job's event ends the list (it raises)."""
    out: dict[int, Event] = {}
    for ev in events:
        if ev.job.error is not None:
            return [*out.values(), ev]
        into = out.get(ev.job.id)
        if into is None:
            deltas = [Delta(d.index, d.offset, d.text, d.logprobs) for d in ev.deltas]  # ours to extend
            out[ev.job.id] = Event(ev.job, ev.started, deltas, list(ev.finished), ev.done)
            continue
        into.started |= ev.started
        for d in ev.deltas:
            last = next((x for x in reversed(into.deltas) if x.index == d.index), None)
            if last is not None and last.offset + len(last.text) == d.offset:
                last.text += d.text
                if last.logprobs is not None and d.logprobs is not None:
                    last.logprobs = TokenLogprobs(
                        last.logprobs.token_logprobs + d.logprobs.token_logprobs,
                        last.logprobs.top_logprobs + d.logprobs.top_logprobs,
                    )
            else:
                into.deltas.append(Delta(d.index, d.offset, d.text, d.logprobs))
        into.finished += ev.finished
        into.done |= ev.done
    return list(out.values())


class Stream:
    """The events of one request's jobs; iterate with `async for`. Leaving early (the client went away)
    cancels the jobs. A failed job raises its typed error from the iteration."""

    def __init__(self, engine: Any, jobs: list[Job], queue: asyncio.Queue) -> None:
        self.engine, self.jobs, self._queue = engine, jobs, queue

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Events as they come; when several steps' events are already queued (the event loop was
        busy), they come merged, one per job, so a streamed response writes one chunk for them."""
        pending = len(self.jobs)
        try:
            while pending:
                ready = [await self._queue.get()]
                while not self._queue.empty():
                    ready.append(self._queue.get_nowait())
                for ev in coalesce(ready):
                    if ev.job.error is not None:
                        raise ev.job.error
                    if ev.done:
                        pending -= 1
                    yield ev
        finally:
            self.close()

    def close(self) -> None:
        unfinished = [j for j in self.jobs if not j.finished]
        if unfinished:
            self.engine.cancel(unfinished)

    async def collect(self) -> list[Job]:
        """Run to the end (non-streamed responses)."""
        async for _ in self:
            pass
        return self.jobs


class ServingEngine(Protocol):
    """What a replica and its routes use of an engine: `Engine` (a step thread in the replica) and
    `engine_process.ProcessEngine` (the engine in a child process) both are one."""

    @property
    def sampler(self) -> Sampler: ...

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 10.0) -> None: ...

    def submit(
        self,
        prompts: Sequence[str | list[int]],
        params: SampleParams,
        n: int = 1,
        best_of: int | None = None,
        stream: bool = True,
    ) -> Stream: ...

    def cancel(self, jobs: Sequence[Job]) -> None: ...

    async def reload(self, sampler: Sampler) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Engine:
    """An EngineCore stepped by its own thread, its prompts read by another, fed from asyncio handlers."""

    def __init__(
        self,
        sampler: Sampler,
        max_rows: int = 32,
        max_queued: int = 0,
        timeout_s: float = 0.0,
        retry_after_s: float = 1.0,
        observer: StepObserver | None = None,
        *,
        prefill_thread: bool = False,
        admit_hold_s: float = 0.01,
    ) -> None:
        self.core = EngineCore(sampler, max_rows, max_queued, timeout_s, retry_after_s, admit_hold_s)
        # With a prefill thread, prompts are read while the batch steps; without, inside step().
        self.core.prefill_in_step = not prefill_thread
        self.observer = observer
        self._wake = threading.Condition()  # both threads wait on it: new work, freed rows, stop
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._prefill_thread: threading.Thread | None = None

    @property
    def sampler(self) -> Sampler:
        return self.core.sampler

    def set_sampler(self, sampler: Sampler) -> None:
        self.core.set_sampler(sampler)

    async def reload(self, sampler: Sampler) -> None:
        """New jobs start on `sampler` from now on (the interface engine_process.ProcessEngine shares)."""
        self.set_sampler(sampler)

    def cancel(self, jobs: Sequence[Job]) -> None:
        self.core.cancel(jobs)

    def stats(self) -> dict[str, Any]:
        """What /v1/model reports of the engine: rows generating, jobs waiting, steps and rows stepped."""
        core = self.core
        return {
            "active_rows": core.active_rows,
            "waiting": len(core.waiting),
            "steps": core.steps,
            "rows_stepped": core.rows_stepped,
            "engine_pid": None,
        }

    @property
    def alive(self) -> bool:
        threads = [self._thread] + ([] if self.core.prefill_in_step else [self._prefill_thread])
        return all(t is not None and t.is_alive() for t in threads)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raylstm-step", daemon=True)
            self._thread.start()
            if not self.core.prefill_in_step:
                self._prefill_thread = threading.Thread(
                    target=self._prefill, name="raylstm-prefill", daemon=True
                )
                self._prefill_thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """No new requests; the thread finishes what is in flight (up to timeout_s), then exits."""
        self.core.closed = True
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in (self._thread, self._prefill_thread):
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))

    def submit(
        self,
        prompts: Sequence[str | list[int]],
        params: SampleParams,
        n: int = 1,
        best_of: int | None = None,
        stream: bool = True,
    ) -> Stream:
        """Queue one request (one job per prompt). Raises QueueFull/EngineStopped at once, before the
        caller has sent anything, so the HTTP layer can still answer 429/503."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [
            Job(p, params, n, best_of, index=i, stream=stream, loop=loop, queue=queue)
            for i, p in enumerate(prompts)
        ]
        self.core.submit(jobs)
        with self._wake:
            self._wake.notify_all()
        return Stream(self, jobs, queue)

    def _prefill(self) -> None:
        core = self.core
        while True:
            with self._wake:
                while not (jobs := core.take_admissible()):
                    if self._stopping and not core.waiting:
                        return
                    # Woken by submit and by steps that free rows; a held job when its hold ends.
                    left = core.hold_left()
                    self._wake.wait(0.5 if left is None else max(left, 0.001))
            core.prefill(jobs)
            with self._wake:
                self._wake.notify_all()

    def deliver(self, events: list[Event]) -> None:
        """Hand a step's events to their requests' event loops (one wake-up per loop, not per request)."""
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}
        for ev in events:
            job = ev.job
            if job.first_char_at is None and job.rows and job.rows[0].n_chars:
                job.first_char_at = now
                if self.observer is not None:
                    self.observer.on_first_char(now - job.submitted)
            if job.loop is not None and job.queue is not None:
                by_loop.setdefault(job.loop, []).append((job.queue, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed (the replica is going away): nobody to tell
                log.debug("raylstm: %d events for a closed event loop dropped", len(items))

    def _run(self) -> None:
        core = self.core
        while True:
            with self._wake:
                while not core.steppable():
                    if self._stopping and not core.has_work():
                        return
                    self._wake.wait(0.5)  # woken by the prefill thread's ready jobs and by stop
            t0 = time.perf_counter()
            rows_before = core.rows_stepped
            try:
                events = core.step()
            except Exception as e:  # a device or model error: fail what is in flight, keep serving
                log.exception("raylstm: generation step failed")
                events = core.fail_all(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
            seconds = time.perf_counter() - t0
            self.deliver(events)
            if core.waiting and any(ev.done for ev in events):  # rows freed: the prefill thread may admit
                with self._wake:
                    self._wake.notify_all()
            if self.observer is not None:
                rows = core.rows_stepped - rows_before
                self.observer.on_step(seconds, rows, core.active_rows, len(core.waiting))


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)
