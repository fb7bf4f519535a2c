"""A/B of Serve's own environment switches in one run: Ray 2.60's RAY_SERVE_THROUGHPUT_OPTIMIZED and
RAY_SERVE_ENABLE_DIRECT_INGRESS are read when each Serve process imports Serve, so every variant runs in
a fresh local Ray started by a child process with that environment; the library is measured in this
process right before and right after every variant (the host drifts 20-50% within minutes), and a
variant's Serve/library is to the mean of the two.

    .venv/bin/python -m bench.ab_serve_env [--rounds 2] [--requests 320] [--chars 80] [--variants ...]

Variants (VARIANTS): default = Serve as `raylstm serve` ran it before (HTTP proxy actor -> replica);
to-proxy / to-direct = RAY_SERVE_THROUGHPUT_OPTIMIZED=1, the clients on the proxy's port / on the
replica's own direct-ingress port (Serve keeps a proxy on the head node either way: Ray 2.60's
controller); di-direct = RAY_SERVE_ENABLE_DIRECT_INGRESS=1 alone, on the replica's port.
Per variant and round: requests/s at 32 clients, Serve/library, p50/p99, the replica's rows per step,
step time and engine busy share (its /metrics), and the cores used by the proxy, the replica, its engine
process and the clients (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.bench_serve import (  # noqa: E402
    CLIENTS,
    REQ_CHARS,
    _checkpoint,
    fetch,
    free_port,
    http_load,
    library,
    metric,
)
from bench.profile_serve import _tree, snapshot  # noqa: E402

TO = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# name: (environment of the child's Ray, where the clients connect: "proxy" or "replica")
VARIANTS = {
    "default": ({}, "proxy"),
    "to-proxy": (TO, "proxy"),
    "to-direct": (TO, "replica"),
    "di-direct": ({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, "replica"),
}
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
}


def replica_urls() -> list[str]:
    """The ingress replicas' own HTTP addresses (direct ingress), from the controller's target groups.
    The targets name the node's IP, but a replica binds Serve's http_options host (127.0.0.1 here)."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
    return [
        f"http://127.0.0.1:{t.port}"
        for g in groups
        if str(g.protocol).endswith("HTTP")
        for t in g.targets
        if t.name.startswith("SERVE_REPLICA")
    ]


def child(name: str, requests: int, chars: int) -> None:
    """One variant in its own local Ray (this process's environment): deploy, warm up, load, report."""
    import ray
    import torch
    from ray import serve

    from raylstm.config import ServeConfig
    from raylstm.serve import start_server

    torch.set_num_threads(1)
    ckpt, _ = _checkpoint(Path("bench/out"))
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False
    )
    cfg = ServeConfig(max_batch_size=CLIENTS, reload_poll_s=0, max_queued=4 * CLIENTS)
    handle = start_server(ckpt, cfg, port=free_port(), name="ab")
    url = handle.url
    if VARIANTS[name][1] == "replica":
        direct = replica_urls()
        if not direct:
            raise SystemExit(f"{name}: no direct-ingress replica port (target groups: none)")
        url = direct[0]
    info = json.loads(fetch(f"{url}/v1/model"))
    pid, engine_pid = info["pid"], info.get("engine_pid")
    asyncio.run(http_load(url, 64, CLIENTS, chars))  # warm-up
    # The replica and its engine by pid too: a replica need not descend from this driver's raylet tree.
    tree = sorted(set(_tree(os.getpid())) | {pid} | ({engine_pid} if engine_pid else set()))
    m0, c0 = fetch(f"{url}/metrics"), snapshot(tree)
    t0 = time.perf_counter()
    r = asyncio.run(http_load(url, requests, CLIENTS, chars))
    wall = time.perf_counter() - t0
    c1, m1 = snapshot(tree), fetch(f"{url}/metrics")

    def d(m: str) -> float:
        return metric(m1, m) - metric(m0, m)

    used: Counter = Counter()
    for k, v in c1.items():
        who = {pid: "replica", engine_pid: "engine", os.getpid(): "clients"}.get(k[0], k[1])
        used[who] += v - c0.get(k, v)
    steps = d("raylstm_step_seconds_count")
    r.update(
        url=url,
        actors=sorted(a["name"].split("::")[0].split("-")[0] for a in ray.util.list_named_actors(True)),
        steps=steps,
        rows_per_step=d("raylstm_chars_generated_total") / max(1, steps),
        step_ms=1e3 * d("raylstm_step_seconds_sum") / max(1, steps),
        busy=d("raylstm_step_seconds_sum") / wall,
        cpu={k: v / wall for k, v in used.most_common(7) if v / wall >= 0.01},
        statuses={str(k): v for k, v in r["statuses"].items()},
    )
    serve.shutdown()
    ray.shutdown()
    print("RESULT " + json.dumps(r), flush=True)


