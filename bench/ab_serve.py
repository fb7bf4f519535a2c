"""A/B of the engine's prefill designs in one run (the host's speed drifts ~2x within minutes, so only
figures of the same run compare): every variant is deployed at once as its own app and the variants are
loaded in turn, round after round, with the library measured before and after every variant (a
variant's Serve/library is to the mean of the two).

    .venv/bin/python -m bench.ab_serve [--rounds 3] [--requests 384] [--variants inline,process-hold10,...]

Per variant and round: requests/s at 32 clients, Serve/library of that round, p50/p99, the replica's
step count, rows per step and step-thread busy share (its /metrics), and the CPU seconds of the replica's
threads, the proxy and the clients (/proc). Before the rounds, in process: the library against the
engine kept full, interleaved, and a cProfile of each (where the engine's step loses to the library's).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import os
import pstats
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.bench_serve import (  # noqa: E402
    CLIENTS,
    IN_PROCESS_ENGINE,
    PREVIOUS_ENGINE,
    _checkpoint,
    engine_direct,
    fetch,
    free_port,
    http_load,
    library,
    metric,
    variant_deployment,
)
from bench.profile_serve import _tree, snapshot, step_table, threads  # noqa: E402

# name: Engine keyword options (raylstm.engine.Engine)
VARIANTS = {
    "inline": PREVIOUS_ENGINE,  # main's design: prompts read inside the step, as they come
    "inline-hold10": IN_PROCESS_ENGINE,  # the in-process engine as deployed before the engine process
    "inline-hold25": {"process": False, "prefill_thread": False, "admit_hold_s": 0.025},
    "thread": {"process": False, "prefill_thread": True},  # prompts read on their own thread
    "thread-hold10": {"process": False, "prefill_thread": True, "admit_hold_s": 0.010},
    # The engine in its own process (raylstm.engine_process), prompts read in its step.
    "process-hold10": {"process": True, "admit_hold_s": 0.010},
    "process-hold0": {"process": True, "admit_hold_s": 0.0},
    "process-hold10-freeze": {"process": True, "admit_hold_s": 0.010, "gc_freeze": True},
    # Diagnosis, not a design to ship (needs root): how much the engine loses to the other processes.
    "process-hold10-nice-5": {"process": True, "admit_hold_s": 0.010, "nice": -5},
}

# The ones not yet settled (inline-hold25 and the prefill thread lost the last A/B: REPORT "Serving").
DEFAULT_VARIANTS = [
    "inline-hold10",
    "process-hold10",
    "process-hold0",
    "process-hold10-freeze",
    "process-hold10-nice-5",
]


def in_process(ckpt: Path, rounds: int, total: int) -> None:
    lib, eng = [], []
    for _ in range(rounds):
        lib.append(library(ckpt, total, CLIENTS)["rps"])
        eng.append(engine_direct(ckpt, total, CLIENTS)["rps"])
    print("in process, interleaved (req/s):")
    print("  library  " + " ".join(f"{x:6.1f}" for x in lib))
    print("  engine   " + " ".join(f"{x:6.1f}" for x in eng))
    print("  ratio    " + " ".join(f"{e / lb:6.2f}" for e, lb in zip(eng, lib)))
    for label, fn in (("library", library), ("engine", engine_direct)):
        prof = cProfile.Profile()
        prof.enable()
        fn(ckpt, total, CLIENTS)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
        print(f"--- cProfile {label} ({total} requests), by tottime")
        print("\n".join(s.getvalue().splitlines()[4:34]))


def _threads(pid: int, engine_pid: int | None) -> dict[str, float]:
    """CPU seconds per thread name of the replica and, when it has one, of its engine process."""
    out = threads(pid)
    if engine_pid is not None:
        out.update({f"engine: {k}": v for k, v in threads(engine_pid).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=384)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--skip-in-process", action="store_true")
    a = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from raylstm.config import ServeConfig
    from raylstm.serve import deployment_options

    torch.set_num_threads(1)
    ckpt, what = _checkpoint(Path("bench/out"))
    print(f"model: {what}; {time.strftime('%H:%M:%S')}; load {os.getloadavg()[0]:.1f}", flush=True)
    if not a.skip_in_process:
        step_table(ckpt)
        in_process(ckpt, a.rounds, 256)
    names = a.variants.split(",")
    ray.init(
        address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False
    )
    cfg = ServeConfig(max_batch_size=CLIENTS, reload_poll_s=0, max_queued=4 * CLIENTS)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    pids: dict[str, int] = {}
    engine_pids: dict[str, int | None] = {}
    for name in names:
        dep = variant_deployment(name, VARIANTS[name]).options(**deployment_options(cfg))
        app = dep.bind(str(ckpt.resolve()), dataclasses.asdict(cfg), None, False)
        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        info = json.loads(fetch(f"{url}/{name}/v1/model"))
        pids[name], engine_pids[name] = info["pid"], info.get("engine_pid")
        asyncio.run(http_load(f"{url}/{name}", 64, CLIENTS))  # warm-up
    print(f"deployed {names}; {time.strftime('%H:%M:%S')}", flush=True)
    results: dict[str, list[dict]] = {n: [] for n in names}
    libs = []
    try:
        for rnd in range(a.rounds):
            for name in names:
                # The library right before and right after every variant: its ratio is to their mean
                # (the host drifts within a round as much as between designs).
                libs.append(library(ckpt, 256, CLIENTS)["rps"])
                u = f"{url}/{name}"
                m0, tree = fetch(f"{u}/metrics"), _tree(os.getpid())
                c0, th0 = snapshot(tree), _threads(pids[name], engine_pids[name])
                t0 = time.perf_counter()
                r = asyncio.run(http_load(u, a.requests, CLIENTS))
                wall = time.perf_counter() - t0
                c1, th1 = snapshot(tree), _threads(pids[name], engine_pids[name])
                m1 = fetch(f"{u}/metrics")
                steps = metric(m1, "raylstm_step_seconds_count") - metric(m0, "raylstm_step_seconds_count")
                step_s = metric(m1, "raylstm_step_seconds_sum") - metric(m0, "raylstm_step_seconds_sum")
                chars = metric(m1, "raylstm_chars_generated_total") - metric(
                    m0, "raylstm_chars_generated_total"
                )
                used: Counter = Counter()
                for k, v in c1.items():
                    who = {pids[name]: "replica " + name, engine_pids[name]: "engine " + name}.get(k[0], k[1])
                    used[who] += v - c0.get(k, v)
                r.update(
                    wall=wall,
                    lib_index=len(libs) - 1,
                    steps=steps,
                    rows_per_step=chars / max(1, steps),
                    step_ms=1e3 * step_s / max(1, steps),
                    busy=step_s / wall,
                    cpu={k: v / wall for k, v in used.most_common(6)},
                    threads={
                        k: (th1[k] - th0.get(k, 0)) / wall for k in th1 if th1[k] - th0.get(k, 0) > 0.01
                    },
                )
                results[name].append(r)
                print(
                    f"round {rnd} {name:14s} {r['rps']:6.1f} req/s  library before {libs[-1]:.1f}  "
                    f"p50 {r['p50_ms']:4.0f} p99 {r['p99_ms']:4.0f} ms  non-200 {r['errors']}  "
                    f"step {r['step_ms']:.2f} ms x {steps:.0f}, rows/step {r['rows_per_step']:.1f}, "
                    f"step thread busy {r['busy']:.0%}",
                    flush=True,
                )
                print("      cores: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items()))
                # With the engine in its own process, its threads are listed as "engine: NAME".
                print(
                    "      replica threads: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["threads"].items()))
                )
        libs.append(library(ckpt, 256, CLIENTS)["rps"])
    finally:
        serve.shutdown()
        ray.shutdown()
    for rs in results.values():
        for r in rs:
            i = r["lib_index"]
            r["lib"] = (libs[i] + libs[i + 1]) / 2 if i + 1 < len(libs) else libs[i]
    print(f"\nlibrary, between the variants: {' '.join(f'{x:.1f}' for x in libs)} req/s")
    print(
        "| variant | "
        + " | ".join(f"round {i} serve/lib" for i in range(a.rounds))
        + " | mean | p50/p99 ms |"
    )
    print("|---|" + "---:|" * (a.rounds + 2))
    for name, rs in results.items():
        ratios = [r["rps"] / r["lib"] for r in rs]
        print(
            f"| {name} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | {sum(ratios) / len(ratios):.2f} | "
            f"{sum(r['p50_ms'] for r in rs) / len(rs):.0f}/{sum(r['p99_ms'] for r in rs) / len(rs):.0f} |"
        )


if __name__ == "__main__":
    main()
