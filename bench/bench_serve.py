"""Serving benchmark, one run on one local Ray, every row side by side:

  1. the step, in process (batch 32): the model call vs the sampling around it (temperature only;
     + top-k/top-p; + penalties and logit_bias; + logprobs=5; all of them); reading a prompt alone vs 32
     together (what a request costs before its first character)
  2. the sampling library called directly: Sampler.generate with 32 prompts per call (the batch Serve
     should reach), and the engine (EngineCore) kept full by 32 jobs, no HTTP
  3. Serve over HTTP at 1, 8 and 32 concurrent clients: requests/s, chars/s, p50/p99 latency, and from
     the replica's /metrics its rows per step, step time and how busy its step thread was; then the
     library again (how far the host drifted meanwhile)
  4. Serve with the engine in the replica process (the design before the engine process: a step thread
     sharing the replica's GIL; a bench-only subclass with other engine options), and with @serve.batch
     in front of the engine: 32 clients each
  5. overload: 64 clients against a replica of max_batch_size=8, max_queued=8: status counts
  6. a review-length request (LONG_CHARS new characters; an Amazon review is ~400-500): the library and
     Serve at 32 clients, so the per-request overhead shows amortised over 5x the steps

Requests: REQ_CHARS new characters after a 22-character prompt, temperature 1, a distinct seed each.
HTTP clients: asyncio coroutines, each on its own keep-alive connection, writing and reading the bytes
directly (they share the cores with Serve; httpx cost ~10x their CPU). Non-streamed /v1/generate.
Model: the demo run's best checkpoint when present, otherwise the default 2x512 CharLSTM with untrained
weights (the cost of serving does not depend on the weights). One replica, 1 torch thread, as deployed.

Rerun: .venv/bin/python -m bench.bench_serve   (quick: --quick; writes bench/out/serve.md)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CLIENTS = 32
REQ_CHARS = 80
LONG_CHARS = 400  # a review-length request (row 6)
PROMPT = "I bought these for my "


def _checkpoint(out_dir: Path) -> tuple[Path, str]:
    from raylstm.checkpoint import resolve_checkpoint, save_checkpoint
    from raylstm.config import Config
    from raylstm.model import build_model
    from raylstm.vocab import CharVocab

    demo = Path("runs/demo")
    newest_first = sorted(demo.glob("**/best.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for cand in newest_first if demo.exists() else []:
        try:
            return resolve_checkpoint(cand.parent), f"demo run best checkpoint ({cand.parent})"
        except ValueError:
            continue
    path = out_dir / "bench_serve_ckpt"
    if not path.exists():
        import torch

        torch.manual_seed(0)
        vocab = CharVocab([chr(c) for c in range(32, 127)] + ["\n"])
        cfg = Config()
        cfg.model.vocab_size = len(vocab)
        save_checkpoint(path, build_model(cfg.model).eval(), vocab, cfg, step=0, metrics={})
    m = Config().model
    return path, f"default CharLSTM {m.num_layers}x{m.hidden_size}, untrained weights (no demo run found)"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


# --- 1. the step ------------------------------------------------------------------------------------------
def prefill_costs(ckpt: Path, reps: int = 5) -> dict[int, float]:
    """{batch: ms} to read `batch` prompts together (Sampler.start_many), in process."""
    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(ckpt)
    params = SampleParams(temperature=1.0, max_chars=REQ_CHARS, seed=1)
    out = {}
    for b in (1, CLIENTS):
        sampler.start_many([(PROMPT, params, 1)] * b)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            sampler.start_many([(PROMPT, params, 1)] * b)
        out[b] = 1e3 * (time.perf_counter() - t0) / reps
    return out


def step_costs(ckpt: Path, reps: int) -> dict[str, tuple[float, float]]:
    """{variant: (model ms/step, sampling ms/step)} at batch CLIENTS, timed on the real Sampler.step.

    The model part is Sampler._forward (timed inside the step); sampling is the rest of the step:
    scores (mask, bias, penalties), log_softmax, the draw, top-k/top-p, logprobs, bookkeeping."""
    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(ckpt)
    V = len(sampler.vocab)
    variants = {
        "temperature only": SampleParams(temperature=1.0),
        "+ top-k 40, top-p 0.9, min_p 0.05": SampleParams(top_k=40, top_p=0.9, min_p=0.05),
        "+ penalties, logit_bias": SampleParams(
            presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={1: 1.0, V - 1: -2.0}
        ),
        "+ logprobs 5": SampleParams(logprobs=5),
        "all of them": SampleParams(
            top_k=40, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
            repetition_penalty=1.2, logit_bias={1: 1.0}, logprobs=5,
        ),
    }  # fmt: skip
    timing = {"model": 0.0}
    real_forward = sampler._forward

    def timed_forward(ids, state, *rows):  # rows: condition ids, steering values
        t0 = time.perf_counter()
        out = real_forward(ids, state, *rows)
        timing["model"] += time.perf_counter() - t0
        return out

    out = {}
    for name, base in variants.items():
        params = SampleParams(**{**base.__dict__, "max_chars": reps + 10, "seed": 1})
        rows = [r for g in sampler.start_many([(PROMPT, params, 1)] * CLIENTS) for r in g]
        sampler._forward = timed_forward
        for _ in range(5):
            sampler.step(rows)  # warm-up; the batch is built on the first step
        timing["model"] = 0.0
        t0 = time.perf_counter()
        for _ in range(reps):
            sampler.step(rows)
        total = time.perf_counter() - t0
        sampler._forward = real_forward
        model = timing["model"] / reps
        out[name] = (1e3 * model, 1e3 * (total / reps - model))
    return out


# --- 2. the library ---------------------------------------------------------------------------------------
def library(ckpt: Path, total: int, batch: int, chars_per_request: int = REQ_CHARS) -> dict:
    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(ckpt)
    lat: list[float] = []
    chars = 0
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        k = min(batch, total - start)
        params = [
            SampleParams(temperature=1.0, max_chars=chars_per_request, seed=start + j) for j in range(k)
        ]
        t1 = time.perf_counter()
        out = sampler.generate([PROMPT] * k, params)
        lat += [time.perf_counter() - t1] * k
        chars += sum(len(g[0].text) for g in out)
    wall = time.perf_counter() - t0
    return _row(total, 0, wall, chars, lat)


def engine_direct(ckpt: Path, total: int, width: int) -> dict:
    """EngineCore kept full: a new job joins as soon as one finishes (continuous batching, no HTTP)."""
    from raylstm.engine import EngineCore, Job
    from raylstm.sample import SampleParams, Sampler

    core = EngineCore(Sampler.load(ckpt), max_rows=width)
    sent, lat, chars, t_sub = 0, [], 0, {}

    def send() -> None:
        nonlocal sent
        job = Job(PROMPT, SampleParams(temperature=1.0, max_chars=REQ_CHARS, seed=sent))
        t_sub[job.id] = time.perf_counter()
        core.submit([job])
        sent += 1

    t0 = time.perf_counter()
    for _ in range(min(width, total)):
        send()
    done = 0
    while done < total:
        for ev in core.step():
            if ev.done:
                done += 1
                lat.append(time.perf_counter() - t_sub[ev.job.id])
                chars += len(ev.job.rows[0].text)
                if sent < total:
                    send()
    return _row(total, 0, time.perf_counter() - t0, chars, lat)


def _row(
    total: int, errors: int, wall: float, chars: int, lat: list[float], statuses: Counter | None = None
) -> dict:
    return {
        "requests": total,
        "errors": errors,
        "wall_s": wall,
        "rps": (total - errors) / wall,
        "cps": chars / wall,
        "p50_ms": 1e3 * _pct(lat, 0.5),
        "p99_ms": 1e3 * _pct(lat, 0.99),
        "statuses": statuses or Counter({200: total - errors}),
    }


# --- 3-5. Serve over HTTP ---------------------------------------------------------------------------------
async def http_load(url: str, total: int, clients: int, chars_per_request: int = REQ_CHARS) -> dict:
    """`clients` concurrent clients, each on its own keep-alive HTTP/1.1 connection, POSTing /v1/generate
    (non-streamed) until `total` requests are answered. The client is lean on purpose (bytes written and
    read with asyncio streams, one json.loads per answer): it shares the 2 cores with Serve, and the
    library rows pay for no client at all. httpx used ~10x the client CPU (bench/profile_serve.py)."""
    host, port, prefix = _split_url(url)
    lat: list[float] = []
    statuses: Counter = Counter()
    chars = 0
    counter = iter(range(total))

    async def client() -> None:
        nonlocal chars
        conn = None
        for i in counter:
            body = json.dumps(
                {"prompt": PROMPT, "max_chars": chars_per_request, "temperature": 1.0, "seed": i}
            )
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                async with asyncio.timeout(300):  # an overload must answer, not hang
                    status, data, close = await _post(
                        conn, host, port, f"{prefix}/v1/generate", body.encode()
                    )
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:  # TimeoutError is an OSError
                statuses[type(e).__name__] += 1
                conn = _close(conn)
                continue
            statuses[status] += 1
            if close:
                conn = _close(conn)
            if status != 200:
                continue
            chars += len(json.loads(data)["samples"][0]["text"])
            lat.append(time.perf_counter() - t0)
        _close(conn)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return _row(total, total - statuses[200], wall, chars, lat, statuses)


def _split_url(url: str) -> tuple[str, int, str]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")


def _close(conn: tuple | None) -> None:
    if conn is not None:
        conn[1].close()
    return None


async def _post(conn: tuple, host: str, port: int, path: str, body: bytes) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 POST on an open connection: (status, body, server closes the connection)."""
    reader, writer = conn
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("the server closed the connection")
    status = int(line.split()[1])
    length, chunked, close = 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding":
            chunked = "chunked" in value
        elif key == "connection":
            close = value == "close"
    if not chunked:
        return status, await reader.readexactly(length), close
    parts = []
    while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while (await reader.readline()) not in (b"\r\n", b""):  # trailers
        pass
    return status, b"".join(parts), close


