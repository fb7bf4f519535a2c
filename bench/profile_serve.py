"""Where the CPU goes while Serve answers N concurrent clients, next to the library in the same run.

    .venv/bin/python -m bench.profile_serve [--clients 32] [--requests 512] [--client raw|aiohttp|httpx]
                                            [--pyspy DIR] [--threads 1]

Prints: the library's requests/s (Sampler.generate, 32 prompts per call), Serve's requests/s over HTTP,
the ratio; the replica's mean step time and rows per step during the load (from its /metrics); and the
CPU seconds each process of this Ray session (and each thread of the replica) used during the load.
With --pyspy DIR, py-spy records the replica and the proxy during the load (collapsed stacks in DIR,
the top self/inclusive frames printed). Serve env settings (RAY_SERVE_*) are taken from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.bench_serve import (  # noqa: E402
    CLIENTS,
    PROMPT,
    _checkpoint,
    fetch,
    free_port,
    http_load,
    httpx_load,
    library,
    library_client_load,
    metric,
)

TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _cpu(path: str) -> float:
    f = open(path).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def _name(pid: int) -> str:
    try:
        cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    except OSError:
        return "?"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for key in ("gcs_server", "raylet", "dashboard", "runtime_env", "log_monitor", "monitor.py"):
        if key in cmd:
            return key
    return "driver (clients)" if pid == os.getpid() else cmd[:40]


def snapshot(pids: list[int]) -> dict[tuple[int, str], float]:
    out = {}
    for p in pids:
        try:
            out[(p, _name(p))] = _cpu(f"/proc/{p}/stat")
        except OSError:
            pass
    return out


def threads(pid: int) -> dict[str, float]:
    out: Counter = Counter()
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            out[comm] += _cpu(f"/proc/{pid}/task/{t}/stat")
        except OSError:
            pass
    return dict(out)


async def aiohttp_load(url: str, total: int, clients: int) -> dict:
    import aiohttp

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:

        async def post(body: dict) -> tuple[int, Any]:
            async with s.post(f"{url}/v1/generate", json=body) as r:
                return r.status, await r.json() if r.status == 200 else None

        return await library_client_load(total, clients, post, (aiohttp.ClientError,))


def step_table(ckpt: Path) -> None:
    """In process: a decode step (Sampler.step) and a prompt prefill (start_many) at batch 1, 8, 32."""
    from raylstm.sample import SampleParams, Sampler

    sampler = Sampler.load(ckpt)
    for b in (1, 8, 32):
        params = SampleParams(temperature=1.0, max_chars=10_000, seed=1)
        t0 = time.perf_counter()
        for _ in range(5):
            rows = [r for g in sampler.start_many([(PROMPT, params, 1)] * b) for r in g]
        prefill = (time.perf_counter() - t0) / 5
        for _ in range(3):
            sampler.step(rows)
        t0 = time.perf_counter()
        for _ in range(30):
            sampler.step(rows)
        step = (time.perf_counter() - t0) / 30
        t0 = time.perf_counter()
        for _ in range(10):  # a changed row set each step: the batch is rebuilt (admission, finish)
            sampler._spill()
            sampler._batch = None
            sampler.step(rows)
        rebuilt = (time.perf_counter() - t0) / 10
        print(
            f"batch {b:2d}: prefill of a {len(PROMPT)}-char prompt {1e3 * prefill:6.2f} ms, "
            f"step {1e3 * step:6.2f} ms, step with a rebuilt batch {1e3 * rebuilt:6.2f} ms"
        )


LOADS = {"httpx": httpx_load, "raw": http_load, "aiohttp": aiohttp_load}


def summarize_pyspy(path: Path, top: int = 18) -> str:
    self_t: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"  {path.name}: {total} samples; self:"]
    out += [f"    {100 * v / total:5.1f}% {k}" for k, v in self_t.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * v / total:5.1f}% {k}" for k, v in incl.most_common(top + 12)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--client", choices=sorted(LOADS), default="raw")
    ap.add_argument("--pyspy", type=Path)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the replica (0: as deployed)")
    ap.add_argument("--max-batch", type=int, default=CLIENTS)
    ap.add_argument("--no-library", action="store_true")
    a = ap.parse_args()

    import ray
    import torch

    from raylstm.config import ServeConfig
    from raylstm.serve import start_server

    torch.set_num_threads(1)
    out = Path("bench/out")
    ckpt, what = _checkpoint(out)
    print(
        f"model: {what}; env: "
        + " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("RAY_SERVE"))
    )
    lib = None
    if not a.no_library:
        step_table(ckpt)
        lib = library(ckpt, 256, CLIENTS)
        print(f"library: {lib['rps']:.1f} req/s p50 {lib['p50_ms']:.0f} ms")
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False
    )
    cfg = ServeConfig(max_batch_size=a.max_batch, reload_poll_s=0, max_queued=4 * CLIENTS)
    if a.threads:
        cfg.num_cpus = float(a.threads)  # the replica sets torch threads from num_cpus
    handle = start_server(ckpt, cfg, port=free_port(), name="bench")
    url = handle.url
    load = LOADS[a.client]
    try:
        asyncio.run(load(url, 64, a.clients))
        pids = _tree(os.getpid())
        names = {p: _name(p) for p in pids}
        replica = next(p for p, n in names.items() if n.startswith("ray::ServeReplica"))
        proxy = next(p for p, n in names.items() if n.startswith("ray::ProxyActor"))
        spies = []
        if a.pyspy:
            a.pyspy.mkdir(parents=True, exist_ok=True)
            for label, pid in (("replica", replica), ("proxy", proxy)):
                spies.append(
                    subprocess.Popen(
                        [
                            sys.executable.replace("python", "py-spy"),
                            "record",
                            "--pid",
                            str(pid),
                            "--rate",
                            "40",
                            "--nonblocking",
                            "--threads",
                            "--format",
                            "raw",
                            "--duration",
                            "20",
                            "-o",
                            str(a.pyspy / f"{label}.txt"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        m0 = fetch(f"{url}/metrics")
        c0, th0 = snapshot(pids), threads(replica)
        t0 = time.perf_counter()
        r = asyncio.run(load(url, a.requests, a.clients))
        wall = time.perf_counter() - t0
        c1, th1 = snapshot(pids), threads(replica)
        m1 = fetch(f"{url}/metrics")
        for s in spies:
            s.wait(timeout=60)
    finally:
        handle.shutdown()
        ray.shutdown()
    steps = metric(m1, "raylstm_step_seconds_count") - metric(m0, "raylstm_step_seconds_count")
    step_s = metric(m1, "raylstm_step_seconds_sum") - metric(m0, "raylstm_step_seconds_sum")
    chars = metric(m1, "raylstm_chars_generated_total") - metric(m0, "raylstm_chars_generated_total")
    ratio = f"{r['rps'] / lib['rps']:.2f}" if lib else "-"
    print(
        f"serve ({a.client} client, {a.clients} clients): {r['rps']:.1f} req/s, p50 {r['p50_ms']:.0f} "
        f"p99 {r['p99_ms']:.0f} ms, statuses {dict(r['statuses'])}; serve/library {ratio}"
    )
    print(
        f"replica: {steps:.0f} steps, mean step {1e3 * step_s / max(1, steps):.2f} ms, "
        f"rows/step {chars / max(1, steps):.1f}, step thread busy {step_s / wall:.0%} of {wall:.1f} s"
    )
    used = Counter()
    for k, v in c1.items():
        used[k[1]] += v - c0.get(k, v)
    tot = sum(used.values())
    print(f"CPU during the load: {tot:.1f} s of {2 * wall:.1f} core-s ({tot / wall:.2f} cores)")
    for n, v in used.most_common(12):
        print(f"  {v:6.2f} s {v / wall:5.2f} cores  {n}")
    print("replica threads:")
    for n, v in sorted(((n, th1[n] - th0.get(n, 0)) for n in th1), key=lambda x: -x[1])[:8]:
        print(f"  {v:6.2f} s  {n}")
    if a.pyspy:
        for label in ("replica", "proxy"):
            f = a.pyspy / f"{label}.txt"
            if f.exists():
                print(summarize_pyspy(f))


if __name__ == "__main__":
    main()
