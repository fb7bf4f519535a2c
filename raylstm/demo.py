"""`raylstm demo` (what `make demo` runs): the whole path on one machine, on the bundled demo corpus.

prepare (Ray Data) -> train the `demo` preset with 2 Ray Train workers -> best checkpoint by val bpc ->
serve it with Ray Serve -> sample over HTTP at the original project's temperatures -> shut Serve down.
Each step is the same function the CLI subcommands and the tests call.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from raylstm.config import Config, load_config

TEMPERATURES = (0.2, 0.5, 1.0, 1.2)


def demo_config(overrides: list[str] | None = None) -> Config:
    """configs/demo.toml from the source tree (or the working dir), with overrides."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        preset = root / "configs" / "demo.toml"
        if preset.exists():
            return load_config(preset, overrides)
    raise FileNotFoundError("configs/demo.toml not found: run the demo from a raylstm checkout")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def run_demo(
    workdir: str | Path = "runs/demo", overrides: list[str] | None = None, verbose: bool = False
) -> int:
    """The demo; `overrides` are `--set` strings for configs/demo.toml, `verbose` shows Ray's own lines."""
    from raylstm.prepare import prepare
    from raylstm.ray_env import ensure_ray, quiet_ray_console
    from raylstm.serve import start_server
    from raylstm.train import train

    workdir = Path(workdir).resolve()
    cfg = demo_config(overrides)
    ensure_ray(log_to_driver=verbose)
    if not verbose:
        quiet_ray_console()

    t0 = time.perf_counter()
    print("== 1/3 prepare: demo corpus -> cleaned, split Parquet shards + vocab.json", flush=True)
    manifest = prepare(cfg.data, workdir / "prepared")
    print(json.dumps({"splits": manifest["splits"], "skipped": manifest["skipped"]}, indent=2), flush=True)

    print(f"== 2/3 train: {cfg.train.num_workers} Ray Train workers, {cfg.train.max_steps} steps", flush=True)
    cfg.data.sources = [str(workdir / "prepared")]
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(cfg, storage=str(workdir / "runs"), name=run_name, verbose=verbose)
    print(f"best val bpc {result.best_metrics['val_bpc']:.3f} at {result.best_checkpoint}", flush=True)

    print("== 3/3 serve: the best checkpoint over HTTP, sampled at the original temperatures", flush=True)
    handle = start_server(result.run_dir, cfg.serve, port=_free_port())
    try:
        info = json.loads(urllib.request.urlopen(f"{handle.url}/v1/model", timeout=30).read())
        print(f"serving step {info.get('step')} at {handle.url}", flush=True)
        for t in TEMPERATURES:
            out = _post_json(
                f"{handle.url}/v1/generate",
                {"prompt": cfg.train.sample_prime, "max_chars": 300, "temperature": t, "seed": 0},
            )
            print(
                f"--- temperature {t} (HTTP) ---\n{cfg.train.sample_prime}{out['samples'][0]['text']}\n",
                flush=True,
            )
    finally:
        handle.shutdown()
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; run dir: {result.run_dir}", flush=True)
    return 0
