"""What every Ray Train worker runs: shard -> CharLSTM (DDP) -> eval (all-reduce) -> rank-0 checkpoint -> report.

    driver (train.py)                          each worker (this file)
    -----------------                          ------------------------------------------------------
    datasets {"train", "val"}  --split-->      get_dataset_shard("train").iter_torch_batches
    train_loop_config {config, vocab,   -->    restore from get_checkpoint()  (model, optimizer, scheduler,
                       total_steps, ...}         step, epoch, data position)
                                               loop: forward -> loss -> backward (DDP all-reduce) -> clip
                                                     -> AdamW/RMSprop step -> warmup+cosine LR
                                               every log_every:  report(metrics)           (all ranks)
                                               every eval_every: val (all-reduced sums) + samples +
                                                                 report(metrics, checkpoint) (rank 0 writes)

Batches are rows of `ids` (int32): full mode has seq_len+1 ids per row, x = ids[:, :-1], y = ids[:, 1:]
(a loss at every position); seed mode has seed_context+1 ids, x = ids[:, :-1], y = ids[:, -1] (the
original project's one prediction per window).

The small pieces (LR schedule, optimizer, loss, evaluation, sampling, loss guard) are plain functions of
torch objects so tests and benchmarks use them without Ray.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raylstm.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from raylstm.config import Config, TrainConfig
from raylstm.model import build_model, unwrap
from raylstm.ray_env import MIN_REPORT_INTERVAL_S, console_print
from raylstm.sample import training_samples
from raylstm.vocab import CharVocab

LN2 = math.log(2.0)
SAMPLES_FILE = "samples.json"  # written into each checkpoint dir next to the checkpoint's own files


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
    """AdamW with weight decay on matrices only (biases/1-d params are not decayed), or the seed's RMSprop."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "rmsprop":
        # Keras' RMSprop defaults (rho=0.9, eps=1e-7), which the original project used.
        return torch.optim.RMSprop(params, lr=tcfg.lr, alpha=0.9, eps=1e-7)
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


