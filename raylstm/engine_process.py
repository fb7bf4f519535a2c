"""The engine in its own process (vLLM V1's split): the model and the step loop run outside the replica's
GIL, and the replica's event loop only does HTTP and routes each request's events. No Ray, no HTTP.

    replica process (asyncio, FastAPI)                 engine process (python -m raylstm.engine_process)
    ---------------------------------------            --------------------------------------------------
    ProcessEngine.submit: admission bound (QueueFull)  EngineCore, stepped in a loop:
      and EngineStopped here, before any response        drain the pipe: submit / cancel / load / stop
      ("submit", [job specs]) ------------------->       step(): deadlines, admission, one model call
    Stream.close -> ("cancel", [ids]) ----------->       ("step", [events], stats) once per step with
    reload -> ("load", path) -------------------->         events (or every few steps: the metrics)
    <---------------- ("loaded", ref) / ("load_failed", error)
    reader (loop.add_reader on the pipe):
      events -> each request's queue (RemoteJob);
      stats -> the replica's ServeMetrics (/metrics)

Messages are pickled tuples over a socketpair (multiprocessing.connection framing) between this replica
and the child it started: never data from disk or HTTP. The child dies with the replica: it gets
PR_SET_PDEATHSIG SIGKILL (Linux), and it exits at the pipe's EOF (the replica's end closes when the
replica process dies, however it dies). The replica keeps its own Sampler of the served checkpoint for
what the routes read without generating (validation, /v1/model, /v1/classify); the child loads its own.
The child's CPU time is outside Ray's accounting of the replica's num_cpus.

The admission bound is the in-process one read from the replica's side: there, a request is refused
when the rows waiting beyond the free ones would pass max_queued, i.e. when every row not yet finished
(active + waiting) plus the new ones pass max_rows + max_queued; the replica knows that count exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

from raylstm.engine import (
    Delta,
    EngineCore,
    EngineStopped,
    Event,
    GenerationFailed,
    Job,
    QueueFull,
    StepObserver,
    Stream,
)
from raylstm.sample import Completion, SampleParams, Sampler

log = logging.getLogger("ray.serve")

# The child flushes its step metrics at least every this many steps when no event goes out.
STATS_EVERY_STEPS = 16
START_TIMEOUT_S = 300.0


# --- what the replica holds of a job run in the engine process -------------------------------------------
@dataclass(frozen=True)
class VocabRef:
    fp: str

    def fingerprint(self) -> str:
        return self.fp


@dataclass(frozen=True)
class SamplerRef:
    """What the routes read of the sampler a job ran on (the sampler itself is in the engine process)."""

    path: Path | None
    step_number: int | None
    vocab: VocabRef


def sampler_ref(s: Sampler) -> SamplerRef:
    return SamplerRef(s.path, s.step_number, VocabRef(s.vocab.fingerprint()))


@dataclass
class RowRef:
    """What the routes read of a row: its seed and sample index."""

    seed: int
    index: int
    n_chars: int = 0


@dataclass(eq=False)
class RemoteJob(Job):
    """A Job whose rows run in the engine process; the reader fills it in from the child's events."""

    done: bool = False
    results: list[Completion] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done

    def completions(self) -> list[Completion]:
        return self.results


