"""Training settings compared at equal compute, deterministically, without Ray.

Each setting trains with the training loop's own pieces (`data.stream_rows` segments, `segment_windows`,
`train_step`, warmup + cosine to the run's end) in one process of one torch thread, and scores the Musical
Instruments val reviews the way training and `raylstm evaluate` do (`evaluate.score_reviews`: each review
whole, from a zero state). One process at batch 2B computes what 2 Ray workers at B compute (the DDP
equivalence test), so the curves transfer to the preset; they do not depend on machine load, because
the x axis is work, not time: "compute" is characters trained x the model's cost per character relative
to 1x256 (measured under the CPU lock by `lstm_cost`, one thread, batch 32 x 128: 1x256 1.00, 1x384
1.72, 1x512 2.81, 2x256 2.02).

    .venv/bin/python -m bench.sweep --prepare                  # the splits, once (Ray Data)
    .venv/bin/python -m bench.sweep base stateful16 ...        # settings below, 2 at a time (one per core)
    .venv/bin/python -m bench.sweep --table                    # the results so far, as markdown

Results: bench/out/sweep/<name>.json (the val curve against compute).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AMAZON = ROOT.parent / "shared" / "data" / "amazon"
MI = AMAZON / "Musical_instruments_reviews.csv.gz"
# Every real review file with enough unique text: MI, Blitzer's 8,000 reviews, the 2018 5-core files
# (deduped in load_splits). The TSV/txt fixtures (gift cards, 1,000 one-line sentences) are left out.
ALL_SOURCES = [
    str(MI),
    str(AMAZON / "sorted_data_acl"),
    str(AMAZON / "AMAZON_FASHION_5.json.gz"),
    str(AMAZON / "All_Beauty_5.json.gz"),
    str(AMAZON / "Appliances_5.json.gz"),
]
OUT = ROOT / "bench" / "out" / "sweep"
DATA = OUT / "data.json"
# Cost per character relative to 1x256 (embed 64, batch 32 x 128, one thread; `lstm_cost`).
COST = {(256, 1): 1.0, (384, 1): 1.72, (512, 1): 2.81, (256, 2): 2.02}


@dataclass(frozen=True)
class Setting:
    hidden: int = 256
    layers: int = 1
    embed: int = 64
    dropout: float = 0.0
    seq_len: int = 128
    segment_windows: int = 1
    batch: int = 64  # global: what 2 workers x 32 compute together
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    data: str = "mi"  # "mi": the Musical Instruments train split; "all": every source's train split
    compute: float = 8e6  # characters of 1x256 work
    evals: int = 4
    seed: int = 1337
    notes: dict = field(default_factory=dict, compare=False)

    @property
    def chars(self) -> int:
        return int(self.compute / COST[(self.hidden, self.layers)])


BASE = Setting()
SETTINGS: dict[str, Setting] = {
    "base": BASE,  # the cpu-quality of the issue: independent 128-char windows, 1x256, 64 x 128 per step
    "stateful4": replace(BASE, segment_windows=4),
    "stateful16": replace(BASE, segment_windows=16),
    "stateful64": replace(BASE, segment_windows=64),
    # T = 64 with the state carried: the same 2048-char segments, twice the optimizer steps per character.
    "s16-t64": replace(BASE, segment_windows=32, seq_len=64),
    "t64-indep": replace(BASE, segment_windows=1, seq_len=64),
    "s16-t64-lr6": replace(BASE, segment_windows=32, seq_len=64, lr=6e-3),
    "t32-b64-lr5": replace(BASE, segment_windows=64, seq_len=32, lr=5e-3),
    "t32-b32": replace(BASE, segment_windows=64, seq_len=32, batch=32),
    "t32-b64-all": replace(BASE, segment_windows=64, seq_len=32, data="all"),
    "t32-indep": replace(BASE, segment_windows=1, seq_len=32),
    "t128-b16-indep": replace(BASE, segment_windows=1, seq_len=128, batch=16),
    "t32-b64-lr5-24m": replace(BASE, segment_windows=64, seq_len=32, lr=5e-3, compute=24e6, evals=6),
    "t32-b64-lr5-all-24m": replace(
        BASE, segment_windows=64, seq_len=32, lr=5e-3, data="all", compute=24e6, evals=6
    ),
    "t64-b32": replace(BASE, segment_windows=32, seq_len=64, batch=32),
    "t32-b64": replace(BASE, segment_windows=64, seq_len=32),
    "t64-b32-lr5": replace(BASE, segment_windows=32, seq_len=64, batch=32, lr=5e-3),
    "t64-b32-lr2": replace(BASE, segment_windows=32, seq_len=64, batch=32, lr=2e-3),
    "t64-b32-all": replace(BASE, segment_windows=32, seq_len=64, batch=32, data="all"),
    "t64-b32-h384": replace(BASE, segment_windows=32, seq_len=64, batch=32, hidden=384),
    "t64-b32-h384-all": replace(BASE, segment_windows=32, seq_len=64, batch=32, hidden=384, data="all"),
    "t64-b32-2x256-all": replace(BASE, segment_windows=32, seq_len=64, batch=32, layers=2, data="all"),
}


def prepare() -> None:
    """MI's splits alone and every source's train split together (Ray Data, once), as text lists."""
    import ray

    from raylstm.config import DataConfig
    from raylstm.data import load_splits
    from raylstm.evaluate import split_rows

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    out = {}
    t0 = time.perf_counter()
    mi = load_splits(DataConfig(sources=[str(MI)]))
    out["mi"] = {s: [t for _, t, _ in split_rows(getattr(mi, s))] for s in ("train", "val", "test")}
    every = load_splits(DataConfig(sources=ALL_SOURCES))
    out["all"] = {"train": [t for _, t, _ in split_rows(every.train)]}
    out["vocab"] = every.vocab.to_dict()
    out["manifest"] = every.manifest
    out["seconds"] = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    DATA.write_text(json.dumps(out))
    for k in ("mi", "all"):
        print(k, {s: (len(v), sum(map(len, v))) for s, v in out[k].items()})


def segments(texts: list[str], vocab, s: Setting):
    """The rows `data.window_dataset` makes: per block of 4096 reviews, one stream cut into segments."""
    import numpy as np

    from raylstm.data import BATCH_ROWS, stream_rows

    width, stride = s.segment_windows * s.seq_len + 1, s.segment_windows * s.seq_len
    parts = [
        stream_rows(texts[i : i + BATCH_ROWS], vocab, width, stride) for i in range(0, len(texts), BATCH_ROWS)
    ]
    return np.concatenate(parts)


def run_setting(name: str, s: Setting) -> dict:
    import numpy as np
    import torch

    from raylstm.config import ModelConfig, TrainConfig
    from raylstm.evaluate import score_reviews
    from raylstm.model import build_model
    from raylstm.train_loop import make_optimizer, make_scheduler, segment_windows, train_step
    from raylstm.vocab import CharVocab

    torch.set_num_threads(1)
    data = json.loads(DATA.read_text())
    vocab = CharVocab.from_dict(data["vocab"])
    val = data["mi"]["val"]
    rows = segments(data[s.data]["train"], vocab, s)
    tcfg = TrainConfig(
        lr=s.lr,
        warmup_steps=s.warmup,
        min_lr_ratio=s.min_lr_ratio,
        weight_decay=s.weight_decay,
        precision="fp32",
    )
    per_step = s.batch * s.seq_len
    total = s.chars // per_step
    torch.manual_seed(s.seed)
    model = build_model(
        ModelConfig(
            vocab_size=len(vocab),
            embed_dim=s.embed,
            hidden_size=s.hidden,
            num_layers=s.layers,
            dropout=s.dropout,
        )
    ).train()
    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, total)
    rng = np.random.default_rng(s.seed)
    eval_at = {round(total * (i + 1) / s.evals) for i in range(s.evals)}
    curve, step, epoch, t0, loss_acc = [], 0, 0, time.perf_counter(), []
    while step < total:
        order = rng.permutation(len(rows))
        for b in range(0, len(order) - s.batch + 1, s.batch):
            seg = torch.as_tensor(rows[order[b : b + s.batch]], dtype=torch.long)
            state = None
            for window in segment_windows(seg, s.seq_len):
                torch.manual_seed(s.seed + step)
                loss, _, state = train_step(model, opt, sched, window, state, tcfg, "full")
                loss_acc.append(float(loss))
                step += 1
                if step in eval_at:
                    bits, chars, _ = score_reviews(model, vocab, val)
                    model.train()
                    point = {
                        "step": step,
                        "compute": step * per_step * COST[(s.hidden, s.layers)],
                        "chars": step * per_step,
                        "epochs": step * per_step / (len(rows) * (rows.shape[1] - 1)),
                        "train_bpc": sum(loss_acc) / len(loss_acc) / math.log(2),
                        "val_bpc": bits / chars,
                        "seconds": time.perf_counter() - t0,
                    }
                    loss_acc = []
                    curve.append(point)
                    print(name, json.dumps(point), flush=True)
                if step >= total:
                    break
            if step >= total:
                break
        epoch += 1
    result = {"name": name, "setting": {k: v for k, v in s.__dict__.items() if k != "notes"}, "curve": curve}
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def table(names: list[str] | None = None) -> str:
    """Markdown: one row per finished setting, its val curve at the quarters of its compute."""
    lines = [
        "| setting | model | window T | chars per step | state carried over | lr | data | chars trained (passes) "
        "| MI val bpc at 1/4 . 1/2 . 3/4 . all |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    files = [OUT / f"{n}.json" for n in names] if names else sorted(OUT.glob("*.json"))
    for f in files:
        if f.name == "data.json" or not f.exists():
            continue
        r = json.loads(f.read_text())
        c, st = r["curve"], r["setting"]
        quarters = [c[max(0, round(len(c) * q) - 1)]["val_bpc"] for q in (0.25, 0.5, 0.75, 1.0)]
        carried = st["segment_windows"] * st["seq_len"] if st["segment_windows"] > 1 else 0
        lines.append(
            f"| `{r['name']}` | {st['layers']}x{st['hidden']} | {st['seq_len']} | {st['batch'] * st['seq_len']:,} "
            f"| {carried:,} | {st['lr']:g} | {st['data']} | {c[-1]['chars'] / 1e6:.0f} M ({c[-1]['epochs']:.1f}) | "
            + " . ".join(f"{v:.3f}" for v in quarters)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"settings: {', '.join(SETTINGS)}")
    ap.add_argument("--prepare", action="store_true", help="load the splits (Ray Data) into the cache")
    ap.add_argument("--table", action="store_true", help="print the results so far")
    ap.add_argument("--compute", type=float, help="override every setting's compute (1x256 characters)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this one setting
    args = ap.parse_args()
    if args.prepare:
        prepare()
    if args.one:
        s = SETTINGS[args.one]
        run_setting(args.one, replace(s, compute=args.compute) if args.compute else s)
        return
    pending = list(args.names)
    while pending:  # two at a time: one single-threaded process per core
        batch, pending = pending[:2], pending[2:]
        extra = ["--compute", str(args.compute)] if args.compute else []
        procs = [
            subprocess.Popen([sys.executable, "-m", "bench.sweep", "--one", n, *extra], cwd=ROOT)
            for n in batch
        ]
        for p in procs:
            p.wait()
    if args.table or not (args.names or args.prepare):
        print(table())


if __name__ == "__main__":
    main()