# --- loss and evaluation --------------------------------------------------------------------------------
def split_batch(ids: torch.Tensor, window_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] ids -> (x [B, T], y): y [B, T] in full mode, y [B] (the last id) in seed mode."""
    x = ids[:, :-1]
    return (x, ids[:, -1]) if window_mode == "seed" else (x, ids[:, 1:])


def loss_sum_and_count(model: nn.Module, ids: torch.Tensor, window_mode: str) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy (nats) and the number of predictions it covers."""
    x, y = split_batch(ids, window_mode)
    logits, _ = model(x)
    if window_mode == "seed":
        logits = logits[:, -1]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    y = y.reshape(-1)
    return F.cross_entropy(logits, y, reduction="sum"), y.numel()


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPU when precision is auto/bf16; fp32 elsewhere (CPU bf16 LSTMs are slower, not faster)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    window_mode: str,
    device: torch.device,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    max_batches: int = 0,
) -> tuple[float, int]:
    """Mean validation loss (nats/char) and prediction count over ALL workers.

    Every worker iterates the same (unsplit) validation set and computes every world_size-th batch, then
    the sums are all-reduced: the result is the loss on the whole set, identical on every rank and the
    same for 1 or N workers. `max_batches` caps the global number of batches (0 = all).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if i % world_size != rank:
            continue
        with autocast_for(device, precision):
            s, n = loss_sum_and_count(model, batch["ids"].to(device, non_blocking=True), window_mode)
        total[0] += s.double()
        total[1] += n
    if world_size > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
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


# --- the worker loop ------------------------------------------------------------------------------------
def _restore(model: nn.Module, checkpoint: Any, vocab: CharVocab) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights from a Ray checkpoint into `model`; return (meta-ish dict, optimizer/scheduler state)."""
    with checkpoint.as_directory() as d:
        loaded = load_checkpoint(d)
        if loaded.vocab != vocab:
            from raylstm.checkpoint import CheckpointError

            raise CheckpointError(
                f"{d}: the run's checkpoint was trained with a different vocabulary than this data's; "
                "use a new run name (or the same data) to continue"
            )
        model.load_state_dict(loaded.model.state_dict())
        state = load_training_state(d)
    info = {"step": loaded.step, "epoch": loaded.epoch, "data_position": loaded.data_position}
    return info, state


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config`: config (dict), vocab (dict), total_steps, steps_per_epoch."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    vocab = CharVocab.from_dict(loop_config["vocab"])
    tcfg, mode = cfg.train, cfg.data.window_mode
    total_steps = int(loop_config["total_steps"])
    steps_per_epoch = loop_config.get("steps_per_epoch")

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # One intra-op thread per reserved CPU: two workers on two cores must not each spin up two threads.
    torch.set_num_threads(max(1, int(round(tcfg.cpus_per_worker))))
    device = ray.train.torch.get_device()

    torch.manual_seed(tcfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg.model)
    restored, opt_state = None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        restored, opt_state = _restore(model, ckpt, vocab)
    model = ray.train.torch.prepare_model(model)  # to device; DDP only when world size > 1
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, total_steps)
    step, epoch, batch_in_epoch = 0, 0, 0
    if restored is not None:
        optimizer.load_state_dict(opt_state["optimizer"])
        if opt_state.get("scheduler") is not None:
            scheduler.load_state_dict(opt_state["scheduler"])
        step, epoch = restored["step"], restored["epoch"]
        position = restored["data_position"]
        # Batches are per worker: resumed on a different worker count, the same fraction of the epoch
        # is a different number of batches.
        batch_in_epoch = (
            int(position.get("batch_in_epoch", 0)) * int(position.get("world_size", world)) // world
        )
    restored_from = step if restored is not None else -1
    first_step = step + 1  # the first update this attempt makes: checkpoint step + 1 after a restart
    if rank == 0:
        how = f"resumed from checkpoint step {step}" if restored is not None else "fresh start"
        console_print(
            f"[raylstm] {world} worker(s) on {device}, {unwrap(model).num_parameters():,} parameters, "
            f"{how}; training to step {total_steps}"
        )

    train_shard = ray.train.get_dataset_shard("train")
    val_iter = ray.train.get_dataset_shard("val")

    # Interval accumulators (reset at every report).
    loss_acc, loss_n, chars_acc, preds_acc = 0.0, 0, 0, 0
    t_mark, paused = time.perf_counter(), 0.0

    def agree(flag: bool) -> bool:
        """Rank 0's decision on every rank: all ranks must call report() the same number of times."""
        if world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    last_ckpt_step = step if restored is not None else 0

    def report(with_eval: bool) -> None:
        nonlocal loss_acc, loss_n, chars_acc, preds_acc, t_mark, paused, last_ckpt_step
        elapsed = max(1e-9, time.perf_counter() - t_mark - paused)
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_acc / max(1, loss_n),
            "chars_per_s": chars_acc / elapsed,
            "preds_per_s": preds_acc / elapsed,
            "world_size": world,
            "rank": rank,
            "pid": os.getpid(),
            "restored_from_step": restored_from,
            "attempt_first_step": first_step,
        }
        if steps_per_epoch:
            metrics["epoch_progress"] = epoch + batch_in_epoch / steps_per_epoch
        checkpoint, tmp = None, None
        if with_eval:
            t0 = time.perf_counter()
            batches = val_iter.iter_torch_batches(
                batch_size=tcfg.batch_size, dtypes=torch.long, device=device
            )
            val_loss, val_count = evaluate(
                model, batches, mode, device, tcfg.precision, rank, world, tcfg.max_val_batches
            )
            metrics.update(val_loss=val_loss, val_bpc=val_loss / LN2, val_count=val_count)
            if rank == 0:
                # raylstm.sample's one sampler: `raylstm sample --seed <sample_seed>` on this checkpoint
                # (same prime, temperatures, length) prints exactly these samples.
                prime, samples, sample_seed = tcfg.sample_prime, {}, tcfg.seed + step
                if tcfg.sample_every_eval and tcfg.sample_chars > 0:
                    prime, samples = training_samples(
                        model, vocab, cfg.data, prime, tcfg.sample_chars, tcfg.temperatures, sample_seed
                    )
                tmp = Path(tempfile.mkdtemp(prefix="raylstm-ckpt-"))
                path = save_checkpoint(
                    tmp / "ckpt",
                    model,
                    vocab,
                    cfg,
                    step=step,
                    epoch=epoch,
                    metrics=metrics,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    data_position={"epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": world},
                )
                (path / SAMPLES_FILE).write_text(
                    json.dumps(
                        {"step": step, "prime": prime, "seed": sample_seed, "samples": samples}, indent=1
                    )
                )
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
                _print_samples(step, prime, sample_seed, samples)
            last_ckpt_step = step
            paused += time.perf_counter() - t0
        if rank == 0:
            _print_progress(metrics, total_steps)
        # Every rank reports the same number of times (a barrier); only rank 0 hands over a checkpoint.
        # Checkpoint reports upload synchronously (the temp dir is removed next); metrics-only reports are
        # queued in the background so training never waits for the controller to collect them.
        if with_eval:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}")
        else:
            ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # persisted to storage by now (synchronous upload)
        loss_acc, loss_n, chars_acc, preds_acc = 0.0, 0, 0, 0
        t_mark, paused = time.perf_counter(), 0.0

    model.train()
    while step < total_steps and epoch < tcfg.epochs:
        batches = train_shard.iter_torch_batches(
            batch_size=tcfg.batch_size,
            dtypes=torch.long,
            device=device,
            drop_last=True,  # equal batch counts on every rank keep DDP's collectives in lockstep
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        )
        # After a restart mid-epoch, skip the batches that epoch already trained on (data is read, not
        # computed): the epoch keeps its length. The shuffle order differs, so these are not the exact
        # same windows, but each epoch still sees its share of the data.
        skip, seen = batch_in_epoch, 0
        for batch in batches:
            seen += 1
            if seen <= skip:
                continue
            if step >= total_steps:
                break
            ids = batch["ids"]
            with autocast_for(device, tcfg.precision):
                loss_sum, n = loss_sum_and_count(model, ids, mode)
                loss = loss_sum / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            batch_in_epoch = seen
            loss_value = loss.item()
            check_loss(loss_value, step, tcfg.max_loss)
            loss_acc += loss_value
            loss_n += 1
            chars_acc += ids.shape[0] * (ids.shape[1] - 1)
            preds_acc += n
            if step % tcfg.eval_every == 0 or step == total_steps:
                report(with_eval=True)
            elif step == first_step or (
                step % tcfg.log_every == 0 and agree(time.perf_counter() - t_mark >= MIN_REPORT_INTERVAL_S)
            ):
                report(with_eval=False)
        if step >= total_steps:
            break
        epoch += 1
        batch_in_epoch = 0
    if last_ckpt_step != step:
        # Epochs ran out before total_steps (or between evals): end on a checkpoint so nothing is lost.
        report(with_eval=True)


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