def run_variant(name: str, requests: int, chars: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SERVE_ENV}
    env.update(VARIANTS[name][0])
    cmd = [sys.executable, "-m", "bench.ab_serve_env", "--child", name]
    cmd += ["--requests", str(requests), "--chars", str(chars)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{name}: no result (rc {p.returncode})\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--chars", type=int, default=REQ_CHARS, help="new characters per request")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.requests, a.chars)

    import torch

    torch.set_num_threads(1)
    ckpt, what = _checkpoint(Path("bench/out"))
    names = a.variants.split(",")
    start = time.strftime("%H:%M", time.gmtime())
    print(
        f"model: {what}; {a.chars} chars per request; {start} UTC; load {os.getloadavg()[0]:.1f}", flush=True
    )
    n_lib = 256 if a.chars <= REQ_CHARS else 128  # ~6-16 s of library per figure
    libs: list[float] = []
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(a.rounds):
        for name in names:
            libs.append(library(ckpt, n_lib, CLIENTS, a.chars)["rps"])
            r = run_variant(name, a.requests, a.chars)
            r["lib_index"] = len(libs) - 1
            results[name].append(r)
            print(
                f"round {rnd} {name:10s} {r['rps']:6.1f} req/s  library before {libs[-1]:.1f}  "
                f"p50 {r['p50_ms']:4.0f} p99 {r['p99_ms']:4.0f} ms  statuses {r['statuses']}  "
                f"step {r['step_ms']:.2f} ms, rows/step {r['rows_per_step']:.1f}, busy {r['busy']:.0%}\n"
                f"      {r['url']}  actors {r['actors']}\n"
                "      cores: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items()),
                flush=True,
            )
    libs.append(library(ckpt, n_lib, CLIENTS, a.chars)["rps"])
    end = time.strftime("%H:%M", time.gmtime())
    print(f"\n{start}-{end} UTC; library between the variants: {' '.join(f'{x:.1f}' for x in libs)} req/s")
    print(
        "| variant | "
        + " | ".join(f"round {i} serve/lib" for i in range(a.rounds))
        + " | mean | req/s | p50/p99 ms | rows/step | ms/step | engine busy | cores: engine, replica, proxy |"
    )
    print("|---|" + "---:|" * (a.rounds + 6) + "---|")
    for name, rs in results.items():
        for r in rs:
            i = r["lib_index"]
            r["lib"] = (libs[i] + libs[i + 1]) / 2
        ratios = [r["rps"] / r["lib"] for r in rs]

        def span(key: str, fmt: str, rs: list[dict] = rs) -> str:
            lo, hi = min(r[key] for r in rs), max(r[key] for r in rs)
            return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"

        def cores(who: str, rs: list[dict] = rs) -> str:
            v = [r["cpu"].get(who, 0.0) for r in rs]
            return f"{min(v):.2f}" if f"{min(v):.2f}" == f"{max(v):.2f}" else f"{min(v):.2f}-{max(v):.2f}"

        proxy = [k for r in rs for k in r["cpu"] if "Proxy" in k]
        print(
            f"| {name} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | {sum(ratios) / len(ratios):.2f} | "
            f"{span('rps', '.1f')} | "
            f"{sum(r['p50_ms'] for r in rs) / len(rs):.0f}/{sum(r['p99_ms'] for r in rs) / len(rs):.0f} | "
            f"{span('rows_per_step', '.1f')} | {span('step_ms', '.1f')} | {span('busy', '.0%')} | "
            f"{cores('engine')}, {cores('replica')}, {cores(proxy[0]) if proxy else '-'} |"
        )


if __name__ == "__main__":
    main()
