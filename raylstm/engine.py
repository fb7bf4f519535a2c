"""Continuous batching over `sample.Sampler`: jobs join and leave between model steps. No Ray, no HTTP.

submit(jobs) (any thread) --> waiting --admit what fits max_rows--> active --step()--> Events
                                                                      (one model call per sampler)
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from raylstm.sample import Completion, Prompt, Row, SampleParams, Sampler, TokenLogprobs, best_completions


@dataclass(eq=False)
class Job:
    """One request: n samples of one prompt (best_of > n: that many run, the best n are kept)."""

    prompt: str
    params: SampleParams
    n: int = 1
    best_of: int | None = None
    rows: list[Row] = field(default_factory=list)
    prompt_info: Prompt | None = None
    sampler: Sampler | None = None
    error: str | None = None
    cancelled: bool = False

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


class Engine:
    """Steps every active row together, admitting waiting jobs between steps (continuous batching).

    `max_rows` caps the rows in one model step (the batch size): waiting jobs are admitted in order when
    their rows fit (a job larger than the cap runs alone). `submit` may be called from any thread;
    `step` runs in one thread. New jobs use the current sampler; after `set_sampler` (hot reload),
    rows already running finish on the sampler they started with.
    """

    def __init__(self, sampler: Sampler, max_rows: int = 32) -> None:
        self.sampler = sampler
        self.max_rows = max(1, int(max_rows))
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self._lock = threading.Lock()
        self.steps = 0
        self.rows_stepped = 0

    def set_sampler(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            self.waiting.extend(jobs)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.active)

    def _admit(self) -> list[Event]:
        events = []
        rows = sum(len(j.rows) for j in self.active)
        with self._lock:
            while self.waiting:
                job = self.waiting[0]
                if rows and rows + job.width > self.max_rows:
                    break
                self.waiting.popleft()
                if job.cancelled:
                    continue
                sampler = self.sampler
                try:
                    job.rows = sampler.start(job.prompt, job.params, job.width)
                    job.prompt_info = job.rows[0].prompt
                    job.sampler = sampler
                except (ValueError, RuntimeError) as e:
                    job.error = str(e)
                    events.append(Event(job, done=True))
                    continue
                rows += job.width
                self.active.append(job)
                events.append(Event(job, started=True))
        return events

    def step(self) -> list[Event]:
        """Admit what fits, advance every active row by one character, report what changed."""
        events = {id(e.job): e for e in self._admit()}
        self.active = [j for j in self.active if not j.cancelled]
        by_sampler: dict[int, tuple[Sampler, list[Row]]] = {}
        for job in self.active:
            rows = [r for r in job.rows if not r.finished]
            if rows and job.sampler is not None:
                by_sampler.setdefault(id(job.sampler), (job.sampler, []))[1].extend(rows)
        for sampler, rows in by_sampler.values():
            sampler.step(rows)
            self.steps += 1
            self.rows_stepped += len(rows)
        still = []
        for job in self.active:
            ev = events.get(id(job)) or Event(job)
            if job.streams:
                for r in job.rows:
                    offset, text = r.take_delta()
                    if text:
                        ev.deltas.append(
                            Delta(r.index, offset, text, r.logprobs_slice(offset, offset + len(text)))
                        )
                    if r.finished and not r.reported:
                        r.reported = True
                        ev.finished.append((r.index, r.finish_reason or "length"))
            ev.done = job.finished
            if ev.started or ev.deltas or ev.finished or ev.done:
                events[id(job)] = ev
            if not job.finished:
                still.append(job)
        self.active = still
        return list(events.values())
