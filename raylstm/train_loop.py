"""What every Ray Train worker runs: shard -> CharLSTM (DDP) -> eval (all-reduce) -> rank-0 checkpoint -> report.

    driver (train.py)                          each worker (this file)
    -----------------                          ------------------------------------------------------
    datasets {"train", "val"}  --split-->      get_dataset_shard("train"): segments of windows
    train_loop_config {config, vocab,   -->    resume(): model, optimizer, scheduler, position from
                       plan}                     get_checkpoint()
                                               per window: train_step (forward from the carried state ->
                                                 loss -> backward (DDP all-reduce) -> clip -> step -> LR)
                                               every log_every (and at each eval): agree_on_step:
                                                 the steps' mean losses and rank 0's report decision
                                                 (one all-reduce); a diverged loss stops every rank
                                               every log_every:  report(interval metrics)    (all ranks)
                                               every eval_every: evaluate_and_checkpoint: val bpc
                                                 (all-reduced) + samples + report(metrics, checkpoint)

Training rows are segments of `segment_windows` consecutive windows (data.window_dataset); a batch is B
segments, and each of its windows is one optimizer step:

    batch ids [B, n*T+1]   row b: |-- window 0 --|-- window 1 --| ... |-- window n-1 --|
    step k:  x = ids[:, kT : kT+T], y = ids[:, kT+1 : kT+T+1]; state (h, c) [L, B, H] from step k-1,
             detached (truncated BPTT); a new batch starts every row from a zero state.

Seed mode rows are the original's windows: x = ids[:, :-1], y = ids[:, -1] (one prediction per window).

A conditioned model's rows also carry cond [B, n*T+1, F] (data.stream_condition_rows): each id's review's
condition ids, cut into windows exactly as ids are; a window's x is read with cond[:, 1:], the
conditions of the characters it predicts.

The small pieces (LR schedule, optimizer, loss, evaluation, sampling, loss guard, train step) are plain
functions of torch objects so tests and benchmarks use them without Ray.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raylstm.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
)
from raylstm.conditions import ConditionVocab
from raylstm.config import Config, TrainConfig
from raylstm.model import LSTMState, build_model, unwrap
from raylstm.ray_env import MIN_REPORT_INTERVAL_S, console_print
from raylstm.sample import training_samples
from raylstm.vocab import CharVocab

LN2 = math.log(2.0)
SAMPLES_FILE = "samples.json"  # written into each checkpoint dir next to the checkpoint's own files
# Val reviews per batch: scored length-sorted, so long batches pad little (measured on 2 cores: batches
# of 32 reviews took ~20 s for the ~550 k chars of all sources' val reviews; see docs/train.md).
VAL_REVIEWS_PER_BATCH = 512


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exceeded train.max_loss: continuing would only write garbage checkpoints."""