async def library_client_load(
    total: int, clients: int, post: Callable[[dict], Awaitable[tuple[int, Any]]], errors: tuple = ()
) -> dict:
    """`clients` coroutines sharing `total` /v1/generate requests, each sent by `post(body) -> (status,
    parsed JSON body or None)`: one HTTP client library's call (httpx here, aiohttp in profile_serve).
    The exceptions in `errors` count by name, like a status."""
    lat: list[float] = []
    statuses: Counter = Counter()
    chars = 0
    counter = iter(range(total))

    async def client() -> None:
        nonlocal chars
        for i in counter:
            body = {"prompt": PROMPT, "max_chars": REQ_CHARS, "temperature": 1.0, "seed": i}
            t0 = time.perf_counter()
            try:
                status, data = await post(body)
            except errors as e:
                statuses[type(e).__name__] += 1
                continue
            statuses[status] += 1
            if status == 200:
                chars += len(data["samples"][0]["text"])
                lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return _row(total, total - statuses[200], wall, chars, lat, statuses)


async def httpx_load(url: str, total: int, clients: int) -> dict:
    """The same load from httpx.AsyncClient (the earlier bench's client; kept to measure its cost)."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:

        async def post(body: dict) -> tuple[int, Any]:
            r = await c.post(f"{url}/v1/generate", json=body)
            return r.status_code, r.json() if r.status_code == 200 else None

        return await library_client_load(total, clients, post, (httpx.HTTPError,))


def batched_deployment():
    """LSTMServer with @serve.batch in front of the engine's submit (bench only: measured, not shipped)."""
    from ray import serve

    from raylstm.serve import LSTMServer

    base = LSTMServer.func_or_class

    class SubmitBatched(base):
        async def __init__(self, *args, **kwargs) -> None:
            await super().__init__(*args, **kwargs)

        @serve.batch(max_batch_size=CLIENTS, batch_wait_timeout_s=0.01)
        async def _batched(self, requests: list[tuple]) -> list:
            return [self.engine.submit(*r) for r in requests]

        async def submit(self, prompts, params, n, best_of, stream):
            return await self._batched((prompts, params, n, best_of, stream))

    return serve.deployment(SubmitBatched, name="LSTMServerSubmitBatched")


