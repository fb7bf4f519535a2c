"""Serving benchmark: Ray Serve with @serve.batch continuous batching on vs off, against the library.

One run, side by side, on one local Ray:
  * Serve, batching on  (max_batch_size=32: one model step serves up to 32 requests' rows)
  * Serve, batching off (max_batch_size=1: one model step per request per character)
  * the sampling library called directly, 32 prompts per generate() call and one at a time
  * sequential single requests over HTTP vs the same call in-process: Serve's per-request overhead
32 concurrent HTTP clients (asyncio + httpx) send fixed-size requests (prompt ~20 chars, REQ_CHARS new
characters, temperature 1, a distinct seed each). Model: the demo run's best checkpoint when present,
otherwise the default 2x512 CharLSTM with untrained weights (serving cost does not depend on the weights).

Rerun: .venv/bin/python -m bench.bench_serve
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CLIENTS = 32
REQ_CHARS = 80
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
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _load(url: str, total: int, clients: int) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    chars = 0
    counter = iter(range(total))

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors, chars
        for i in counter:
            body = {"prompt": PROMPT, "max_chars": REQ_CHARS, "temperature": 1.0, "seed": i}
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{url}/v1/generate", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                chars += len(r.json()["samples"][0]["text"])
            except httpx.HTTPError:
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {
        "requests": total,
        "errors": errors,
        "wall_s": wall,
        "rps": (total - errors) / wall,
        "cps": chars / wall,
        "p50_ms": 1e3 * _pct(lat, 0.5),
        "p99_ms": 1e3 * _pct(lat, 0.99),
    }


def _direct(ckpt: Path, total: int, batch: int) -> dict:
    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(ckpt)
    lat: list[float] = []
    chars = 0
    t0 = time.perf_counter()
    for start in range(0, total, batch):
        k = min(batch, total - start)
        params = [SampleParams(temperature=1.0, max_chars=REQ_CHARS, seed=start + j) for j in range(k)]
        t1 = time.perf_counter()
        out = sampler.generate([PROMPT] * k, params)
        lat += [time.perf_counter() - t1] * k
        chars += sum(len(g[0].text) for g in out)
    wall = time.perf_counter() - t0
    return {
        "requests": total,
        "errors": 0,
        "wall_s": wall,
        "rps": total / wall,
        "cps": chars / wall,
        "p50_ms": 1e3 * _pct(lat, 0.5),
        "p99_ms": 1e3 * _pct(lat, 0.99),
    }


def _sequential_overhead(url: str, ckpt: Path, n: int) -> tuple[float, float]:
    import httpx

    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(ckpt)
    http, direct = [], []
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            body = {"prompt": PROMPT, "max_chars": REQ_CHARS, "temperature": 1.0, "seed": i}
            t0 = time.perf_counter()
            c.post(f"{url}/v1/generate", json=body).raise_for_status()
            http.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sampler.complete(PROMPT, SampleParams(temperature=1.0, max_chars=REQ_CHARS, seed=i))
            direct.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(http), 1e3 * statistics.median(direct)


def run(out_dir: Path, quick: bool = False) -> str:
    import ray
    import torch
    from ray import serve

    from raylstm.config import ServeConfig
    from raylstm.serve import build_app, start_server

    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)  # as in the replicas; the driver's threads would fight Serve for 2 cores
    ckpt, what = _checkpoint(out_dir)
    # Batching off is ~10x slower per request, so it gets fewer requests (same 32 clients).
    n_on, n_off, n_direct, n_seq = (256, 64, 256, 8) if quick else (2048, 256, 1024, 20)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False
        )
    on_cfg = ServeConfig(max_batch_size=CLIENTS, batch_wait_timeout_s=0.01, reload_poll_s=0)
    off_cfg = ServeConfig(max_batch_size=1, batch_wait_timeout_s=0.0, reload_poll_s=0)
    handle = start_server(ckpt, on_cfg, port=free_port(), name="bench-on")
    try:
        serve.run(build_app(ckpt, off_cfg, token=""), name="bench-off", route_prefix="/off", blocking=False)
        url_on, url_off = handle.url, f"{handle.url}/off"
        asyncio.run(_load(url_on, 64, CLIENTS))  # warm-up: connections, first steps
        asyncio.run(_load(url_off, 8, 8))
        rows = {
            "Serve, batching on (max_batch_size=32)": asyncio.run(_load(url_on, n_on, CLIENTS)),
            "Serve, batching off (max_batch_size=1)": asyncio.run(_load(url_off, n_off, CLIENTS)),
        }
        seq_http, seq_direct = _sequential_overhead(url_on, ckpt, n_seq)
    finally:
        handle.shutdown()
        if started_ray:
            ray.shutdown()
    rows["library direct, 32 prompts per call"] = _direct(ckpt, n_direct, CLIENTS)
    rows["library direct, 1 prompt per call"] = _direct(ckpt, max(16, n_off // 4), 1)

    on, off = rows["Serve, batching on (max_batch_size=32)"], rows["Serve, batching off (max_batch_size=1)"]
    lib32, lib1 = rows["library direct, 32 prompts per call"], rows["library direct, 1 prompt per call"]
    lines = [
        "## Serving (Ray Serve, `@serve.batch` + continuous batching)",
        "",
        f"Model: {what}. Requests: {REQ_CHARS} new characters after a {len(PROMPT)}-character prompt, "
        f"temperature 1, distinct seeds; {CLIENTS} concurrent HTTP clients; one replica (0.5 CPU, 1 torch "
        f"thread); {os.cpu_count()} cores. Total HTTP requests: {on['requests'] + off['requests']}.",
        f"Host load average (1 min) {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end: other work "
        "on a shared host slows every row, so compare rows of the same run, not runs.",
        "",
        "| mode | requests | errors | requests/s | chars/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['cps']:.0f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    lines += [
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| Serve throughput, batching on / off (goal >= 10x) | {on['rps'] / off['rps']:.1f}x |",
        f"| Serve batched / library batched throughput | {on['rps'] / lib32['rps']:.2f} |",
        f"| Serve unbatched / library one-at-a-time throughput | {off['rps'] / lib1['rps']:.2f} |",
        f"| one request alone: HTTP p50 / in-process p50 | {seq_http:.0f} ms / {seq_direct:.0f} ms "
        f"(difference {seq_http - seq_direct:+.0f} ms) |",
        "",
        "Rerun: `.venv/bin/python -m bench.bench_serve` (quick: `run(out, quick=True)`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path("bench/out")
    md = run(out, quick="--quick" in sys.argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.md").write_text(md)
    print(md)
