"""The bare-PyTorch ceiling: how many characters per second this machine trains a model at, with no Ray,
no data pipeline, nothing but the training step itself, in a given thread/process layout.

    layout "1x2": one process, 2 torch threads
    layout "2x1": two concurrent processes, 1 torch thread each (what 2 Ray Train workers of 1 thread do,
                  minus DDP's gradient all-reduce); the figure is the sum of the two processes' rates
    --ddp:        the layout's processes as one gloo process group, the model wrapped in
                  DistributedDataParallel (what Ray Train's prepare_model does), still no Ray: what the
                  all-reduce and its barrier cost on their own

Each process trains the model on random character ids of shape [batch, seq_len] with raylstm's own
`train_loop.train_step` (forward from the carried state, loss at every position, backward, clipping,
optimizer, LR schedule): the same work per step as a Ray Train worker. Processes wait for a common start
time after their warm-up, then count steps for `seconds`, so the two of a "2x1" layout run at the same
time and their rates add up.

    .venv/bin/python -m bench.ceiling --hidden 128 --batch 64 --seq-len 40 --layout 2x1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}  # name -> (processes, threads per process)


@dataclass(frozen=True)
class Shape:
    """One measured setting: the model's sizes, the step's shape, and how the machine is split."""

    batch: int
    seq_len: int
    layout: str = "2x1"
    hidden: int = 128
    embed: int = 128
    dense: int = 256
    vocab: int = 60
    dropout: float = 0.5
    optimizer: str = "adamw"
    mkldnn: bool = True  # oneDNN's LSTM kernel (torch's default on CPU) vs torch's own native cell loop
    ddp: bool = False  # the processes all-reduce their gradients (gloo DDP), as Ray Train's workers do


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process: train `spec`'s shape until `start_at`, then count steps for `seconds`."""
    import torch

    from raylstm.config import ModelConfig, TrainConfig
    from raylstm.model import build_model
    from raylstm.train_loop import make_optimizer, make_scheduler, train_step

    s = Shape(**spec["shape"])
    torch.set_num_threads(spec["threads"])
    torch.backends.mkldnn.enabled = s.mkldnn
    torch.manual_seed(spec["rank"])
    model = build_model(
        ModelConfig(
            kind="seed",
            vocab_size=s.vocab,
            embed_dim=s.embed,
            hidden_size=s.hidden,
            num_layers=1,
            dropout=s.dropout,
            seed_dense=s.dense,
        )
    ).train()
    if s.ddp:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=spec["ddp_address"], rank=spec["rank"], world_size=spec["world"]
        )
        model = torch.nn.parallel.DistributedDataParallel(model)
    tcfg = TrainConfig(optimizer=s.optimizer, lr=1e-3, warmup_steps=10, max_steps=10**6, precision="fp32")
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, tcfg.max_steps)
    gen = torch.Generator().manual_seed(spec["rank"])
    windows = [torch.randint(1, s.vocab, (s.batch, s.seq_len + 1), generator=gen) for _ in range(16)]
    state, steps, chars, t0, iteration = None, 0, 0, None, 0
    end = spec["start_at"] + spec["seconds"]
    while True:
        now = time.time()
        if t0 is None and now >= spec["start_at"]:
            t0, steps, chars = time.perf_counter(), 0, 0
        if s.ddp:
            # The ranks must stop after the same step (each step all-reduces): they agree every 16 steps.
            if iteration % 16 == 0:  # not `steps`: it restarts at t0, at another iteration per rank
                stop = torch.tensor([float(now >= end and t0 is not None)])
                torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
                if stop.item():
                    break
        elif now >= end and t0 is not None:
            break
        iteration += 1
        ids = windows[steps % len(windows)]
        state = None if steps % 16 == 0 else state  # a stateful segment of 16 windows, as training reads
        loss, n, state = train_step(model, opt, sched, ids, state, tcfg, "full")
        float(loss)
        steps += 1
        chars += n
    secs = time.perf_counter() - t0
    if s.ddp:
        torch.distributed.destroy_process_group()
    return {
        "rank": spec["rank"],
        "steps": steps,
        "chars": chars,
        "seconds": secs,
        "chars_per_s": chars / secs,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(shape: Shape, seconds: float = 8.0, warmup: float = 4.0) -> dict[str, Any]:
    """chars/s of `shape` in its layout: the processes start together and their rates are summed."""
    procs_n, threads = LAYOUTS[shape.layout]
    start_at = time.time() + warmup + 2.0  # process start-up (imports) + warm-up steps
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = []
    ddp_address = f"tcp://127.0.0.1:{_free_port()}"
    for rank in range(procs_n):
        spec = {"shape": asdict(shape), "threads": threads, "rank": rank, "start_at": start_at}
        spec.update(world=procs_n, ddp_address=ddp_address)
        spec["seconds"] = seconds
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.ceiling", "--worker", json.dumps(spec)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + warmup + 120)
        if p.returncode != 0:
            raise RuntimeError(f"ceiling worker for {shape} exited with {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {
        **asdict(shape),
        "chars_per_s": sum(r["chars_per_s"] for r in results),
        "per_process": [round(r["chars_per_s"]) for r in results],
        "seconds": seconds,
    }


def grid(
    batches: list[int], seq_lens: list[int], layouts: list[str], seconds: float, **model: Any
) -> list[dict[str, Any]]:
    """Every (layout, batch, seq_len), one after another; printed as it goes."""
    rows = []
    for layout in layouts:
        for seq_len in seq_lens:
            for batch in batches:
                r = measure(Shape(batch=batch, seq_len=seq_len, layout=layout, **model), seconds)
                print(
                    f"[ceiling] {layout} batch {batch} x {seq_len}: {r['chars_per_s']:,.0f} chars/s "
                    f"{r['per_process']}",
                    flush=True,
                )
                rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=60)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[40, 64, 128])
    ap.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "rmsprop", "sgd"])
    ap.add_argument("--no-mkldnn", action="store_true", help="torch's native LSTM instead of oneDNN's")
    ap.add_argument("--ddp", action="store_true", help="all-reduce the gradients (gloo DDP), no Ray")
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    rows = grid(
        args.batch,
        args.seq_len,
        args.layout,
        args.seconds,
        hidden=args.hidden,
        vocab=args.vocab,
        optimizer=args.optimizer,
        mkldnn=not args.no_mkldnn,
        ddp=args.ddp,
    )
    best = max(rows, key=lambda r: r["chars_per_s"])
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
