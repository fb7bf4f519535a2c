"""The training driver: Config -> datasets -> TorchTrainer.fit() -> best.json, metrics, curve, samples.

    train(cfg, storage, name)
      ensure_ray(address)                     join RAY_ADDRESS (ray job submit) or start a local Ray
      load_splits + window_dataset            Ray Data: text -> segments of windows of ids  (raylstm.data)
      condition_vocab (model.conditions)      rating/category ids of a conditioned model, from the train split
      fit_windows(...)                        TorchTrainer(train_loop_per_worker) with DDP workers; val =
                                              the val reviews, each scored whole (seed mode: windows)
        RunLog callback (controller)          metrics.jsonl, samples.jsonl, best.json as training goes
      after fit                               a diverged run raises TrainingDiverged (its message says
                                              what to change); else best.json (authoritative),
                                              learning_curve.png, samples.txt

The run dir is storage/name. Running the same name with the same storage again continues that run from
its latest checkpoint (Ray Train finds the run's snapshot there); a finished run continued this way has
nothing left to do and just rewrites its outputs.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from raylstm import storage as store
from raylstm.checkpoint import BEST, load_checkpoint, write_best
from raylstm.conditions import ConditionVocab
from raylstm.config import Config
from raylstm.progress import MetricsFollower
from raylstm.ray_env import quiet_dataset, quiet_ray_console, ray_logs_dir
from raylstm.sample import training_samples
from raylstm.train_loop import SAMPLES_FILE, TrainingDiverged, train_loop_per_worker
from raylstm.vocab import CharVocab

METRICS_FILE = "metrics.jsonl"
SAMPLES_LOG = "samples.jsonl"
CURVE_FILE = "learning_curve.png"
SAMPLES_TXT = "samples.txt"
CONFIG_FILE = "config.json"
DATA_STATS_FILE = "train_data_stats.txt"  # Ray Data stats of rank 0's training shard, at the end
# metrics.jsonl field -> TensorBoard tag (plus train/bpc = train_loss / ln 2, beside val/bpc).
TENSORBOARD_TAGS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_bpc": "val/bpc",
    "lr": "train/lr",
    "chars_per_s_total": "throughput/chars_per_s",
    "preds_per_s_total": "throughput/preds_per_s",
}


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str
    best_metrics: dict
    result: ray.train.Result


def resolve_storage(storage: str, name: str) -> tuple[str, Path]:
    """(storage_path for RunConfig, the run dir on this machine). The one place storage URIs are handled.

    Local: Ray Train needs an absolute path, and the driver writes best.json, the metrics file and the
    plots into the run dir directly. Object storage (s3://...): Ray Train writes the checkpoints straight
    to the bucket, the run's small files are written to a local mirror (under storage.cache_dir()) and
    copied to storage/name as they change (best.json) and at the end (see `run_uri`).
    """
    if store.is_remote(storage):
        run_dir = store.cache_dir() / "runs" / store.cache_key(store.join(storage, name))
        run_dir.mkdir(parents=True, exist_ok=True)
        return storage.rstrip("/"), run_dir
    root = Path(storage.removeprefix("file://")).expanduser().resolve()
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(root), run_dir


def run_uri(storage_path: str, name: str) -> str | None:
    """The run's URI when it lives on object storage, else None (the local run dir is the run)."""
    return store.join(storage_path, name) if store.is_remote(storage_path) else None


class RunLog(UserCallback):
    """Runs on the Train controller (the driver's node) after every report of all workers.

    Appends one JSON line per report to metrics.jsonl (rank 0's metrics plus the total chars/s of all
    workers), writes the same scalars as TensorBoard event files beside it (`tensorboard --logdir runs/`),
    copies each checkpoint's samples to samples.jsonl, and keeps best.json pointing at the best
    checkpoint so far, so a server can follow the run while it trains.
    """

    def __init__(self, run_dir: str, run_uri: str | None = None) -> None:
        self.run_dir = run_dir
        self.run_uri = run_uri
        self._writer: Any = None  # SummaryWriter, opened on the controller (it does not pickle)

    def _tensorboard(self, line: dict[str, Any]) -> None:
        """The report's scalars, at its step, in the run dir's TensorBoard event file (flushed now, so
        TensorBoard shows a run while it trains; a continued run adds a new event file beside the old)."""
        if not isinstance(line.get("step"), int):
            return  # nothing to place on TensorBoard's step axis
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.run_dir)
        scalars = {tag: line.get(name) for name, tag in TENSORBOARD_TAGS.items()}
        if isinstance(line.get("train_loss"), float):
            scalars["train/bpc"] = line["train_loss"] / math.log(2)
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(tag, value, line["step"], walltime=line["time"])
        self._writer.flush()

    def _best_so_far(self) -> float:
        best = Path(self.run_dir) / BEST
        try:
            return float(json.loads(best.read_text())["metrics"]["val_bpc"])
        except (OSError, ValueError, KeyError, TypeError):
            return math.inf

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        run_dir = Path(self.run_dir)
        line = dict(metrics[0])
        line["chars_per_s_total"] = sum(float(m.get("chars_per_s", 0.0)) for m in metrics)
        line["preds_per_s_total"] = sum(float(m.get("preds_per_s", 0.0)) for m in metrics)
        line["time"] = time.time()
        if checkpoint is not None:
            ckpt_dir = Path(checkpoint.path)
            line["checkpoint"] = ckpt_dir.name
            samples = ckpt_dir / SAMPLES_FILE
            if self.run_uri:  # the checkpoint is in the bucket
                samples = store.join(store.to_uri(checkpoint.filesystem, checkpoint.path), SAMPLES_FILE)
            if store.exists(samples):
                with open(run_dir / SAMPLES_LOG, "a") as f:
                    f.write(json.dumps(json.loads(store.read_text(samples))) + "\n")
            bpc = float(line.get("val_bpc", math.inf))
            if bpc < self._best_so_far():
                best = write_best(run_dir, ckpt_dir.name, _plain(line))
                if self.run_uri:  # a server following the run reads it from the bucket
                    store.write_bytes(store.join(self.run_uri, BEST), best.read_bytes())
        with open(run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(_plain(line)) + "\n")
        self._tensorboard(_plain(line))


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (NaN/inf become null, numpy scalars become Python numbers)."""
    out = {}
    for k, v in d.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def default_run_name(cfg: Config) -> str:
    return f"{cfg.model.kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    cfg: Config,
    storage: str = "runs",
    name: str | None = None,
    address: str | None = None,
    ray_init_kwargs: dict | None = None,
    verbose: bool = False,
) -> TrainResult:
    """Train `cfg` on its data sources with Ray Train; returns where the run and its best checkpoint are.

    The console shows raylstm's own lines and a progress line (`raylstm.progress`); `verbose` shows
    Ray's log lines instead (workers, the Train controller, Ray Data's per-execution progress)."""
    from raylstm.data import condition_vocab, load_splits, window_dataset
    from raylstm.ray_env import ensure_ray

    if not ray.is_initialized():
        ensure_ray(address, **{"log_to_driver": verbose, **(ray_init_kwargs or {})})
    if not verbose:
        quiet_ray_console()
    name = name or default_run_name(cfg)
    storage_path, run_dir = resolve_storage(storage, name)
    # Raw sources are prepared once into the run's own data/ (streamed, never held in the object store),
    # where every node sees it when the storage is shared or s3://; a prepared dir is read as it is.
    work_dir = (
        store.join(storage_path, name, "data") if store.is_remote(storage_path) else str(run_dir / "data")
    )
    splits = load_splits(cfg.data, work_dir=work_dir)
    conditions = condition_vocab(splits.train, cfg.model.conditions) if cfg.model.conditions else None
    train_ds = window_dataset(splits.train, splits.vocab, cfg.data, conditions=conditions)
    if cfg.data.window_mode == "full":
        # Whole reviews, scored as `raylstm evaluate` does (a conditioned model: with their conditions).
        val_ds = splits.val.select_columns(["text", *(conditions.fields if conditions else ())])
    else:
        val_ds = window_dataset(splits.val, splits.vocab, cfg.data, conditions=conditions)
    return fit_windows(
        cfg,
        splits.vocab,
        train_ds,
        val_ds,
        storage=storage,
        name=name,
        manifest=getattr(splits, "manifest", None),
        conditions=conditions,
        verbose=verbose,
    )


def fit_windows(
    cfg: Config,
    vocab: CharVocab,
    train_ds: ray.data.Dataset,
    val_ds: ray.data.Dataset,
    storage: str = "runs",
    name: str | None = None,
    manifest: dict | None = None,
    conditions: ConditionVocab | None = None,
    verbose: bool = False,
) -> TrainResult:
    """Run TorchTrainer on ready datasets and write the run's outputs.

    `train_ds` rows are {"ids": int32[width]} from `data.window_dataset`; `val_ds` rows are either reviews
    {"text": str} (each scored whole, from a zero state, every character with the review before it) or
    windows {"ids"} (what seed mode validates on). A conditioned model (model.conditions) needs its
    `conditions` vocabulary, and rows that carry them ("cond"; the val reviews' rating/category). While
    it runs, the driver follows metrics.jsonl and shows the progress (`raylstm.progress`): one live line
    on a terminal, plain lines elsewhere (always plain with `verbose`, where Ray's own lines interleave)."""
    cfg.model.vocab_size = len(vocab)
    if list(cfg.model.conditions) != (list(conditions.fields) if conditions else []):
        raise ValueError(
            f"model.conditions is {list(cfg.model.conditions)} but the condition vocabulary is {conditions!r}"
        )
    cfg.model.condition_sizes = conditions.sizes if conditions else []
    tcfg = cfg.train
    check_plan(cfg)
    name = name or default_run_name(cfg)
    storage_path, run_dir = resolve_storage(storage, name)

    if cfg.data.materialize:
        too_big = materialize_refusal(cfg, manifest, object_store_bytes(), len(cfg.model.conditions))
        if too_big:
            print(f"[raylstm] {too_big}", flush=True)
            # the run's config.json says what ran; the caller's config is left as it was given
            cfg = replace(cfg, data=replace(cfg.data, materialize=False))
    if cfg.data.materialize:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    for ds in (train_ds, val_ds):
        quiet_dataset(ds)  # each epoch and each evaluation is a new execution
    val_kind = "reviews" if "text" in val_ds.columns() else "windows"
    # One row is enough to know it is not empty: count() would build every val window (seed mode) or
    # read every val review before step 1, minutes and memory on a corpus of GBs.
    if not val_ds.take(1):
        raise ValueError(
            "the validation split is empty: use more data, a larger data.val_fraction "
            "or a shorter data.seq_len"
        )
    steps_per_epoch = None
    if cfg.data.materialize or tcfg.max_steps <= 0:
        n_rows = train_ds.count()
        # Ray's equal split and drop_last: each worker takes whole batches of its equal share of the rows.
        batches = (n_rows // tcfg.num_workers) // tcfg.batch_size
        if batches == 0:
            raise ValueError(
                f"{n_rows} training rows cannot fill one batch of train.batch_size={tcfg.batch_size} on "
                f"each of train.num_workers={tcfg.num_workers}: lower the batch size, "
                "data.segment_windows or data.seq_len, or add data"
            )
        steps_per_epoch = batches * (cfg.data.segment_windows if cfg.data.window_mode == "full" else 1)
    if tcfg.max_steps <= 0:
        total_steps = tcfg.epochs * steps_per_epoch
    else:  # the LR schedule ends where training will end: max_steps, or the epochs if they run out first
        total_steps = (
            min(tcfg.max_steps, tcfg.epochs * steps_per_epoch) if steps_per_epoch else tcfg.max_steps
        )

    (run_dir / CONFIG_FILE).write_text(cfg.to_json())
    if verbose:
        print(f"[raylstm] run dir {run_dir}\n[raylstm] resolved config:\n{cfg.to_json()}", flush=True)
    else:
        print(f"[raylstm] run dir {run_dir} (resolved config: {CONFIG_FILE} there)", flush=True)
        print(
            f"[raylstm] {tcfg.num_workers} worker(s), {total_steps} steps; Ray's own log lines are in "
            f"{ray_logs_dir() or 'the Ray session logs'} (--verbose shows them here)",
            flush=True,
        )
    if manifest:
        (run_dir / "data_manifest.json").write_text(
            json.dumps(manifest, indent=2, sort_keys=True, default=str)
        )

    reports_before = len(read_metrics(run_dir)) if (run_dir / METRICS_FILE).exists() else 0
    train_options = ray.train.DataConfig.default_ingest_options()  # the DataContext's limits, kept
    train_options.preserve_order = cfg.data.preserve_order
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "vocab": vocab.to_dict(),
            "conditions": conditions.to_dict() if conditions else None,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "val_kind": val_kind,
            "data_stats_path": "" if store.is_remote(storage_path) else str(run_dir / DATA_STATS_FILE),
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=None if tcfg.use_gpu else {"CPU": tcfg.cpus_per_worker},
            placement_strategy=tcfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints,
                checkpoint_score_attribute="val_bpc",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            callbacks=[RunLog(str(run_dir), run_uri(storage_path, name))],
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Only train is split: every worker reads the whole val set and evaluates its stride of it, so
        # val bpc is over the same reviews whatever the worker count (see train_loop.evaluate). With
        # preserve_order the split hands out blocks in the same order to the same workers every time.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"], execution_options={"train": train_options}
        ),
    )
    with MetricsFollower(run_dir / METRICS_FILE, total_steps, live=False if verbose else None):
        result = trainer.fit()
    raise_if_diverged(run_dir, reports_before)
    return finish_run(cfg, run_dir, result, run_uri(storage_path, name))


# Materialized windows must leave the object store room for what streams beside them (the val reviews,
# the training shard's prefetch, the checkpoints Ray Train puts there): at most this share of it.
MATERIALIZE_STORE_SHARE = 0.5


def object_store_bytes() -> int:
    """The running cluster's object store capacity (every node's together)."""
    return int(ray.cluster_resources().get("object_store_memory", 0))


def materialize_refusal(cfg: Config, manifest: dict | None, store_bytes: int, n_conditions: int = 0) -> str:
    """Why `data.materialize = true` cannot be honoured ("" when it can): the training windows and val
    rows of a prepared corpus (sized from its manifest) would take more than MATERIALIZE_STORE_SHARE of
    the object store, which would spill them all to disk before step 1 and read them back every epoch.
    Such a corpus streams instead, as Ray Data does by default; without a manifest nothing is known, so
    the setting stands."""
    from raylstm.data import window_bytes

    if not manifest or "splits" not in manifest or store_bytes <= 0:
        return ""
    splits = manifest["splits"]
    need = window_bytes(cfg.data, splits["train"], n_conditions)
    val = splits["val"]
    need += window_bytes(cfg.data, val, n_conditions) if cfg.data.window_mode != "full" else val["chars"]
    if need <= MATERIALIZE_STORE_SHARE * store_bytes:
        return ""
    return (
        f"data.materialize: the encoded windows ({need / 2**30:.2f} GiB) would take more than "
        f"{MATERIALIZE_STORE_SHARE:.0%} of the object store ({store_bytes / 2**30:.2f} GiB), so they "
        "stream from the prepared shards instead (set data.materialize = false to say so; "
        "docs/train.md, 'Streaming a large corpus')"
    )


def check_plan(cfg: Config) -> None:
    """Refuse settings that would train, but not as asked, before any worker starts."""
    from raylstm.data import window_shape

    window_shape(cfg.data)  # segment and window settings
    n = cfg.data.segment_windows
    if n > 1 and cfg.train.eval_every % n:
        raise ValueError(
            f"train.eval_every ({cfg.train.eval_every}) must be a multiple of data.segment_windows ({n}): "
            "checkpoints then fall where every batch row starts a new segment from a zero state, so a "
            "resumed run continues exactly as the uninterrupted one (the carried LSTM state is not saved)"
        )


def raise_if_diverged(run_dir: Path, reports_before: int) -> None:
    """The workers stop a diverged run by reporting it (a raising worker would be retried): raise it here,
    with the message that names the setting to change."""
    for line in read_metrics(run_dir)[reports_before:] if (run_dir / METRICS_FILE).exists() else []:
        if line.get("diverged"):
            raise TrainingDiverged(line["diverged"])


def finish_run(
    cfg: Config, run_dir: Path, result: ray.train.Result, run_uri: str | None = None
) -> TrainResult:
    """best.json from the kept checkpoints, the learning curve, and samples from the best checkpoint.

    With `run_uri` (object storage), the best checkpoint is copied down (verified) to sample from, and the
    run's small files are copied up next to the checkpoints; the result names the URIs."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get("val_bpc") is not None]
    if not scored:
        raise RuntimeError(f"{run_dir}: the run finished without a checkpoint carrying val_bpc")
    best_ckpt, best_metrics = min(scored, key=lambda cm: cm[1]["val_bpc"])
    best_dir = Path(best_ckpt.path)
    write_best(run_dir, best_dir.name, _plain(dict(best_metrics)))
    plot_learning_curve(run_dir / METRICS_FILE, run_dir / CURVE_FILE)

    loaded = load_checkpoint(
        store.localize_checkpoint(store.join(run_uri, best_dir.name)) if run_uri else best_dir
    )
    tcfg = cfg.train
    prime, samples = training_samples(
        loaded.model,
        loaded.vocab,
        loaded.config.data,
        tcfg.sample_prime,
        tcfg.sample_chars,
        tcfg.temperatures,
        tcfg.seed,
    )
    text = [
        f"best checkpoint {best_dir.name} (step {loaded.step}), val bpc {best_metrics['val_bpc']:.4f}; "
        f"reproduce with: raylstm sample --checkpoint {best_dir} --prime {shlex.quote(prime)} "
        f"--length {tcfg.sample_chars} --seed {tcfg.seed} --temperature {' '.join(samples)}\n"
    ]
    for t, s in samples.items():
        text.append(f"--- temperature {t}  seed {tcfg.seed} ---\n{prime}{s}\n")
    (run_dir / SAMPLES_TXT).write_text("\n".join(text))
    print("[raylstm] " + "\n".join(text), flush=True)
    if run_uri:
        for f in sorted(run_dir.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                store.write_bytes(store.join(run_uri, f.name), f.read_bytes())
        return TrainResult(run_uri, store.join(run_uri, best_dir.name), dict(best_metrics), result)
    return TrainResult(str(run_dir), str(best_dir), dict(best_metrics), result)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl (a run dir or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Train loss and val loss (bits per char) against step; None when there is nothing to plot."""
    if not metrics_path.exists():
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["train_loss"] / math.log(2)) for r in rows if r.get("train_loss") and r.get("step")]
    va = [(r["step"], r["val_bpc"]) for r in rows if r.get("val_bpc") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train (bits/char)", alpha=0.7)
    if va:
        ax.plot(*zip(*va), "o-", label="val (bits/char)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