# The engine as it was before the prefill A/B (bench/ab_serve.py): a step thread inside the replica,
# every prompt read inside the step as it came.
PREVIOUS_ENGINE = {"process": False, "prefill_thread": False, "admit_hold_s": 0.0}
# The deployed design before the engine process: in the replica, admission held up to 10 ms.
IN_PROCESS_ENGINE = {"process": False, "prefill_thread": False, "admit_hold_s": 0.010}


def variant_deployment(name: str, engine_options: dict):
    """LSTMServer with other engine options (raylstm.engine.Engine keywords): another design, same code."""
    from ray import serve

    from raylstm.serve import LSTMServer

    cls = type(
        f"LSTMServer_{name.replace('-', '_')}",
        (LSTMServer.func_or_class,),
        {"engine_options": engine_options},
    )
    return serve.deployment(cls, name=f"LSTMServer-{name}")


def deploy(dep, ckpt: Path, cfg, name: str) -> None:
    import dataclasses

    from ray import serve

    from raylstm.serve import deployment_options

    app = dep.options(**deployment_options(cfg)).bind(
        str(ckpt.resolve()), dataclasses.asdict(cfg), None, False
    )
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets) in /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def measured_load(url: str, total: int, clients: int, chars_per_request: int = REQ_CHARS) -> dict:
    """http_load plus what the replica's /metrics say about its step thread during the load."""
    m0 = fetch(f"{url}/metrics")
    r = asyncio.run(http_load(url, total, clients, chars_per_request))
    m1 = fetch(f"{url}/metrics")

    def d(name: str) -> float:
        return metric(m1, name) - metric(m0, name)

    steps = d("raylstm_step_seconds_count")
    r.update(
        steps=steps,
        step_ms=1e3 * d("raylstm_step_seconds_sum") / max(1, steps),
        rows_per_step=d("raylstm_chars_generated_total") / max(1, steps),
        busy=d("raylstm_step_seconds_sum") / r["wall_s"],
    )
    return r


