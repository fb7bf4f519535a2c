"""The one on-disk checkpoint format: tensors and JSON only, verified on load.

A checkpoint is a directory:

    model.safetensors    weights (safetensors: no pickle, no code)
    optimizer.pt         optimizer + scheduler state, loaded with torch.load(weights_only=True)
    vocab.json           the CharVocab the model was trained with
    conditions.json      a conditioned model's ConditionVocab (its fields, values, training counts);
                         absent for an unconditioned model, whose files are exactly as they always were
    meta.json            format/version, step, epoch, data position, metrics, resolved config,
                         and the sha256 of every file above

A run directory holds many checkpoints and a `best.json` that names the best one by val bpc; every
loader here accepts either. Writes go to a temporary sibling directory that is renamed into place only
when complete, so a half-written checkpoint never replaces a good one; a missing file or a checksum that
does not match is refused with an error naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raylstm import storage
from raylstm.conditions import ConditionVocab
from raylstm.config import Config
from raylstm.model import CharLSTM, build_model, unwrap
from raylstm.vocab import CharVocab

FORMAT = "raylstm-checkpoint"
VERSION = 1
WEIGHTS, OPTIMIZER, VOCAB, META, BEST = (
    "model.safetensors",
    "optimizer.pt",
    "vocab.json",
    "meta.json",
    "best.json",
)
CONDITIONS = "conditions.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match what it is loaded into."""


@dataclass
class LoadedCheckpoint:
    model: CharLSTM
    vocab: CharVocab
    config: Config
    path: Path
    step: int = 0
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    data_position: dict[str, Any] = field(default_factory=dict)
    conditions: ConditionVocab | None = None  # a conditioned model's condition vocabulary


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    vocab: CharVocab,
    config: Config,
    *,
    step: int,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_position: dict[str, Any] | None = None,
    conditions: ConditionVocab | None = None,
) -> Path:
    """Write a complete checkpoint to `directory` (which must not exist yet) and return it. A conditioned
    model (config.model.conditions) needs its `conditions` vocabulary."""
    directory = Path(directory)
    fields = list(config.model.conditions)
    if fields != (list(conditions.fields) if conditions else []):
        raise CheckpointError(
            f"{directory}: the model is conditioned on {fields} but the condition vocabulary given is "
            f"{conditions!r}"
        )
    if directory.exists():
        raise CheckpointError(f"{directory}: refusing to overwrite an existing checkpoint")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        files = [WEIGHTS, VOCAB]
        if optimizer is not None:
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None,
                },
                tmp / OPTIMIZER,
            )
            files.append(OPTIMIZER)
        vocab.save(tmp / VOCAB)
        if conditions is not None:
            conditions.save(tmp / CONDITIONS)
            files.append(CONDITIONS)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "metrics": metrics or {},
            "data_position": data_position or {},
            "config": config.to_dict(),
            "vocab_fingerprint": vocab.fingerprint(),
            **({"conditions_fingerprint": conditions.fingerprint()} if conditions else {}),
            "sha256": {name: storage.sha256(tmp / name) for name in files},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose best.json names one."""
    path = Path(path)
    if (path / META).exists():
        return path
    best = path / BEST
    if best.exists():
        try:
            target = json.loads(best.read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{best}: not a valid best.json ({e})") from e
        target = Path(target)
        return target if target.is_absolute() else (path / target)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    raise CheckpointError(f"{path}: neither a checkpoint (no {META}) nor a run directory (no {BEST})")


def read_meta(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """meta.json of a checkpoint, after checking that every listed file is present and intact."""
    path = resolve_checkpoint(path)
    meta_path = path / META
    if not meta_path.exists():
        raise CheckpointError(f"{path}: missing {META} (incomplete checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: corrupt JSON ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} v{VERSION} checkpoint")
    if verify:
        for name, digest in meta["sha256"].items():
            f = path / name
            if not f.exists():
                raise CheckpointError(f"{f}: missing file listed in {META}")
            if storage.sha256(f) != digest:
                raise CheckpointError(f"{f}: checksum mismatch (corrupt or modified checkpoint)")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load weights, vocab and config of a checkpoint (or a run's best) into a model in eval mode."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    removed: list[str] = []
    config = Config.from_dict(meta["config"], unknown=removed)
    if removed:  # written by an older raylstm: options since removed do not change the model
        warnings.warn(
            f"{ckpt / META}: ignoring config fields this version no longer has: {', '.join(removed)}",
            stacklevel=2,
        )
    vocab = CharVocab.load(ckpt / VOCAB)
    if vocab.fingerprint() != meta.get("vocab_fingerprint"):
        raise CheckpointError(f"{ckpt / VOCAB}: vocabulary does not match the one the model was trained with")
    config.model.vocab_size = len(vocab)
    conditions = None
    if config.model.conditions:
        if CONDITIONS not in meta["sha256"]:
            raise CheckpointError(f"{ckpt}: a conditioned model's checkpoint without {CONDITIONS}")
        try:
            conditions = ConditionVocab.load(ckpt / CONDITIONS)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        if conditions.fingerprint() != meta.get("conditions_fingerprint"):
            raise CheckpointError(
                f"{ckpt / CONDITIONS}: conditions do not match the ones the model was trained with"
            )
        if list(conditions.fields) != list(config.model.conditions):
            raise CheckpointError(
                f"{ckpt / CONDITIONS}: fields {list(conditions.fields)} but the model is conditioned on "
                f"{list(config.model.conditions)}"
            )
        config.model.condition_sizes = conditions.sizes
    model = build_model(config.model)
    try:
        model.load_state_dict(load_file(str(ckpt / WEIGHTS)))
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{ckpt / WEIGHTS}: weights do not fit the model in meta.json ({e})") from e
    model.to(map_location).eval()
    return LoadedCheckpoint(
        model=model,
        vocab=vocab,
        config=config,
        path=ckpt,
        step=meta["step"],
        epoch=meta["epoch"],
        metrics=meta["metrics"],
        data_position=meta.get("data_position", {}),
        conditions=conditions,
    )


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Optimizer and scheduler state for resuming (tensors and plain containers only)."""
    ckpt = resolve_checkpoint(path)
    read_meta(ckpt, verify=False)  # a clear error when this is no checkpoint
    f = ckpt / OPTIMIZER
    if not f.exists():
        raise CheckpointError(f"{f}: checkpoint has no optimizer state to resume from")
    return torch.load(f, map_location="cpu", weights_only=True)


def write_best(run_dir: str | Path, checkpoint: str, metrics: dict[str, Any]) -> Path:
    """Atomically (re)write best.json in a run dir; serving watches this file."""
    run_dir = Path(run_dir)
    storage.write_json(run_dir / BEST, {"checkpoint": checkpoint, "metrics": metrics})
    return run_dir / BEST