# --- the replica's side -----------------------------------------------------------------------------------
class ProcessEngine:
    """Engine's interface (submit / cancel / reload / stats / stop), its EngineCore in a child process."""

    def __init__(
        self,
        sampler: Sampler,
        max_rows: int = 32,
        max_queued: int = 0,
        timeout_s: float = 0.0,
        retry_after_s: float = 1.0,
        observer: StepObserver | None = None,
        *,
        admit_hold_s: float = 0.01,
        device: str = "cpu",
        torch_threads: int = 1,
        gc_freeze: bool = False,
        nice: int = 0,
    ) -> None:
        if sampler.path is None:
            raise ValueError("the engine process loads its model from a checkpoint: the sampler has no path")
        self._sampler = sampler
        self.max_rows, self.max_queued = max(1, int(max_rows)), max(0, int(max_queued))
        self.retry_after_s = float(retry_after_s)
        self.observer = observer
        self._init = {
            "path": str(sampler.path),
            "device": device,
            "max_rows": self.max_rows,
            "timeout_s": float(timeout_s),
            "admit_hold_s": float(admit_hold_s),
            "torch_threads": int(torch_threads),
            "gc_freeze": bool(gc_freeze),
            "nice": int(nice),
        }
        self.jobs: dict[int, RemoteJob] = {}  # submitted, not yet done: the admission bound counts them
        self.outstanding_rows = 0
        self.closed = False
        self.dead: str | None = None  # why the engine process is gone
        self.active_rows = self.waiting = self.steps = self.rows_stepped = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loads: dict[str, asyncio.Future] = {}

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait until it has loaded its model (a replica is not ready before);
        then read its messages on the running event loop."""
        if self._proc is not None:
            return
        ours, theirs = Pipe(duplex=True)
        env = dict(os.environ)
        # The child imports raylstm as this process does (an installed package, or a Ray working_dir).
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        # Spawned from the replica's event-loop thread: PR_SET_PDEATHSIG fires when the thread that
        # started the child exits, and that thread lives as long as the replica.
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raylstm.engine_process",
                str(theirs.fileno()),
                str(os.getpid()),
            ],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self._conn = ours
        ours.send(("init", self._init))
        if not ours.poll(START_TIMEOUT_S):
            self._kill()
            raise RuntimeError(f"raylstm: the engine process did not load within {START_TIMEOUT_S:.0f} s")
        kind, payload = ours.recv()
        if kind != "ready":
            self._kill()
            raise RuntimeError(f"raylstm: the engine process failed to start: {payload}")
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._on_readable)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self.dead is None and self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """No new requests; the engine process finishes what is in flight (up to timeout_s), then exits."""
        self.closed = True
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send(("stop",))
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("raylstm: the engine process did not stop within %.0f s: killed", timeout_s)
            self._kill()
        self._close_reader()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def _close_reader(self) -> None:
        if self._loop is not None and self._conn is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):  # the loop may already be stopping (replica exit)
                self._loop.remove_reader(self._conn.fileno())
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- what the routes call ---------------------------------------------------------------------------
    @property
    def sampler(self) -> Sampler:
        """The replica's copy of the served checkpoint (validation, /v1/model, /v1/classify)."""
        return self._sampler

    def submit(
        self,
        prompts: Sequence[str | list[int]],
        params: SampleParams,
        n: int = 1,
        best_of: int | None = None,
        stream: bool = True,
    ) -> Stream:
        """Queue one request (one job per prompt); QueueFull / EngineStopped at once, as Engine does."""
        if self.closed or not self.alive:
            raise EngineStopped("the server is shutting down: no new requests")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [
            RemoteJob(p, params, n, best_of, index=i, stream=stream, loop=loop, queue=queue)
            for i, p in enumerate(prompts)
        ]
        rows = sum(j.width for j in jobs)
        if self.max_queued and self.outstanding_rows + rows > self.max_rows + self.max_queued:
            raise QueueFull(
                f"{self.waiting} requests are already waiting (the cap is {self.max_queued}): "
                f"retry in {self.retry_after_s:g} s",
                self.retry_after_s,
            )
        now = time.monotonic()  # CLOCK_MONOTONIC: the same clock in the child (deadlines, first char)
        for j in jobs:
            j.submitted = now
            self.jobs[j.id] = j
        self.outstanding_rows += rows
        self._send(("submit", [(j.id, j.prompt, params, n, best_of, j.index, stream, now) for j in jobs]))
        return Stream(self, jobs, queue)

    def cancel(self, jobs: Sequence[Job]) -> None:
        ids = []
        for j in jobs:
            j.cancelled = True
            if self.jobs.pop(j.id, None) is not None:
                self.outstanding_rows -= j.width
                ids.append(j.id)
        if ids:
            self._send(("cancel", ids))

    async def reload(self, sampler: Sampler) -> None:
        """The engine process loads `sampler`'s checkpoint beside the served one and swaps; returns once new
        jobs start on it (rows already generating finish on the old model, as in process)."""
        path = str(sampler.path)
        fut = self._loads.get(path)
        if fut is None:
            fut = self._loads[path] = asyncio.get_running_loop().create_future()
            self._send(("load", path))
        try:
            await fut
        finally:
            self._loads.pop(path, None)
        self._sampler = sampler

    def stats(self) -> dict[str, Any]:
        return {
            "active_rows": self.active_rows,
            "waiting": self.waiting,
            "steps": self.steps,
            "rows_stepped": self.rows_stepped,
            "engine_pid": self.pid,
        }

    def _send(self, msg: tuple) -> None:
        if self._conn is None:
            raise EngineStopped("the engine process is gone")
        try:
            self._conn.send(msg)
        except OSError as e:
            self._died(f"the engine process is gone ({e})")
            raise EngineStopped("the engine process is gone") from e

    # --- the reader -------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        conn = self._conn
        try:
            while conn is not None and conn.poll():
                self._dispatch(conn.recv())
        except (EOFError, OSError) as e:
            self._died(f"the engine process exited ({type(e).__name__}; exit code {self._proc.poll()})")

    def _died(self, why: str) -> None:
        """Every job in flight fails; check_health reports it and Serve replaces the replica."""
        if self.dead is not None:
            return
        self.dead = why
        log.error("raylstm: %s", why)
        self._close_reader()
        error = GenerationFailed(f"generation failed: {why}")
        for job in list(self.jobs.values()):
            job.error = error
            self._put(job, Event(job, done=True))
        self.jobs.clear()
        self.outstanding_rows = 0
        for fut in self._loads.values():
            if not fut.done():
                fut.set_exception(RuntimeError(why))

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._on_step(msg[1], msg[2])
        elif kind == "loaded":
            fut = self._loads.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "load_failed":
            fut = self._loads.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_exception(msg[2])

    def _on_step(self, events: list[tuple], stats: tuple) -> None:
        records, self.active_rows, self.waiting, ttfc, self.steps, self.rows_stepped = stats
        if self.observer is not None:
            for seconds, rows in records:
                self.observer.on_step(seconds, rows, self.active_rows, self.waiting)
            for seconds in ttfc:
                self.observer.on_first_char(seconds)
        for job_id, started, deltas, finished, done in events:
            job = self.jobs.get(job_id)
            if job is None:  # cancelled meanwhile
                continue
            ev = Event(job)
            if started is not None:
                job.prompt_info, seeds, job.sampler = started
                job.rows = [RowRef(seed, i) for i, seed in enumerate(seeds)]
                ev.started = True
            ev.deltas = [Delta(i, off, text, lp) for i, off, text, lp in deltas]
            ev.finished = finished
            if done is not None:
                error, results = done
                if error is not None:
                    job.error = error
                else:
                    job.results = [replace(c, prompt=job.prompt_info) for c in results]
                job.done = ev.done = True
                del self.jobs[job_id]
                self.outstanding_rows -= job.width
            self._put(job, ev)

    @staticmethod
    def _put(job: Job, ev: Event) -> None:
        if job.queue is None or job.loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if job.loop is running:
            job.queue.put_nowait(ev)
        elif not job.loop.is_closed():
            job.loop.call_soon_threadsafe(job.queue.put_nowait, ev)