def run(out_dir: Path, quick: bool = False) -> str:
    import ray
    import torch
    from ray import serve

    from raylstm.config import ServeConfig
    from raylstm.serve import build_app, start_server

    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    started = time.strftime("%H:%M", time.gmtime())
    torch.set_num_threads(1)  # as in the replicas; more threads would fight Serve for 2 cores
    ckpt, what = _checkpoint(out_dir)
    n_req, n_lib, reps = (128, 128, 40) if quick else (1024, 1024, 200)

    steps = step_costs(ckpt, reps)
    prefill = prefill_costs(ckpt)
    lib = library(ckpt, n_lib, CLIENTS)
    eng = engine_direct(ckpt, n_lib, CLIENTS)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False
        )
    cfg = ServeConfig(max_batch_size=CLIENTS, reload_poll_s=0, max_queued=4 * CLIENTS)
    tight = ServeConfig(max_batch_size=8, max_queued=8, reload_poll_s=0, retry_after_s=1)
    handle = start_server(ckpt, cfg, port=free_port(), name="bench")
    http: dict[int, dict] = {}
    try:
        url = handle.url
        asyncio.run(http_load(url, 64, CLIENTS))  # warm-up: connections, first steps
        for clients in (1, 8, CLIENTS):
            http[clients] = measured_load(url, max(16, n_req * clients // CLIENTS), clients)
        lib_after = library(ckpt, n_lib, CLIENTS)  # the library again right after: how far the host drifted
        previous = _serve_variant(
            ckpt, cfg, url, n_req, "inprocess", variant_deployment("inprocess", IN_PROCESS_ENGINE)
        )
        batched = _serve_variant(ckpt, cfg, url, n_req, "batched", batched_deployment())
        serve.run(build_app(ckpt, tight), name="tight", route_prefix="/tight", blocking=False)
        overload = asyncio.run(http_load(f"{url}/tight", max(64, n_req // 2), 2 * CLIENTS))
        serve.delete("tight")
        n_long = 64 if quick else 128
        long_lib = library(ckpt, n_long, CLIENTS, LONG_CHARS)
        long_serve = measured_load(url, n_long, CLIENTS, LONG_CHARS)
        long_lib_after = library(ckpt, n_long, CLIENTS, LONG_CHARS)
    finally:
        handle.shutdown()
        if started_ray:
            ray.shutdown()
    when = f"{started}-{time.strftime('%H:%M', time.gmtime())} UTC"
    long = (long_lib, long_serve, long_lib_after)
    return report(
        what,
        load_before,
        when,
        steps,
        prefill,
        lib,
        lib_after,
        eng,
        http,
        previous,
        batched,
        overload,
        long,
        quick,
    )


def _serve_variant(ckpt: Path, cfg, url: str, n_req: int, name: str, dep) -> dict:
    from ray import serve

    deploy(dep, ckpt, cfg, name)
    asyncio.run(http_load(f"{url}/{name}", 64, CLIENTS))  # warm-up
    out = measured_load(f"{url}/{name}", n_req, CLIENTS)
    serve.delete(name)
    return out


def report(
    what,
    load_before,
    when,
    steps,
    prefill,
    lib,
    lib_after,
    eng,
    http,
    previous,
    batched,
    overload,
    long,
    quick,
) -> str:
    from raylstm.config import ServeConfig
    from raylstm.engine import Engine
    from raylstm.engine_process import ProcessEngine

    s32 = http[CLIENTS]
    ratio = s32["rps"] / lib["rps"]
    if ServeConfig().engine_process:
        defaults = ProcessEngine.__init__.__kwdefaults__
        design = "in its own process (a child of the replica), prompts read inside the step"
    else:
        defaults = Engine.__init__.__kwdefaults__
        design = "a step thread in the replica, " + (
            "prompts read on a prefill thread beside the step thread"
            if defaults["prefill_thread"]
            else "prompts read inside the step"
        )
    design += (
        f", admission held up to {1e3 * defaults['admit_hold_s']:g} ms" if defaults["admit_hold_s"] else ""
    )
    lines = [
        "## Serving (Ray Serve: engine with continuous batching, OpenAI-compatible routes)",
        "",
        f"Model: {what}. Requests: {REQ_CHARS} new characters after a {len(PROMPT)}-character prompt, "
        f"temperature 1, distinct seeds, non-streamed. One replica (0.5 CPU, 1 torch thread, max_batch_size {CLIENTS}; "
        f"engine: {design}); "
        f"{os.cpu_count()} cores shared by the HTTP clients (lean asyncio ones, see the bench's docstring), "
        "Serve's proxy and the replica (with its engine process).",
        f"Host load average (1 min) {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end: compare rows "
        "of the same run, not runs.",
        "",
        "### Where a step's time goes (batch 32, in process)",
        "",
        "| sampling parameters | model ms/step | sampling ms/step | sampling / model |",
        "|---|---:|---:|---:|",
    ]
    for name, (m, smp) in steps.items():
        lines.append(f"| {name} | {m:.2f} | {smp:.3f} | {smp / m:.1%} |")
    step_ms = steps["temperature only"][0] + steps["temperature only"][1]
    lines += [
        "",
        f"Reading a {len(PROMPT)}-character prompt (start_many): alone {prefill[1]:.1f} ms "
        f"({prefill[1] / step_ms:.1f} steps of batch {CLIENTS}), {CLIENTS} together {prefill[CLIENTS]:.1f} ms "
        f"({prefill[CLIENTS] / CLIENTS:.2f} ms each).",
        "",
        "### Throughput and latency",
        "",
        "| mode | clients | requests | non-200 | requests/s | chars/s | p50 ms | p99 ms | replica: rows/step, ms/step, step thread busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        _line("library: Sampler.generate, 32 prompts per call", CLIENTS, lib),
        _line("library: EngineCore kept full (no HTTP)", CLIENTS, eng),
    ]
    for clients, r in http.items():
        lines.append(_line("Serve over HTTP", clients, r))
    lines.append(_line("library again, right after Serve's rows", CLIENTS, lib_after))
    lines.append(
        _line("Serve, the engine in the replica process (the design before; hold 10 ms)", CLIENTS, previous)
    )
    lines.append(_line("Serve, @serve.batch in front of the engine", CLIENTS, batched))
    long_lib, long_serve, long_lib_after = long
    lines.append(_line(f"library, {LONG_CHARS} new characters per request", CLIENTS, long_lib))
    lines.append(_line(f"Serve over HTTP, {LONG_CHARS} new characters per request", CLIENTS, long_serve))
    lines.append(_line(f"library again, {LONG_CHARS} new characters", CLIENTS, long_lib_after))
    long_ratio = long_serve["rps"] / ((long_lib["rps"] + long_lib_after["rps"]) / 2)
    lines += [
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| Serve / library throughput at 32 clients (goal >= 0.9) | {ratio:.2f} |",
        f"| the same against the library measured right after | {s32['rps'] / lib_after['rps']:.2f} |",
        f"| engine alone / library | {eng['rps'] / lib['rps']:.2f} |",
        f"| Serve / the engine in the replica process, 32 clients | {s32['rps'] / previous['rps']:.2f} |",
        f"| Serve with @serve.batch / Serve without | {batched['rps'] / s32['rps']:.2f} |",
        f"| Serve / library at {LONG_CHARS} new characters, 32 clients (the library before and after) | "
        f"{long_ratio:.2f} |",
        "",
        f"Overload: {2 * CLIENTS} clients against a replica with max_batch_size=8, max_queued=8: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(overload["statuses"].items(), key=str))
        + f" (of {overload['requests']}; p99 of the 200s {overload['p99_ms']:.0f} ms).",
        "",
        f"Measured in one run, {when}: `.venv/bin/python -m bench.bench_serve`"
        + (" --quick" if quick else "")
        + f" (writes bench/out/serve.md). Serve reaches **{ratio:.2f}** of the library at 32 clients: the goal"
        + (" (>= 0.9) is met." if ratio >= 0.9 else " of 0.9 is **not met**.")
        + f" In the replica the step thread was busy {s32['busy']:.0%} of the 32-client run, at "
        f"{s32['rows_per_step']:.1f} rows per step (of {CLIENTS}) and {s32['step_ms']:.2f} ms per step "
        f"(in process a batch-32 step takes {step_ms:.2f} ms and the library spends "
        f"{prefill[CLIENTS]:.0f} ms reading 32 prompts per {REQ_CHARS} steps).",
        "",
    ]
    return "\n".join(lines)


def _line(name: str, clients: int, r: dict) -> str:
    replica = f"{r['rows_per_step']:.1f}, {r['step_ms']:.2f}, {r['busy']:.0%}" if "busy" in r else ""
    return (
        f"| {name} | {clients} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['cps']:.0f} | "
        f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {replica} |"
    )


if __name__ == "__main__":
    out = Path("bench/out")
    md = run(out, quick="--quick" in sys.argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.md").write_text(md)
    print(md)