# --- learning rate --------------------------------------------------------------------------------------
def lr_multiplier(it: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for update number `it` (0-based): linear warmup, then cosine to min_lr_ratio.

       1.0 |     ____
           |    /    `--.
           |   /         `-.
    min    |  /             `----------
           +--+-------------+----------> it
             warmup        total
    """
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it >= total_steps:
        return min_lr_ratio
    progress = (it - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases/1-d params are not decayed), the seed's RMSprop,
    or plain SGD (no momentum, no decay: an update linear in the gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "rmsprop":
        # Keras' RMSprop defaults (rho=0.9, eps=1e-7), which the original project used.
        return torch.optim.RMSprop(params, lr=tcfg.lr, alpha=0.9, eps=1e-7)
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tcfg.lr, momentum=0.0)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))


def make_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig, total_steps: int):
    """LambdaLR over `lr_multiplier`; a partial (not a lambda) so its state_dict is plain data."""
    fn = functools.partial(
        lr_multiplier, warmup_steps=tcfg.warmup_steps, total_steps=total_steps, min_lr_ratio=tcfg.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# --- loss, one training step, evaluation ----------------------------------------------------------------
def split_batch(ids: torch.Tensor, window_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] ids -> (x [B, T], y): y [B, T] in full mode, y [B] (the last id) in seed mode."""
    x = ids[:, :-1]
    return (x, ids[:, -1]) if window_mode == "seed" else (x, ids[:, 1:])


def loss_sum_and_count(
    model: nn.Module, ids: torch.Tensor, window_mode: str, cond: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy (nats) and the number of predictions it covers, from a zero state."""
    loss_sum, n, _ = window_loss(model, ids, window_mode, None, cond)
    return loss_sum, n


def window_loss(
    model: nn.Module,
    ids: torch.Tensor,
    window_mode: str,
    state: LSTMState | None,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, LSTMState]:
    """Summed cross-entropy (nats) of one window read from `state`, its prediction count, and the LSTM
    state after the window (the state the next window of the same stream starts from). `cond` [B, T+1, F]:
    the window's condition ids (a conditioned model), read beside the targets."""
    x, y = split_batch(ids, window_mode)
    if cond is None:
        logits, state = model(x, state)
    else:
        logits, state = model(x, state, cond[:, 1:])
    if window_mode == "seed":
        logits = logits[:, -1]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    y = y.reshape(-1)
    return F.cross_entropy(logits, y, reduction="sum"), y.numel(), state


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPU when precision is auto/bf16; fp32 elsewhere (CPU bf16 LSTMs are slower, not faster)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def segment_windows(segments: torch.Tensor, seq_len: int) -> Iterator[torch.Tensor]:
    """[B, n*T+1] segment ids -> n consecutive windows [B, T+1]; window j+1 starts where window j's x ends.
    (Condition ids [B, n*T+1, F] are cut the same way.)"""
    n = (segments.shape[1] - 1) // seq_len
    for j in range(n):
        yield segments[:, j * seq_len : (j + 1) * seq_len + 1]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ids: torch.Tensor,
    state: LSTMState | None,
    tcfg: TrainConfig,
    window_mode: str,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, LSTMState]:
    """One optimizer update on one window from `state`: (mean loss, predictions, state after the window).

    The returned state is detached: the next window starts from it, but gradients stop here (truncated
    BPTT). The loss stays a tensor so the caller decides when to synchronise.
    """
    with autocast_for(ids.device, tcfg.precision):
        loss_sum, n, state = window_loss(model, ids, window_mode, state, cond)
        loss = loss_sum / n
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tcfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach(), n, (state[0].detach(), state[1].detach())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    window_mode: str,
    device: torch.device,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    max_batches: int = 0,
    vocab: CharVocab | None = None,
    conditions: ConditionVocab | None = None,
) -> tuple[float, int]:
    """Mean validation loss (nats/char) and prediction count over ALL workers.

    A batch is either reviews {"text": [...]} (each scored whole from a zero state after "\\n", exactly as
    `raylstm evaluate` scores the test split: every character with the whole review before it; needs
    `vocab`) or windows {"ids": [B, T+1]} (seed mode: the window the model was trained on). A conditioned
    model (`conditions`) reads each review with its own rating/category (the batch's columns), each
    window with its "cond".
    Every worker iterates the same (unsplit) validation set and computes its share: every world_size-th
    review of each batch of reviews (balanced, and long batches sort by length into few padded
    forwards), or every world_size-th batch of windows. The sums are then all-reduced: the result is
    the loss on the whole set, identical on every rank and the same for 1 or N workers. `max_batches`
    caps the number of batches read (0 = all).
    """
    from raylstm.evaluate import score_reviews

    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if "text" in batch:
            cond = None if conditions is None else conditions.encode_rows(batch)[rank::world_size]
            texts = [str(t) for t in batch["text"][rank::world_size]]
            bits, chars, _ = (
                score_reviews(bare, vocab, texts, device=device, conditions=cond) if texts else (0.0, 0, 0)
            )
            total[0] += bits * LN2
            total[1] += chars
        elif i % world_size == rank:
            with autocast_for(device, precision):
                ids = batch["ids"].to(device, non_blocking=True)
                cond = batch["cond"].to(device) if "cond" in batch else None
                s, n = loss_sum_and_count(bare, ids, window_mode, cond)
            total[0] += s.double()
            total[1] += n
    if world_size > 1:
        torch.distributed.all_reduce(total)
    bare.train(was_training)
    count = int(total[1].item())
    return (total[0].item() / count if count else float("nan")), count


def check_loss(loss: float, step: int, max_loss: float) -> None:
    """Stop the run on NaN/inf or exploding loss, saying what to change."""
    if not math.isfinite(loss) or loss > max_loss:
        raise TrainingDiverged(
            f"training diverged at step {step}: loss {loss:.4g} nats (limit train.max_loss={max_loss}). "
            "Lower train.lr, raise train.warmup_steps or tighten train.grad_clip; checkpoints before this "
            "step are intact."
        )


# --- the worker's pieces --------------------------------------------------------------------------------
@dataclass
class Worker:
    """What one worker knows and never changes during an attempt."""

    cfg: Config
    vocab: CharVocab
    total_steps: int
    steps_per_epoch: int | None  # None when the driver did not count the windows (streamed data)
    val_kind: str  # "reviews" (score whole reviews) or "windows" (seed mode)
    rank: int
    world: int
    device: torch.device
    conditions: ConditionVocab | None = None  # a conditioned model's condition vocabulary
    # Where rank 0 writes Ray Data's stats of its training shard when it ends (how fast the input
    # pipeline could feed, against what training took: `DataIterator.stats()`); "" = nowhere.
    data_stats_path: str = ""

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> Worker:
        import ray.train
        import ray.train.torch

        cfg = Config.from_dict(loop_config["config"])
        # One intra-op thread per reserved CPU: two workers on two cores must not each spin up two threads.
        torch.set_num_threads(max(1, int(round(cfg.train.cpus_per_worker))))
        ctx = ray.train.get_context()
        return cls(
            cfg=cfg,
            vocab=CharVocab.from_dict(loop_config["vocab"]),
            conditions=ConditionVocab.from_dict(loop_config["conditions"])
            if loop_config.get("conditions")
            else None,
            total_steps=int(loop_config["total_steps"]),
            steps_per_epoch=loop_config.get("steps_per_epoch"),
            val_kind=loop_config.get("val_kind", "windows"),
            data_stats_path=loop_config.get("data_stats_path", ""),
            rank=ctx.get_world_rank(),
            world=ctx.get_world_size(),
            device=ray.train.torch.get_device(),
        )

    @property
    def windows_per_row(self) -> int:
        return self.cfg.data.segment_windows if self.cfg.data.window_mode == "full" else 1


@dataclass
class Position:
    """Where training is: global step, epoch, and optimizer steps taken in this epoch (on this worker
    count). Saved in every checkpoint as `data_position`."""

    step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0

    def to_dict(self, w: Worker) -> dict[str, Any]:
        # Windows of this epoch read by all workers together: what a resume on another worker count needs.
        windows = self.steps_in_epoch * w.cfg.train.batch_size * w.world
        return {
            "epoch": self.epoch,
            "steps_in_epoch": self.steps_in_epoch,
            "windows_in_epoch": windows,
            "world_size": w.world,
            "batch_size": w.cfg.train.batch_size,
        }

    @classmethod
    def from_checkpoint(cls, step: int, epoch: int, data_position: dict[str, Any], w: Worker) -> Position:
        """The position to continue from. On the same worker count and batch size it is exact; otherwise
        the same share of the epoch's windows is skipped (a whole number of segment batches, rounded
        down), since each worker's shard is then a different part of the data anyway."""
        if "windows_in_epoch" in data_position:
            windows = int(data_position["windows_in_epoch"])
        else:  # checkpoints written before segments: batch_in_epoch batches of the same batch size
            windows = int(data_position.get("batch_in_epoch", 0)) * w.cfg.train.batch_size
            windows *= int(data_position.get("world_size", w.world))
        per_step = w.cfg.train.batch_size * w.world
        steps = windows // per_step
        steps -= steps % w.windows_per_row
        return cls(step=step, epoch=epoch, steps_in_epoch=steps)


def restore(
    checkpoint: Any,
    vocab: CharVocab,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    conditions: ConditionVocab | None = None,
) -> LoadedCheckpoint:
    """Load a Ray checkpoint's weights, optimizer and scheduler state into the given objects (in place);
    returns the loaded checkpoint (step, epoch, data_position). Refuses another vocabulary (of
    characters or of conditions)."""
    with checkpoint.as_directory() as d:
        loaded = load_checkpoint(d)
        if loaded.vocab != vocab:
            raise CheckpointError(
                f"{d}: the run's checkpoint was trained with a different vocabulary than this data's; "
                "use a new run name (or the same data) to continue"
            )
        theirs = loaded.conditions.fingerprint() if loaded.conditions else None
        if theirs != (conditions.fingerprint() if conditions else None):
            raise CheckpointError(
                f"{d}: the run's checkpoint was trained with other conditions ({loaded.conditions}) than "
                f"this run's ({conditions}); use a new run name to continue"
            )
        unwrap(model).load_state_dict(loaded.model.state_dict())
        state = load_training_state(d)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return loaded


def resume(w: Worker, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Position | None:
    """Continue from this run's latest checkpoint, if it has one: its state, and where to read on."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    loaded = restore(checkpoint, w.vocab, model, optimizer, scheduler, w.conditions)
    return Position.from_checkpoint(loaded.step, loaded.epoch, loaded.data_position, w)


Window = tuple[
    torch.Tensor, torch.Tensor | None, bool
]  # ids [B, T+1], cond [B, T+1, F] or None, starts_segment


def epoch_windows(w: Worker, shard: Any, epoch: int, skip_steps: int) -> Iterator[Window]:
    """(window ids [B, T+1], its condition ids or None, starts_segment) for every optimizer step of one
    epoch, after skipping the first `skip_steps` (a resume: the batches are read, not computed on, so the
    epoch keeps its length).

    With data.preserve_order the order is the same in every attempt: the shard's blocks are dispatched
    deterministically and the local shuffle is seeded by (seed, epoch, rank).
    """
    dcfg, tcfg = w.cfg.data, w.cfg.train
    seed = None
    if dcfg.preserve_order:
        seed = int.from_bytes(
            hashlib.blake2b(f"{tcfg.seed}/{epoch}/{w.rank}".encode(), digest_size=4).digest()
        )
    batches = shard.iter_torch_batches(
        batch_size=tcfg.batch_size,
        dtypes=torch.long,
        device=w.device,
        drop_last=True,  # equal batch counts on every rank keep DDP's collectives in lockstep
        local_shuffle_buffer_size=dcfg.shuffle_buffer or None,
        local_shuffle_seed=seed if dcfg.shuffle_buffer else None,
    )
    n, seen = w.windows_per_row, 0
    for batch in batches:
        if seen + n <= skip_steps:
            seen += n
            continue
        rows, cond_rows = batch["ids"], batch.get("cond")
        full = dcfg.window_mode == "full"
        windows = segment_windows(rows, dcfg.seq_len) if full else iter([rows])
        conds: Iterator[torch.Tensor | None] = (
            itertools.repeat(None)
            if cond_rows is None
            else segment_windows(cond_rows, dcfg.seq_len)
            if full
            else iter([cond_rows])
        )
        for j, (window, cond) in enumerate(zip(windows, conds)):
            if seen >= skip_steps:
                yield window, cond, j == 0 or seen == skip_steps
            seen += 1


def agree_on_step(losses: list[torch.Tensor], want_report: bool, w: Worker) -> tuple[list[float], bool]:
    """(each listed step's mean loss over all ranks, rank 0's report decision), the same on every rank, in
    one all-reduce.

    Every rank must stop at the same step when the loss diverges, and call report() the same number of
    times (it is a barrier), so both decisions are taken on shared numbers. The loop keeps each step's
    loss on the device and agrees on them at its sync points only (`is_sync_step`): a collective per step
    is a second barrier per step, where the faster rank waits for the slower one."""
    flag = 1.0 if (want_report and w.rank == 0) else 0.0
    device = losses[0].device if losses else w.device
    t = torch.stack([*(loss.float() for loss in losses), torch.tensor(flag, device=device)])
    if w.world > 1:
        torch.distributed.all_reduce(t)
    *sums, flag_sum = t.tolist()
    return [s / w.world for s in sums], flag_sum > 0


def is_sync_step(step: int, first_step: int, tcfg: TrainConfig, total_steps: int) -> bool:
    """Whether the ranks agree on the losses after update `step`: every log_every steps, at each
    evaluation and the last step (no checkpoint is written after an unchecked loss), and at the attempt's
    first step (its report). The same answer on every rank."""
    return (
        step % tcfg.log_every == 0 or step % tcfg.eval_every == 0 or step == total_steps or step == first_step
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one worker's update number `step`: dropout masks then depend only on (seed, step,
    rank), so a resumed run draws the masks the uninterrupted run would have, and ranks draw different
    ones."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()) >> 1


@dataclass
class IntervalMeter:
    """Train loss and throughput since the last report, with evaluation/checkpoint time left out."""

    loss_sum: float = 0.0
    losses: int = 0  # steps whose (all-rank mean) loss is in loss_sum
    steps: int = 0
    chars: int = 0
    preds: int = 0
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0

    def add(self, chars: int, preds: int) -> None:
        self.steps += 1
        self.chars += chars
        self.preds += preds

    def add_losses(self, losses: list[float]) -> None:
        self.loss_sum += sum(losses)
        self.losses += len(losses)

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @contextmanager
    def paused_while(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        secs = max(1e-9, self.seconds())
        return {
            "train_loss": self.loss_sum / max(1, self.losses),
            "chars_per_s": self.chars / secs,
            "preds_per_s": self.preds / secs,
        }

    def reset(self) -> None:
        self.__init__()


class Trace:
    """A worker's own record (train.trace_dir): the state it restored, and every window it trained on.

    Tests compare it with independent references (the checkpoint files, the dataset's rows). Writing it
    costs a hash per batch row per step, so it is off (None) unless train.trace_dir is set."""

    def __init__(self, directory: str, rank: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._windows = open(self.dir / f"windows-rank{rank}-pid{os.getpid()}.jsonl", "a")

    def restored(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """The state this attempt starts from (before its first update): weights, optimizer tensors, LR."""
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optimizer.{idx}.{name}"] = v.detach().cpu().contiguous().reshape(v.shape)
        stem = self.dir / f"restore-step{step:07d}-rank{self.rank}-pid{os.getpid()}"
        save_file(tensors, f"{stem}.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        info = {"step": step, "lr": [g["lr"] for g in optimizer.param_groups], "scheduler": sched}
        Path(f"{stem}.json").write_text(json.dumps(info, indent=1))

    def window(self, step: int, epoch: int, ids: torch.Tensor, reset: bool) -> None:
        """Update `step` reads `ids` [B, T+1], from a zero state when `reset` (else the carried one)."""
        rows = ids.to("cpu", torch.int32).numpy()
        digests = [hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in rows]
        line = {"step": step, "epoch": epoch, "reset": reset, "rows": digests}
        self._windows.write(json.dumps(line) + "\n")
        self._windows.flush()


def evaluate_and_checkpoint(
    w: Worker,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    pos: Position,
    metrics: dict[str, Any],
) -> None:
    """Validation bpc (all ranks), then rank 0 writes a checkpoint with samples into a directory that
    lives exactly as long as the report that uploads it (Ray's example pattern)."""
    import ray.train

    tcfg = w.cfg.train
    val = ray.train.get_dataset_shard("val")
    if w.val_kind == "reviews":
        batches = val.iter_batches(batch_size=VAL_REVIEWS_PER_BATCH, batch_format="numpy")
    else:
        batches = val.iter_torch_batches(batch_size=tcfg.batch_size, dtypes=torch.long, device=w.device)
    val_loss, val_count = evaluate(
        model, batches, w.cfg.data.window_mode, w.device, tcfg.precision, w.rank, w.world,
        tcfg.max_val_batches, w.vocab, w.conditions,
    )  # fmt: skip
    metrics.update(val_loss=val_loss, val_bpc=val_loss / LN2, val_count=val_count)
    if w.rank == 0:
        _print_progress(metrics, w.total_steps)
    with tempfile.TemporaryDirectory(prefix="raylstm-ckpt-") as tmp:
        checkpoint = None
        if w.rank == 0:
            path = save_checkpoint(
                Path(tmp) / "ckpt",
                model,
                w.vocab,
                w.cfg,
                step=pos.step,
                epoch=pos.epoch,
                conditions=w.conditions,
                metrics=metrics,
                optimizer=optimizer,
                scheduler=scheduler,
                data_position=pos.to_dict(w),
            )
            prime, seed, samples = _samples(w, model, pos.step)
            (path / SAMPLES_FILE).write_text(
                json.dumps({"step": pos.step, "prime": prime, "seed": seed, "samples": samples}, indent=1)
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        # Every rank reports (a barrier); only rank 0 hands over a checkpoint, uploaded synchronously
        # before the temporary directory goes.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{pos.step:07d}")


def report_metrics(w: Worker, metrics: dict[str, Any]) -> None:
    """A metrics-only report, queued in the background: training never waits for the controller."""
    import ray.train

    if w.rank == 0:
        _print_progress(metrics, w.total_steps)
    ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def _samples(w: Worker, model: nn.Module, step: int) -> tuple[str, int, dict[str, str]]:
    """(prime as the model read it, seed, {temperature: text}) from raylstm.sample's one sampler:
    `raylstm sample --seed <seed>` on this checkpoint (same prime, temperatures, length) prints them."""
    tcfg = w.cfg.train
    seed = tcfg.seed + step
    if not (tcfg.sample_every_eval and tcfg.sample_chars > 0):
        return tcfg.sample_prime, seed, {}
    prime, samples = training_samples(
        model, w.vocab, w.cfg.data, tcfg.sample_prime, tcfg.sample_chars, tcfg.temperatures, seed
    )
    _print_samples(step, prime, seed, samples)
    return prime, seed, samples


def training_windows(w: Worker, shard: Any, pos: Position) -> Iterator[Window]:
    """`epoch_windows` of one epoch after another until total_steps or train.epochs run out; moves
    `pos` to the next epoch between them."""
    while pos.step < w.total_steps and pos.epoch < w.cfg.train.epochs:
        for window in epoch_windows(w, shard, pos.epoch, pos.steps_in_epoch):
            if pos.step >= w.total_steps:
                return
            yield window
        if pos.step < w.total_steps:
            pos.epoch += 1
            pos.steps_in_epoch = 0


def interval_metrics(
    w: Worker, pos: Position, optimizer: torch.optim.Optimizer, meter: IntervalMeter, attempt: dict[str, Any]
) -> dict[str, Any]:
    m = {
        "step": pos.step,
        "epoch": pos.epoch,
        "lr": optimizer.param_groups[0]["lr"],
        **attempt,
        **meter.metrics(),
    }
    if w.steps_per_epoch:
        m["epoch_progress"] = pos.epoch + pos.steps_in_epoch / w.steps_per_epoch
    return m


# --- the worker loop ------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config`: config (dict), vocab (dict), conditions (dict or None),
    total_steps, steps_per_epoch, val_kind."""
    import ray.train
    import ray.train.torch

    w = Worker.from_loop_config(loop_config)
    tcfg = w.cfg.train
    torch.manual_seed(tcfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    model = ray.train.torch.prepare_model(build_model(w.cfg.model))  # to device; DDP when world size > 1
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, w.total_steps)
    restored = resume(w, model, optimizer, scheduler)
    pos = restored or Position()
    trace = Trace(tcfg.trace_dir, w.rank) if tcfg.trace_dir else None
    if trace and restored:
        trace.restored(pos.step, model, optimizer, scheduler)
    attempt = {
        "world_size": w.world,
        "rank": w.rank,
        "pid": os.getpid(),
        "restored_from_step": pos.step if restored else -1,
        "attempt_first_step": pos.step + 1,
    }
    if w.rank == 0:
        how = f"resumed from checkpoint step {pos.step}" if restored else "fresh start"
        console_print(
            f"[raylstm] {w.world} worker(s) on {w.device}, {unwrap(model).num_parameters():,} parameters, "
            f"{how}; training to step {w.total_steps}"
        )

    shard = ray.train.get_dataset_shard("train")
    train_steps(w, model, optimizer, scheduler, shard, pos, restored is not None, trace, attempt)
    write_data_stats(w, shard)  # also after a diverged run: where its data time went is part of the story


def train_steps(
    w: Worker,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    shard: Any,
    pos: Position,
    restored: bool,
    trace: Trace | None,
    attempt: dict[str, Any],
) -> None:
    """Steps from `pos` to the run's last step (or until the shard's epochs run out), agreeing on the
    losses at every sync point, evaluating and checkpointing every eval_every steps and at the end.
    Returns early, on every rank alike, when a loss diverged (see settle_losses)."""
    tcfg, mode = w.cfg.train, w.cfg.data.window_mode
    meter, state, checkpointed = IntervalMeter(), None, pos.step if restored else None
    losses: list[torch.Tensor] = []  # the updates' losses since the ranks last agreed, on the device
    model.train()
    for window, cond, starts_segment in training_windows(w, shard, pos):
        state = None if starts_segment else state
        if trace:
            trace.window(pos.step + 1, pos.epoch, window, reset=state is None)
        torch.manual_seed(step_seed(tcfg.seed, pos.step + 1, w.rank))
        loss, preds, state = train_step(model, optimizer, scheduler, window, state, tcfg, mode, cond)
        pos.step += 1
        pos.steps_in_epoch += 1
        losses.append(loss)
        meter.add(window.shape[0] * (window.shape[1] - 1), preds)
        if not is_sync_step(pos.step, attempt["attempt_first_step"], tcfg, w.total_steps):
            continue
        want_report = pos.step % tcfg.log_every == 0 and meter.seconds() >= MIN_REPORT_INTERVAL_S
        report_due = settle_losses(w, losses, want_report, pos, optimizer, meter, attempt)
        if report_due is None:
            return  # diverged: every rank reported it (see settle_losses)
        if pos.step % tcfg.eval_every == 0 or pos.step == w.total_steps:
            with meter.paused_while():
                metrics = interval_metrics(w, pos, optimizer, meter, attempt)
                evaluate_and_checkpoint(w, model, optimizer, scheduler, pos, metrics)
            checkpointed = pos.step
            meter.reset()
        elif report_due or pos.step == attempt["attempt_first_step"]:
            report_metrics(w, interval_metrics(w, pos, optimizer, meter, attempt))
            meter.reset()
    if checkpointed != pos.step:
        # The epochs ran out before total_steps: end on a checkpoint so nothing trained is lost (every
        # rank runs out at the same step: equal batch counts, drop_last).
        if losses and settle_losses(w, losses, False, pos, optimizer, meter, attempt) is None:
            return
        evaluate_and_checkpoint(
            w, model, optimizer, scheduler, pos, interval_metrics(w, pos, optimizer, meter, attempt)
        )


def write_data_stats(w: Worker, shard: Any) -> None:
    """Rank 0's training shard's Ray Data stats (operators, throughput, time the loop was blocked on
    data) to `w.data_stats_path`, when this worker runs where that directory is (a local run; a worker
    on another node of a cluster has no such directory and writes nothing)."""
    if w.rank != 0 or not w.data_stats_path or not Path(w.data_stats_path).parent.is_dir():
        return
    Path(w.data_stats_path).write_text(shard.stats())


def settle_losses(
    w: Worker,
    losses: list[torch.Tensor],
    want_report: bool,
    pos: Position,
    optimizer: torch.optim.Optimizer,
    meter: IntervalMeter,
    attempt: dict[str, Any],
) -> bool | None:
    """Agree on the losses of the updates since the last sync point (`agree_on_step`; empties `losses`)
    and add them to the meter. Returns rank 0's report decision, or None when one of those updates'
    mean loss diverged: then every rank has reported it and must return (returned, not raised: Ray
    Train retries a raising worker max_failures times; the driver raises it). The message names the
    first diverged update; nothing was checkpointed after it, since every checkpoint is a sync point."""
    import ray.train

    means, report_due = agree_on_step(losses, want_report, w)
    first = pos.step - len(losses) + 1
    losses.clear()
    meter.add_losses(means)
    for i, mean_loss in enumerate(means):
        try:
            check_loss(mean_loss, first + i, w.cfg.train.max_loss)
        except TrainingDiverged as e:
            ray.train.report({**interval_metrics(w, pos, optimizer, meter, attempt), "diverged": str(e)})
            return None
    return report_due


def _print_progress(m: dict[str, Any], total_steps: int) -> None:
    parts = [f"step {m['step']}/{total_steps}", f"ep {m['epoch']}", f"loss {m['train_loss']:.3f}"]
    if "val_bpc" in m:
        parts.append(f"val {m['val_loss']:.3f} ({m['val_bpc']:.3f} bpc)")
    parts += [f"lr {m['lr']:.2e}", f"{m['chars_per_s'] / 1000:.1f}k chars/s/worker x{m['world_size']}"]
    console_print("[raylstm] " + " | ".join(parts))


def _print_samples(step: int, prime: str, seed: int, samples: dict[str, str]) -> None:
    for t, text in samples.items():
        snippet = (prime + text).replace("\n", " / ")[:160]
        console_print(f"[raylstm] sample step {step} T={t} seed {seed}: {snippet}")
