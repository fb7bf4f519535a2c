"""Configuration as plain dataclasses: the one source of defaults.

A run's config comes from three layers, always through `load_config`:
  defaults here  <-  a TOML/YAML file (`configs/*.toml`)  <-  dotted overrides (`--set train.lr=2e-3`).
Every field says why it has its value. The resolved config is printed at start and saved with each run
and checkpoint, so a checkpoint always knows how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

# The review formats `data.format` names (sources.py reads each; formats.py has the field table of each
# layout). A Literal, so a wrong value fails where the config is loaded, naming the field.
DataFormat = Literal["auto", "tsv", "json", "json2014", "json2023", "csv", "parquet", "text", "blitzer"]


@dataclass
class DataConfig:
    # Review files, directories, globs or s3:// URIs; or one directory written by `raylstm prepare`.
    # Empty means the bundled demo corpus.
    sources: list[str] = field(default_factory=list)
    # "auto" detects from file name and columns; or one of: tsv, json, json2014, json2023, csv, parquet,
    # text, blitzer (formats.py has the field table of each layout).
    format: DataFormat = "auto"
    # The text column of files whose columns match no published layout (other Parquet, CSV or JSON).
    text_column: str = "text"
    # File glob -> category, for files whose records name none (2014/2018/2023 review files do not; TSV
    # and Blitzer do), e.g. {"*Musical_Instruments*" = "Musical Instruments"}: kept through prepare for
    # conditioning on it later. The first glob that matches the file's path or name wins.
    categories: dict[str, str] = field(default_factory=dict)
    # Prepend the review title/summary/headline to the body (the original used the body only).
    include_title: bool = False
    # The original project lowercased and kept ASCII only; we keep case by default (more to learn, and
    # LSTMs of this size handle it) but both are one switch away.
    lowercase: bool = False
    ascii_only: bool = False
    # The original kept reviews over 40 characters: shorter ones are mostly "Great!".
    min_chars: int = 40
    # Verified purchases only (formats that record it); off: unverified reviews are still English text.
    verified_only: bool = False
    # The 2018 5-core files repeat the same text across product variants; duplicates would leak into val.
    dedupe: bool = True
    # Rows larger than this are malformed for review data (a broken line swallowing a file), not reviews.
    max_row_bytes: int = 1_000_000
    # Strict mode fails on the first malformed row (naming file and line) instead of counting and skipping.
    strict: bool = False
    # Characters seen fewer times than this map to the unknown symbol: rare glyphs waste softmax rows.
    min_char_count: int = 5
    # Held-out fractions by stable hash of the review key; 5% of a large corpus is plenty to rank checkpoints.
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # Characters per training window (the model sees seq_len inputs and predicts seq_len targets), which
    # is also how far back gradients flow (truncated BPTT).
    seq_len: int = 128
    # Stateful truncated BPTT: each batch row reads a segment of this many consecutive windows of its
    # stream, carrying the LSTM state (detached) from one window to the next and starting each segment
    # from a zero state. 1 = independent windows, each from a zero state. Longer segments give every
    # character more context than seq_len at the same cost per character; see docs/train.md.
    segment_windows: int = 1
    # "full": every position supervised; "seed": the original project's 40-char context -> 1 next char.
    window_mode: Literal["full", "seed"] = "full"
    # The original's window: 40 chars of context, a new sample every 3 chars.
    seed_context: int = 40
    seed_step: int = 3
    # Shuffle buffer (in windows) for iter_torch_batches: decorrelates batches without a global shuffle.
    shuffle_buffer: int = 2048
    # Keep the encoded windows in the object store between epochs (small corpora); large corpora stream.
    materialize: bool = True
    # Deterministic data order (Ray Data preserve_order, seeded local shuffles): the same run reads the
    # same batches, so a resumed run trains on what the uninterrupted one would have. Free on
    # materialized windows; a streamed corpus may trade it for throughput.
    preserve_order: bool = True


@dataclass
class ModelConfig:
    # "lstm": Embedding -> n-layer LSTM -> Linear.  "seed": the original Keras model, for comparisons.
    kind: Literal["lstm", "seed"] = "lstm"
    # Filled from the vocabulary at train time; a checkpoint stores the real value.
    vocab_size: int = 0
    embed_dim: int = 64
    hidden_size: int = 512
    num_layers: int = 2
    # Dropout between LSTM layers and before the output layer: the corpora are small for 2x512.
    dropout: float = 0.1
    # The seed model's Dense(256, ReLU) layer.
    seed_dense: int = 256
    # Review fields to condition on ("rating", "category"): a learned embedding of each, concatenated to
    # the character embedding at every step (Lipton et al. 2015's concatenative scheme), so one can ask for
    # "a 1-star review of a guitar tuner" and read a review's rating back (docs/conditioning.md).
    # [] = an unconditioned model, exactly as before: the same weights and checkpoint files.
    conditions: list[Literal["rating", "category"]] = field(default_factory=list)
    # Width of each condition's embedding: 6 ratings or a handful of categories need few dimensions, and
    # every one is an extra LSTM input column read at every step.
    condition_dim: int = 8
    # Filled from the condition vocabulary at train time (embedding rows per field: its values + missing);
    # a checkpoint stores the real values, as it does vocab_size.
    condition_sizes: list[int] = field(default_factory=list)


@dataclass
class TrainConfig:
    # Ray Train workers; each gets a shard of the training windows.
    num_workers: int = 1
    use_gpu: bool = False
    # CPUs reserved per worker. 1 on real machines; the tests use less so Ray Data keeps a CPU (2-core hang).
    cpus_per_worker: float = 1.0
    # Where Ray puts the workers: "PACK" fills one node first (cheapest collectives); "SPREAD" prefers, and
    # "STRICT_SPREAD" requires, a different node for each worker (e.g. one per machine of a CPU cluster).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # Windows per worker per step; the global batch is batch_size * num_workers.
    batch_size: int = 64
    lr: float = 2e-3
    # Mild decay on matrices only; LSTMs overfit small review corpora quickly.
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    # Optimizer: "adamw" for raylstm, "rmsprop" for the seed preset (what the original used), "sgd" (no
    # momentum) where an update must be linear in the gradient (the DDP equivalence test).
    optimizer: Literal["adamw", "rmsprop", "sgd"] = "adamw"
    warmup_steps: int = 100
    # Cosine decays to lr * min_lr_ratio by max_steps. max_steps <= 0 means "epochs decide".
    max_steps: int = 2000
    min_lr_ratio: float = 0.1
    epochs: int = 1000
    # LSTM gradients explode on long sequences without clipping.
    grad_clip: float = 1.0
    # "auto": bf16 autocast on GPU, fp32 on CPU. "bf16" / "fp32" force it.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Stop with a clear message when loss is NaN/inf or exceeds this many nats (ln(vocab) ~ 4.6 at start).
    max_loss: float = 20.0
    log_every: int = 50
    # Validation + checkpoint cadence in steps; a killed worker loses at most this much work.
    eval_every: int = 250
    # Cap on validation batches per eval (of 512 reviews; seed mode: of batch_size windows) so evals stay
    # cheap on big corpora; 0 = all.
    max_val_batches: int = 0
    keep_checkpoints: int = 3
    max_failures: int = 1
    # Samples at the original project's temperatures, from a fixed prime, at each evaluation.
    sample_every_eval: bool = True
    sample_chars: int = 500
    sample_prime: str = "I bought this "
    temperatures: tuple[float, ...] = (0.2, 0.5, 1.0, 1.2)
    seed: int = 1337
    # A directory for each worker's record of what it restored and which windows it trained on (how the
    # tests check resume and data sharding against independent references); "" = off, no cost.
    trace_dir: str = ""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str = "raylstm"
    num_replicas: int = 1
    # Autoscaling instead of a fixed count when max_replicas > num_replicas.
    max_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # Rows (samples) in one model step per replica: the continuous batch. Requests join between steps.
    max_batch_size: int = 32
    # Requests waiting for a batch slot per replica; past it a request gets 429 + Retry-After at once
    # (also Serve's own bound on what its proxy queues when every replica is full).
    max_queued: int = 64
    # Retry-After (seconds) sent with 429/503.
    retry_after_s: float = 1.0
    # A request still queued or generating after this many seconds is cancelled: 503 (0 = no limit).
    request_timeout_s: float = 300.0
    # A replica being stopped (redeploy, downscale, shutdown) finishes in-flight requests for this long.
    drain_timeout_s: float = 60.0
    # Caps that keep one request from holding a replica: past them, a 4xx, never a hang.
    max_prompt_chars: int = 4096
    max_new_chars: int = 2000
    max_n: int = 8
    # Environment variable holding the bearer token; unset or empty disables auth.
    token_env: str = "RAYLSTM_API_TOKEN"
    # Seconds between checks of the run's best.json for a new best checkpoint (0 disables).
    reload_poll_s: float = 10.0
    # Run each replica's engine (model + step loop) in a child process of the replica, outside the GIL
    # its HTTP handling takes (raylstm.engine_process); false: a step thread inside the replica.
    # The faster of the two in bench/ab_serve.py (bench/REPORT.md, Serving).
    engine_process: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, unknown: list[str] | None = None) -> Config:
        """A config from its dict. Unknown fields are refused, unless `unknown` is given: then their dotted
        names are appended to it and they are skipped. That is how a checkpoint written by an older raylstm
        is read: its config.json records options that have since been removed (e.g. a serving knob),
        which must not make its weights unloadable."""
        cfg = cls()
        _apply_mapping(cfg, d, prefix="", unknown=unknown)
        return cfg


class ConfigError(ValueError):
    """A config file or override names an unknown field or a value of the wrong type."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- file (TOML or YAML) <- `section.field=value` overrides. The one way configs are made."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot parse: {e}") from e
        _apply_mapping(cfg, data or {}, prefix="", where=str(path))
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `section.field=value` override; the value is parsed as TOML, falling back to a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {item!r}: expected section.field, e.g. train.lr=2e-3")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    _apply_mapping(cfg, {parts[0]: {parts[1]: value}}, prefix="", where=f"--set {item}")


def _apply_mapping(
    obj: Any, data: dict[str, Any], prefix: str, where: str = "config", unknown: list[str] | None = None
) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in names and unknown is not None:
            unknown.append(name)
            continue
        if key not in names:
            raise ConfigError(f"{where}: unknown field {name!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a table of fields")
            _apply_mapping(current, value, prefix=f"{name}.", where=where, unknown=unknown)
        else:
            setattr(obj, key, _coerce(hints[key], value, name, where))


def _coerce(hint: Any, value: Any, name: str, where: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {name} must be one of {get_args(hint)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a table (key = value), got {value!r}")
        _, inner = get_args(hint) or (Any, Any)
        return {str(k): _coerce(inner, v, name, where) if inner is not Any else v for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        (inner, *_) = get_args(hint) or (Any,)
        items = [_coerce(inner, v, name, where) for v in value] if inner is not Any else list(value)
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
        return value
    return value