# --- the engine process -----------------------------------------------------------------------------------
def _die_with_parent(ppid: int) -> None:
    """SIGKILL when the replica dies (Linux); and gone at once if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != ppid:
        os._exit(0)


def _wire(ev: Event, refs: dict[int, SamplerRef]) -> tuple:
    job = ev.job
    started = None
    if ev.started:
        s = job.sampler
        ref = refs.get(id(s)) or refs.setdefault(id(s), sampler_ref(s))
        started = (job.prompt_info, [r.seed for r in job.rows], ref)
    deltas = [(d.index, d.offset, d.text, d.logprobs) for d in ev.deltas]
    done = None
    if ev.done:
        if job.error is not None:
            done = (job.error, None)
        else:  # the prompt went with `started`: not again with every completion
            done = (None, [replace(c, prompt=None) for c in job.completions()])
    return (job.id, started, deltas, ev.finished, done)


class _Child:
    """The engine process's loop: read the pipe between steps, step, send the events and the metrics."""

    def __init__(self, conn: Connection, init: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(max(1, init["torch_threads"]))
        self.conn, self.device = conn, init["device"]
        sampler = Sampler.load(init["path"], self.device)
        self.core = EngineCore(
            sampler, init["max_rows"], 0, init["timeout_s"], 1.0, init["admit_hold_s"]
        )  # max_queued 0: the replica bounds the queue
        self.jobs: dict[int, Job] = {}
        self.refs: dict[int, SamplerRef] = {id(sampler): sampler_ref(sampler)}
        self.records: list[tuple[float, int]] = []
        self.ttfc: list[float] = []
        self.loaded: list[tuple[str, Sampler | BaseException]] = []  # from loading threads
        self.loading = 0
        self.stopping = False
        if init["nice"]:
            # Scheduling priority against the replica, the proxy and the clients on a full machine (a
            # negative value needs CAP_SYS_NICE): a measurement knob of bench/ab_serve.py.
            try:
                os.setpriority(os.PRIO_PROCESS, 0, init["nice"])
            except OSError as e:
                log.warning(
                    "raylstm: the engine process keeps its priority (nice %d refused: %s)", init["nice"], e
                )
        if init["gc_freeze"]:
            # The model and the imports are permanent: keep the collector from re-scanning them.
            gc.collect()
            gc.freeze()
        conn.send(("ready", self.refs[id(sampler)]))

    def run(self) -> None:
        core = self.core
        while True:
            if self.stopping and not core.has_work() and not self.loading:
                self._flush([])
                return
            idle = not core.steppable()
            try:
                if self.conn.poll((0.05 if self.loading else 0.5) if idle else 0):
                    while True:
                        self._handle(self.conn.recv())
                        if not self.conn.poll(0):
                            break
            except (EOFError, OSError):  # the replica is gone: so are its requests
                return
            self._swap_loaded()
            if not core.steppable():
                if self.records:
                    self._flush([])
                continue
            t0 = time.perf_counter()
            rows_before = core.rows_stepped
            try:
                events = core.step()
            except Exception as e:  # a device or model error: fail what is in flight, keep serving
                log.exception("raylstm: generation step failed")
                events = core.fail_all(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
            self.records.append((time.perf_counter() - t0, core.rows_stepped - rows_before))
            now = time.monotonic()
            for ev in events:
                job = ev.job
                if job.first_char_at is None and job.rows and job.rows[0].n_chars:
                    job.first_char_at = now
                    self.ttfc.append(now - job.submitted)
                if ev.done:
                    self.jobs.pop(job.id, None)
            if events or len(self.records) >= STATS_EVERY_STEPS:
                self._flush(events)

    def _flush(self, events: list[Event]) -> None:
        core = self.core
        stats = (self.records, core.active_rows, len(core.waiting), self.ttfc, core.steps, core.rows_stepped)
        self.conn.send(("step", [_wire(ev, self.refs) for ev in events], stats))
        self.records, self.ttfc = [], []

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            jobs = []
            for job_id, prompt, params, n, best_of, index, stream, _submitted in msg[1]:
                jobs.append(Job(prompt, params, n, best_of, index=index, stream=stream, id=job_id))
            try:
                self.core.submit(jobs)
            except EngineStopped as e:
                for j in jobs:
                    j.error = e
                self._flush([Event(j, done=True) for j in jobs])
                return
            for j, spec in zip(jobs, msg[1]):
                # The replica's submit time (the same monotonic clock): deadlines and first-char latency
                # count the pipe too.
                j.submitted = spec[-1]
                j.deadline = j.submitted + self.core.timeout_s if self.core.timeout_s > 0 else None
                self.jobs[j.id] = j
        elif kind == "cancel":
            jobs = [j for j in (self.jobs.pop(i, None) for i in msg[1]) if j is not None]
            self.core.cancel(jobs)
        elif kind == "load":
            self.loading += 1
            threading.Thread(target=self._load, args=(msg[1],), name="raylstm-load", daemon=True).start()
        elif kind == "stop":
            self.stopping = self.core.closed = True

    def _load(self, path: str) -> None:
        """Beside the steps (its torch work releases the GIL), as the in-process engine loads in a thread."""
        try:
            result: Sampler | BaseException = Sampler.load(path, self.device)
        except Exception as e:  # told to the replica, whose reconfigure raises it
            result = e
        self.loaded.append((path, result))

    def _swap_loaded(self) -> None:
        while self.loaded:
            path, result = self.loaded.pop(0)
            self.loading -= 1
            if isinstance(result, BaseException):
                self.conn.send(("load_failed", path, result))
                continue
            self.core.set_sampler(result)
            ref = self.refs[id(result)] = sampler_ref(result)
            # Samplers no job runs on any more are forgotten (their ids could be reused).
            live = {id(self.core.sampler)} | {id(j.sampler) for j in self.core.active}
            self.refs = {k: v for k, v in self.refs.items() if k in live}
            self.conn.send(("loaded", path, ref))


def main(argv: list[str] | None = None) -> int:
    """The child's entry: `python -m raylstm.engine_process FD PPID`, started only by ProcessEngine (not a
    user command, so no argparse: the CLI lives in cli.py alone, tests/test_cli_boundary.py)."""
    fd, ppid = (int(a) for a in (sys.argv[1:] if argv is None else argv))
    _die_with_parent(ppid)
    logging.basicConfig(level=logging.WARNING, format="raylstm engine %(process)d: %(message)s")
    conn = Connection(fd)
    try:
        kind, init = conn.recv()
        assert kind == "init", kind
        try:
            child = _Child(conn, init)
        except Exception as e:  # the replica's start() raises it
            conn.send(("failed", f"{type(e).__name__}: {e}"))
            return 1
        child.run()
    except (EOFError, OSError):  # the replica went away
        return 0
    return 0


if __name__ == "__main__":
    # Through the imported module, not __main__: what the child pickles must name raylstm.engine_process.
    from raylstm.engine_process import main as _main

    sys.exit(_main())
