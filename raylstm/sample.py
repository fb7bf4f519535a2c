"""The one sampler: the trainer's samples, `raylstm sample`, the engine and the server all call it.

    prompt --clean like the training text (the checkpoint's data config)--> text --encode--> ids [1, T]
       full mode: --model, once--> (h, c) + logits of the last char; the state is carried from then on
       seed mode: the last seed_context ids, from a zero state, every step (how the model was trained)

    then one model step per new character, for every active row at once:

        logits [B, V] --unknown id masked, + logit_bias, repetition/frequency/presence penalties-->
        scores [B, V] --log_softmax--> logprobs (what `logprobs` reports, what `best_of` ranks by)
        scores --/ temperature, min_p, top-k, top-p (each row its own)--> probs --u ~ rng_row--> ids [B]
        ids [B, 1] --model (state [L, B, H], or the window [B, W])--> logits [B, V]

Every row owns its parameters and its own random stream (SplitMix64 keyed by the request's seed plus
the sample index: the k-th character uses the stream's k-th number, drawn for the whole batch in one
vectorized call), so a row's text depends only on its prompt, parameters, seed and the checkpoint:
never on what else is in the batch. That is why the
trainer's printed samples, `raylstm sample --seed S`, `/v1/generate` and `/v1/completions` agree.

`Sampler.generate` runs a set of rows to completion (the trainer, the CLI, benchmarks, tests); the
engine (`raylstm.engine`) calls `start_many`/`step` to batch requests continuously.

Conditions and steering are per-row inputs like the others (docs/conditioning.md):

    SampleParams.conditions {"rating": 1, "category": "Books"} --ConditionVocab.request_ids--> Row.cond [F]
    SampleParams.steer_sentiment s --SentimentUnit.value(s)--> Row.steer (NaN: not steered)
    _Batch.cond [B, F], _Batch.steer [B] --_forward--> model(ids, state, cond), or
                                                     classify.steered_forward (the unit fixed every step)

so a row's text depends on its own conditions only, like its seed: a 1-star row batched beside a 5-star
one writes what it writes alone.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raylstm.checkpoint import LoadedCheckpoint, load_checkpoint
from raylstm.conditions import ConditionError, ConditionVocab
from raylstm.config import DataConfig
from raylstm.model import unwrap
from raylstm.text import EOR, clean_text, fold_ascii, normalize_unicode, strip_html
from raylstm.vocab import CharVocab

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's cap on `logprobs` (top alternatives per character)
MAX_STEER = 4.0  # |steer_sentiment|: 1 already sits a class-mean gap beyond the positive mean
# Where Sampler.load looks for a sentiment unit: `raylstm classify --probe --unit-out RUN/sentiment.json`
SENTIMENT_UNIT_FILE = "sentiment.json"


class SampleParamError(ValueError):
    """A sampling parameter out of range; `field` names it (the HTTP layer answers 422 for that field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:  # pickles with its field (Ray ships exceptions between processes)
        return type(self), (self.field, str(self))


@dataclass(frozen=True)
class SampleParams:
    """How one prompt is continued. Validated here, so the library refuses what the HTTP layer refuses.

    The formulas are OpenAI's and vLLM's with the character as the token (see `Sampler.scores`)."""

    temperature: float = 1.0  # 0 means argmax (greedy); higher flattens the distribution
    top_k: int = 0  # keep the k most likely characters; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 keeps all
    min_p: float = 0.0  # vLLM: drop characters less likely than min_p x the most likely one; 0 = off
    max_chars: int = 300  # characters to generate (fewer when a stop string ends the text)
    stop: tuple[str, ...] = ()  # the text ends before the first occurrence of any of these
    seed: int | None = None  # None draws a fresh seed, reported back so the output can be reproduced
    presence_penalty: float = 0.0  # OpenAI, -2..2: minus this from every character already generated
    frequency_penalty: float = 0.0  # OpenAI, -2..2: minus this x how often it was generated
    repetition_penalty: float = 1.0  # vLLM, > 0: seen characters' positive scores / p, negative x p
    # OpenAI: {vocabulary id: bias} added to the scores; -100 bans, +100 forces. Held as sorted pairs.
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # per generated char its logprob and the top-k alternatives; None = off
    prompt_logprobs: int | None = None  # the same for every prompt character (the first gets None)
    clean_prompt: bool = True  # clean the prompt as the training text was (HTML, NFKC, case, ASCII)
    # A conditioned model's review conditions, e.g. {"rating": 1, "category": "Musical Instruments"};
    # fields left out are "missing" (what a review without that field was trained with). Checked against
    # the model's condition vocabulary by the sampler. Held as sorted (field, value) pairs.
    conditions: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()
    # Fix the sentiment unit (Radford et al.) at SentimentUnit.value(s) at every step: +1 positive,
    # -1 negative, None off. Needs the sampler's sentiment unit (raylstm classify --probe --unit-out).
    steer_sentiment: float | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise SampleParamError(name, f"{name} {msg}")

        finite = math.isfinite
        need(
            self.temperature >= 0 and finite(self.temperature), "temperature", "must be a finite number >= 0"
        )
        need(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        need(0 <= self.top_p <= 1, "top_p", f"must be in [0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        need(self.max_chars >= 0, "max_chars", f"must be >= 0, got {self.max_chars}")
        need(all(self.stop), "stop", "strings must not be empty")
        need(self.seed is None or 0 <= self.seed <= MAX_SEED, "seed", "must be in [0, 2**63-1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(finite(v) and -2 <= v <= 2, name, f"must be in [-2, 2], got {v}")
        rp = self.repetition_penalty
        need(finite(rp) and 0 < rp <= 100, "repetition_penalty", f"must be in (0, 100], got {rp}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or 0 <= v <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}], got {v}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        try:
            pairs = tuple(sorted((int(k), float(v)) for k, v in bias))
        except (TypeError, ValueError) as e:
            raise SampleParamError("logit_bias", f"logit_bias must map character ids to numbers ({e})") from e
        for _, v in pairs:
            need(finite(v) and -100 <= v <= 100, "logit_bias", f"values must be in [-100, 100], got {v}")
        object.__setattr__(self, "logit_bias", pairs)
        object.__setattr__(self, "stop", tuple(self.stop))
        conds = self.conditions.items() if isinstance(self.conditions, Mapping) else self.conditions
        try:
            cpairs = tuple(sorted((str(k), v) for k, v in conds if v is not None))
        except (TypeError, ValueError) as e:
            raise SampleParamError("conditions", f"conditions must map field names to values ({e})") from e
        object.__setattr__(self, "conditions", cpairs)
        st = self.steer_sentiment
        need(
            st is None or (finite(st) and abs(st) <= MAX_STEER),
            "steer_sentiment",
            f"must be a number in [-{MAX_STEER:g}, {MAX_STEER:g}] (or null), got {st}",
        )

    @property
    def bias_items(self) -> tuple[tuple[int, float], ...]:
        b = self.logit_bias  # sorted pairs after __post_init__
        return b if isinstance(b, tuple) else tuple(sorted(b.items()))

    @property
    def condition_map(self) -> dict[str, Any]:
        return dict(self.conditions)  # type: ignore[arg-type]  (sorted pairs after __post_init__)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


# --- prompts ----------------------------------------------------------------------------------------------
def clean_prompt(text: str, lowercase: bool = False, ascii_only: bool = False) -> tuple[str, list[str]]:
    """The training text's cleaning (`text.clean_text`) applied to a prompt, and what it changed.

    Line by line, because "\\n" is the end-of-review marker the model was trained with (cleaning a
    review never leaves one inside it); one leading/trailing space of a line is kept, because a prompt's
    trailing space is part of what it asks for ("I bought " continues with a word, not a space)."""
    text = text.replace("\r\n", EOR)
    lines = []
    for line in text.split(EOR):
        body = clean_text(line, lowercase, ascii_only)
        raw = normalize_unicode(strip_html(line))  # entities/forms that clean into spaces count as spaces
        lead = " " if body and raw[:1].isspace() else ""
        trail = " " if body and raw[-1:].isspace() else ""
        lines.append(lead + body + trail)
    cleaned = EOR.join(lines)
    changes = []
    if cleaned != text:
        stages = [
            ("HTML entities or tags", strip_html),
            ("Unicode NFKC / invisible characters", normalize_unicode),
        ]
        if ascii_only:
            stages.append(("folded to ASCII", fold_ascii))
        if lowercase:
            stages.append(("lowercased", str.lower))
        s = text
        for label, fn in stages:
            t = fn(s)
            if t != s:
                changes.append(label)
            s = t
        if s != cleaned:  # what is left is spacing: runs, tabs, spaces at the ends of lines
            changes.append("whitespace collapsed")
    return cleaned, changes


@dataclass
class TokenLogprobs:
    """Per character: its log-probability and the top alternatives (OpenAI's logprobs, char = token)."""

    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)


@dataclass
class Prompt:
    """A prompt as the model reads it."""

    text: str  # after cleaning: what the model is conditioned on
    original: str
    changes: list[str]  # what cleaning changed (empty when nothing); said back in every response
    unknown_chars: list[str]  # distinct characters the vocabulary lacks (read as the unknown id)
    ids: list[int]
    logprobs: TokenLogprobs | None = None  # with SampleParams.prompt_logprobs


@dataclass
class Completion:
    """One generated sample."""

    text: str
    finish_reason: str  # "stop" (a stop string ended it) or "length" (max_chars reached)
    seed: int
    index: int = 0
    logprobs: TokenLogprobs | None = None  # with SampleParams.logprobs; one entry per char of text
    mean_logprob: float = 0.0  # of the generated characters (what best_of ranks by)
    prompt: Prompt | None = None


class Row:
    """One sample being generated: its parameters, random stream, model state and text so far."""

    _ids = itertools.count()  # next() on a count is atomic under the GIL: rows start in any thread

    def __init__(self, sampler: Sampler, params: SampleParams, seed: int, index: int, prompt: Prompt) -> None:
        self.id = next(Row._ids)
        self.sampler = sampler
        self.params = params
        self.seed = seed
        self.index = index
        self.prompt = prompt
        # Model state between steps. Stale while the row sits in its sampler's cached batch (see _Batch).
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, c) [L, 1, H], full mode
        self.window: list[int] = []  # the last seed_context ids, seed mode
        self.logits: torch.Tensor | None = None  # [V] scores for the next character
        self.counts: torch.Tensor | None = None  # [V] times each char was generated (penalties)
        self.seen: torch.Tensor | None = None  # [V] chars in prompt or output (repetition penalty)
        self.cond: list[int] | None = sampler.condition_ids(params)  # [F] ids; None: unconditioned model
        self.steer = sampler.steer_value(params)  # the sentiment unit's fixed value; NaN: not steered
        self.text = ""
        self.n_chars = 0  # characters generated (text may be shorter: a stop string is cut off)
        self.logprob_sum = 0.0
        self.logprobs = TokenLogprobs() if params.logprobs is not None else None
        self.emitted = 0  # characters of `text` already handed out by take_delta()
        self.finish_reason: str | None = "length" if params.max_chars == 0 else None
        self.reported = False  # the engine has told the client this row finished
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, ch: str, logprob: float, top: dict[str, float] | None) -> None:
        """Append one character; finish on a stop string (cut off, as OpenAI does) or at max_chars."""
        self.text += ch
        self.n_chars += 1
        self.logprob_sum += logprob
        if self.logprobs is not None:
            self.logprobs.token_logprobs.append(logprob)
            self.logprobs.top_logprobs.append(top)
        for s in self.params.stop:
            if self.text.endswith(s):
                self.text = self.text[: len(self.text) - len(s)]
                if self.logprobs is not None:  # the stop string's chars are not part of the answer
                    del self.logprobs.token_logprobs[len(self.text) :]
                    del self.logprobs.top_logprobs[len(self.text) :]
                self.finish_reason = "stop"
                return
        if self.n_chars >= self.params.max_chars:
            self.finish_reason = "length"

    def _held_back(self) -> int:
        """Trailing characters that might be the start of a stop string: not streamed out yet."""
        if self.finished or not self._max_stop:
            return 0
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0

    def take_delta(self) -> tuple[int, str]:
        """(offset, text) that is now final and not yet handed out: the stream adds up to the final text."""
        start = self.emitted
        end = max(start, len(self.text) - self._held_back())
        self.emitted = end
        return start, self.text[start:end]

    def logprobs_slice(self, start: int, end: int) -> TokenLogprobs | None:
        if self.logprobs is None:
            return None
        lp = self.logprobs
        return TokenLogprobs(lp.token_logprobs[start:end], lp.top_logprobs[start:end])

    def result(self) -> Completion:
        mean = self.logprob_sum / self.n_chars if self.n_chars else 0.0
        return Completion(
            self.text,
            self.finish_reason or "length",
            self.seed,
            self.index,
            self.logprobs,
            mean,
            self.prompt,
        )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seeds: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The next uniform in [0, 1) of each row's SplitMix64 stream (Vigna's): for seed s, the k-th number
    (k = draws, 0-based) mixes s + (k + 1) * golden. Vectorized over rows; float64 with 53 random bits."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as SplitMix64 wants
        z = seeds + (draws + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def choose_next(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    u: torch.Tensor,
    truncate: bool = True,
) -> torch.Tensor:
    """Next ids [B] from scores [B, V] (float64), each row with its own temperature/filters and draw u.

    probs = softmax(scores / T); min_p drops p < min_p * max p; top-k keeps the k most likely (ties by
    id); top-p keeps the smallest most-likely set reaching top_p of what top-k kept. The pick is by
    inverse CDF over ids in vocabulary order: the same scores and u always give the same character,
    whatever else is in the batch. Temperature-0 rows take the argmax. `truncate=False` skips the sort
    when no row in the batch uses top-k/top-p (the result is the same)."""
    B, V = scores.shape
    greedy = temperature <= 0
    any_greedy = bool(greedy.any())
    t = torch.where(greedy, torch.ones_like(temperature), temperature) if any_greedy else temperature
    probs = torch.softmax(scores / t[:, None], dim=-1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    if truncate:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        k = torch.where((top_k <= 0) | (top_k > V), torch.full_like(top_k, V), top_k)
        keep = torch.arange(V)[None, :] < k[:, None]
        sorted_p = sorted_p * keep
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        # Nucleus: drop a character when the ones ranked above it already reach top_p; keep the first.
        before = sorted_p.cumsum(-1) - sorted_p
        keep &= before < top_p[:, None]
        keep[:, 0] = True
        probs = probs * torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep)
    cdf = probs.cumsum(-1)
    # The first id whose cdf exceeds u * total: it has probability > 0 (the unknown id never comes out).
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=V - 1)
    return torch.where(greedy, scores.argmax(-1), pick) if any_greedy else pick


@dataclass
class _Batch:
    """The rows of the last step with their state, scores and parameters as batched tensors, reused
    while the set of rows does not change: a steady batch costs one model call and no tensor shuffling
    per character (and parameters become tensors once per batch, not once per step)."""

    rows: list[Row]
    h: torch.Tensor | None  # [L, B, H] (full mode)
    c: torch.Tensor | None
    logits: torch.Tensor  # [B, V] on the model's device
    counts: torch.Tensor | None  # [B, V] float64 (only when some row has penalties)
    seen: torch.Tensor | None  # [B, V] bool
    p: dict[str, torch.Tensor]  # per-row parameters [B] (and "bias" [B, V])
    seeds: np.ndarray  # [B] uint64: each row's random stream
    draws: np.ndarray  # [B] uint64: numbers drawn so far (one per character generated)
    cond: torch.Tensor | None = None  # [B, F] condition ids (conditioned models)
    steer: torch.Tensor | None = None  # [B] the sentiment unit's value, NaN = not steered (None: no row is)

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(r.id for r in self.rows)

    def select(self, idx: list[int]) -> _Batch:
        i = torch.tensor(idx)
        dev = self.logits.device
        return _Batch(
            [self.rows[j] for j in idx],
            None if self.h is None else self.h.index_select(1, i.to(dev)),
            None if self.c is None else self.c.index_select(1, i.to(dev)),
            self.logits.index_select(0, i.to(dev)),
            None if self.counts is None else self.counts.index_select(0, i),
            None if self.seen is None else self.seen.index_select(0, i),
            {k: v.index_select(0, i) for k, v in self.p.items()},
            self.seeds[idx],
            self.draws[idx],
            None if self.cond is None else self.cond.index_select(0, i),
            None if self.steer is None else self.steer.index_select(0, i),
        )


class Sampler:
    """A model + vocabulary ready to generate. Not thread-safe: one thread steps it at a time (start and
    start_many only read the model and the vocabulary: the engine runs them beside a step).

    `data` is the data config the model was trained with: its window mode (seed models re-read the last
    `seed_context` chars from a zero state) and its cleaning (prompts are cleaned the same way)."""

    def __init__(
        self,
        model: nn.Module,
        vocab: CharVocab,
        data: DataConfig | None = None,
        *,
        checkpoint: LoadedCheckpoint | None = None,
        device: str | torch.device | None = None,
        conditions: ConditionVocab | None = None,
        sentiment_unit: Any = None,
    ) -> None:
        """`conditions`: a conditioned model's condition vocabulary (default: the checkpoint's);
        `sentiment_unit`: a classify.SentimentUnit, what `steer_sentiment` fixes."""
        self.model = unwrap(model)
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.model.to(self.device)
        self.vocab = vocab
        self.itos = vocab.itos
        self.data = data or DataConfig()
        self.window = self.data.seed_context if self.data.window_mode == "seed" else None
        self.ckpt = checkpoint
        self.conditions = (
            conditions if conditions is not None else (checkpoint.conditions if checkpoint else None)
        )
        # Condition fields the model reads. Without their vocabulary (the trainer's own samples) a
        # conditioned model reads every field as missing, and no value can be asked for.
        self.condition_fields = (
            len(self.model.cfg.conditions) if getattr(self.model, "conditioned", False) else 0
        )
        if self.conditions is not None and len(self.conditions.fields) != self.condition_fields:
            raise ValueError(
                f"condition vocabulary {list(self.conditions.fields)} does not fit the model "
                f"({self.condition_fields} condition fields)"
            )
        self.sentiment_unit = sentiment_unit
        self._batch: _Batch | None = None

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: LoadedCheckpoint | str | Path,
        device: str = "cpu",
        sentiment_unit: str | Path | None = None,
    ) -> Sampler:
        """From a loaded checkpoint, a run dir (its best.json) or a checkpoint dir. The sentiment unit
        (for steer_sentiment) is read from `sentiment_unit`, else from `sentiment.json` in the checkpoint
        dir or its run dir when there is one."""
        if not isinstance(ckpt, LoadedCheckpoint):
            ckpt = load_checkpoint(ckpt, map_location=device)
        unit = None
        path = Path(sentiment_unit) if sentiment_unit else _default_unit_file(ckpt.path)
        if path is not None:
            from raylstm.classify import SentimentUnit

            unit = SentimentUnit.load(path)  # ValueError naming the file when it is not one
            H = ckpt.config.model.hidden_size
            if not (0 <= unit.unit < H and unit.layer == ckpt.config.model.num_layers - 1):
                raise ValueError(
                    f"{path}: the sentiment unit does not fit this model (layer/unit out of range)"
                )
        return cls(
            ckpt.model.eval(),
            ckpt.vocab,
            ckpt.config.data,
            checkpoint=ckpt,
            device=device,
            sentiment_unit=unit,
        )

    load = from_checkpoint

    @property
    def path(self) -> Path | None:
        return self.ckpt.path if self.ckpt else None

    @property
    def step_number(self) -> int | None:
        return self.ckpt.step if self.ckpt else None

    def info(self) -> dict[str, Any]:
        c = self.ckpt
        return {
            "checkpoint": str(c.path) if c else None,
            "step": c.step if c else None,
            "epoch": c.epoch if c else None,
            "val_bpc": c.metrics.get("val_bpc") if c else None,
            "metrics": c.metrics if c else {},
            "vocab_size": len(self.vocab),
            "vocab_fingerprint": self.vocab.fingerprint(),
            # Every character's id: the keys `logit_bias` takes. Id 0 is the unknown symbol (never produced).
            "vocab": {ch: i for i, ch in enumerate(self.itos)},
            "unknown_id": self.vocab.unk_id,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "window_mode": self.data.window_mode,
            "seed_context": self.window,
            "prompt_cleaning": {"lowercase": self.data.lowercase, "ascii_only": self.data.ascii_only},
            "model": dict(vars(c.config.model)) if c else {},
            "config": c.config.to_dict() if c else {},
            # What `rating`/`category` may ask for ({} for an unconditioned model); null = missing.
            "conditions": (
                {f: list(self.conditions.values[f]) for f in self.conditions.fields}
                if self.conditions
                else {}
            ),
            "sentiment_unit": self.sentiment_unit.to_dict() if self.sentiment_unit is not None else None,
        }

    # --- conditions and steering ------------------------------------------------------------------------
    def condition_ids(self, params: SampleParams) -> list[int] | None:
        """The condition ids a row of `params` reads at every step (None for an unconditioned model).
        An unknown field or value raises SampleParamError naming it and listing the valid values."""
        asked = params.condition_map
        if self.conditions is None:
            if asked:
                field = next(iter(asked))
                raise SampleParamError(
                    field,
                    f"{field}: this model is not conditioned on anything (trained with model.conditions = [])"
                    if not self.condition_fields
                    else f"{field}: this sampler has no condition vocabulary (load it from its checkpoint)",
                )
            return [0] * self.condition_fields if self.condition_fields else None
        try:
            return self.conditions.request_ids(asked)
        except ConditionError as e:
            raise SampleParamError(e.field, str(e)) from e

    def steer_value(self, params: SampleParams) -> float:
        if params.steer_sentiment is None:
            return math.nan
        if self.sentiment_unit is None:
            raise SampleParamError(
                "steer_sentiment",
                "steer_sentiment: this model has no sentiment unit (find one with `raylstm classify "
                f"--probe --unit-out RUN_DIR/{SENTIMENT_UNIT_FILE}`)",
            )
        return float(self.sentiment_unit.value(params.steer_sentiment))

    # --- the model --------------------------------------------------------------------------------------
    def _forward(
        self,
        ids: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None,
        cond: torch.Tensor | None = None,
        steer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The one model call: ids [B, T] (+ state, condition ids [B, F], steering values [B] with NaN
        for unsteered rows) -> logits [B, T, V], state."""
        ids = ids.to(self.device)
        cond = None if cond is None else cond.to(self.device)
        if steer is not None and bool((~torch.isnan(steer)).any()):
            from raylstm.classify import steered_forward

            return steered_forward(self.model, ids, state, self.sentiment_unit, steer.to(self.device), cond)
        if cond is not None:
            return self.model(ids, state, cond)
        return self.model(ids, state)

    def _param_inputs(
        self, params: Sequence[SampleParams]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Condition ids [B, F] and steering values [B] (NaN: not steered) of rows with these params;
        each None when no row needs it (an unconditioned model; no row steered)."""
        cond = None
        if self.condition_fields:
            cond = torch.tensor([self.condition_ids(p) for p in params], dtype=torch.long)
        values = [self.steer_value(p) for p in params]
        steer = None if all(math.isnan(v) for v in values) else torch.tensor(values, dtype=torch.float32)
        return cond, steer

    def _read(
        self,
        seqs: Sequence[Sequence[int]],
        cond: torch.Tensor | None = None,
        steer: torch.Tensor | None = None,
        keep_all: frozenset[int] = frozenset(),
    ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
        """Read id sequences of any lengths from a zero state, all in the same model calls: per sequence
        the logits [V] after its last id, its state (h, c) [L, 1, H], and for the indexes in `keep_all`
        the logits [T, V] at every position.

            lengths 22, 9, 22, 5 --sorted longest first--> one call over ids[:, 0:5] for all 4 rows,
            then ids[:, 5:9] for the 3 still going, then ids[:, 9:22] for 2, carrying the state

        An LSTM read in pieces with its state carried is the same computation as one read, so each
        row gets what reading it alone gives; the calls stream the weights once per position of the
        longest row, not once per position of every row (prompts of different lengths arriving
        together cost one read). Rows of one length take a single call, in their own order."""
        k = len(seqs)
        if not k:
            return [], [], {}
        order = sorted(range(k), key=lambda i: -len(seqs[i]))  # stable: equal lengths keep their order
        lens = [len(seqs[i]) for i in order]
        T = lens[0]
        ids = torch.tensor([[*seqs[i], *[0] * (T - len(seqs[i]))] for i in order], dtype=torch.long)
        if order != list(range(k)):
            sel = torch.tensor(order)
            cond = None if cond is None else cond.index_select(0, sel)
            steer = None if steer is None else steer.index_select(0, sel)
        lasts: list[torch.Tensor | None] = [None] * k
        states: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * k
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in keep_all}
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        pos, a = 0, k  # rows 0..a-1 (of `order`) are still being read
        while a:
            end = lens[a - 1]  # the shortest row still going ends here
            logits, (h, c) = self._forward(
                ids[:a, pos:end],
                state,
                None if cond is None else cond[:a],
                None if steer is None else steer[:a],
            )
            for j in range(a):
                i = order[j]
                if i in pieces:
                    pieces[i].append(logits[j])
                if lens[j] == end:
                    lasts[i], states[i] = logits[j, -1], (h[:, j : j + 1], c[:, j : j + 1])
            while a and lens[a - 1] == end:
                a -= 1
            state = (h[:, :a].contiguous(), c[:, :a].contiguous()) if a else None
            pos = end
        return lasts, states, {i: torch.cat(p) for i, p in pieces.items()}  # type: ignore[return-value]

    def _window_logits(
        self,
        windows: Sequence[Sequence[int]],
        cond: torch.Tensor | None = None,
        steer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Seed mode: logits [B, V] of the last position of each window, each read from a zero state
        (one call once every row has seed_context characters; windows of several lengths share calls)."""
        return torch.stack(self._read(windows, cond, steer)[0])

    # --- prompts ----------------------------------------------------------------------------------------
    def prepare_prompt(self, prompt: str, clean: bool = True) -> Prompt:
        """Clean (as the training text was) and encode a prompt; refuse one that is empty after cleaning."""
        text, changes = (
            clean_prompt(prompt, self.data.lowercase, self.data.ascii_only) if clean else (prompt, [])
        )
        if not text:
            raise SampleParamError("prompt", "prompt must contain at least one character (after cleaning)")
        ids = [self.vocab.stoi.get(c, self.vocab.unk_id) for c in text]
        return Prompt(text, prompt, changes, self.vocab.unknown_chars(text), ids)

    def prompt_from_ids(self, ids: Sequence[int]) -> Prompt:
        """A prompt given as character ids (OpenAI's token-id prompts): read exactly, never cleaned."""
        V = len(self.vocab)
        bad = [i for i in ids if not 0 <= i < V]
        if bad or not ids:
            raise SampleParamError(
                "prompt", f"prompt ids must be 0..{V - 1} (GET /v1/model lists them), got {bad[:5] or ids}"
            )
        text = "".join(self.itos[i] for i in ids)
        return Prompt(text, text, [], ["\ufffd"] if self.vocab.unk_id in ids else [], list(ids))

    def check_params(self, params: SampleParams) -> None:
        """The vocabulary-dependent checks: logit_bias ids must be characters (not the unknown id);
        conditions must be ones the model knows; steering needs a sentiment unit."""
        self.condition_ids(params)
        self.steer_value(params)
        V = len(self.vocab)
        for k, _ in params.bias_items:
            if not 0 < k < V:
                raise SampleParamError(
                    "logit_bias",
                    f"logit_bias key {k} is not a character id: ids are 1..{V - 1} (GET /v1/model lists "
                    "them; 0 is the unknown symbol, which is never produced)",
                )

    def _prompt_logprobs(self, logits: torch.Tensor, ids: list[int], k: int) -> TokenLogprobs:
        """The model's own log-probability of every prompt char given the ones before it (the first has
        no context: None, as OpenAI does). No mask or penalty: this is what `raylstm evaluate` scores."""
        lp = torch.log_softmax(logits.double(), dim=-1).cpu()  # [T, V]: row i predicts char i+1
        target = torch.tensor(ids[1:], dtype=torch.long)
        got = lp[:-1].gather(1, target[:, None]).squeeze(1).tolist() if len(ids) > 1 else []
        out = TokenLogprobs([None, *got], [None])
        if k:
            vals, top = lp[:-1].topk(min(k, lp.shape[-1]), dim=-1)
            for i, (vs, ts) in enumerate(zip(vals.tolist(), top.tolist())):
                d = {self.itos[t]: v for t, v in zip(ts, vs)}
                d.setdefault(self.itos[ids[i + 1]], got[i])
                out.top_logprobs.append(d)
        else:
            out.top_logprobs = [None] * len(ids)
        return out

    def start(
        self, prompt: str | Prompt, params: SampleParams, n: int = 1, first_index: int = 0
    ) -> list[Row]:
        """Read the prompt once; n rows share that state, with seeds seed+0 .. seed+n-1."""
        return self.start_many([(prompt, params, n)], first_index)[0]

    @torch.inference_mode()
    def start_many(
        self, requests: Sequence[tuple[str | Prompt, SampleParams, int]], first_index: int = 0
    ) -> list[list[Row]]:
        """Start several prompts at once, read together in the same model calls whatever their lengths
        (`_read`: reading a prompt alone streams the weights once per character, so under load this
        matters).
        Raises SampleParamError for the first bad one (the engine starts requests one by one then)."""
        prepared = []
        for prompt, params, n in requests:
            self.check_params(params)
            p = prompt if isinstance(prompt, Prompt) else self.prepare_prompt(prompt, params.clean_prompt)
            prepared.append((p, params, n))
        # Each prompt is read with its own conditions (and steering), like every character after it.
        cond_all, steer_all = self._param_inputs([params for _, params, _ in prepared])
        if self.window:
            windows = [p.ids[-self.window :] for p, _, _ in prepared]
            lasts = self._window_logits(windows, cond_all, steer_all)
            starts = [(None, w, last) for w, last in zip(windows, lasts)]
        else:  # every prompt in the same calls, whatever their lengths (see _read)
            want = frozenset(
                i for i, (_, params, _) in enumerate(prepared) if params.prompt_logprobs is not None
            )
            lasts, states, every = self._read([p.ids for p, _, _ in prepared], cond_all, steer_all, want)
            starts = [(state, [], last) for state, last in zip(states, lasts)]
            for i in want:
                p, params, _ = prepared[i]
                p.logprobs = self._prompt_logprobs(every[i], p.ids, params.prompt_logprobs)
        out = []
        for k, ((p, params, n), (state, window, last)) in enumerate(zip(prepared, starts)):
            if self.window and params.prompt_logprobs is not None:  # each char from its window, zero state
                ctx = [p.ids[max(0, i - self.window + 1) : i + 1] for i in range(len(p.ids))]
                c = None if cond_all is None else cond_all[k : k + 1].expand(len(ctx), -1)
                st = None if steer_all is None else steer_all[k : k + 1].expand(len(ctx))
                p.logprobs = self._prompt_logprobs(
                    self._window_logits(ctx, c, st), p.ids, params.prompt_logprobs
                )
            base = params.seed if params.seed is not None else secrets.randbits(62)
            rows = []
            for i in range(n):
                r = Row(self, params, base + i, first_index + i, p)
                r.state, r.window, r.logits = state, list(window), last
                if params.penalized:
                    r.counts = torch.zeros(len(self.vocab), dtype=torch.float64)
                    r.seen = torch.zeros(len(self.vocab), dtype=torch.bool)
                    r.seen[torch.tensor(p.ids, dtype=torch.long)] = True
                rows.append(r)
            out.append(rows)
        return out

    # --- one step ---------------------------------------------------------------------------------------
    def _build(self, rows: list[Row]) -> _Batch:
        V = len(self.vocab)
        full = self.window is None
        penal = any(r.params.penalized for r in rows)

        def vec(name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.tensor([getattr(r.params, name) for r in rows], dtype=dtype)

        p = {
            "temperature": vec("temperature"),
            "top_k": vec("top_k", torch.long),
            "top_p": vec("top_p"),
            "min_p": vec("min_p"),
        }
        if any(r.params.bias_items for r in rows):
            bias = torch.zeros(len(rows), V, dtype=torch.float64)
            for i, r in enumerate(rows):
                for k, v in r.params.bias_items:
                    bias[i, k] = v
            p["bias"] = bias
        if penal:
            for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
                p[name] = vec(name)
        zeros = torch.zeros(V, dtype=torch.float64)
        nothing = torch.zeros(V, dtype=torch.bool)
        cond = torch.tensor([r.cond for r in rows], dtype=torch.long) if self.condition_fields else None
        steer = None
        if any(not math.isnan(r.steer) for r in rows):
            steer = torch.tensor([r.steer for r in rows], dtype=torch.float32)
        return _Batch(
            rows,
            torch.cat([r.state[0] for r in rows], dim=1) if full else None,
            torch.cat([r.state[1] for r in rows], dim=1) if full else None,
            torch.stack([r.logits for r in rows]),
            torch.stack([zeros if r.counts is None else r.counts for r in rows]) if penal else None,
            torch.stack([nothing if r.seen is None else r.seen for r in rows]) if penal else None,
            p,
            np.array([r.seed for r in rows], dtype=np.uint64),
            np.array([r.n_chars for r in rows], dtype=np.uint64),
            cond,
            steer,
        )

    def _spill(self) -> None:
        """Hand the cached batch's state back to its rows before the batch is rebuilt."""
        b = self._batch
        if b is None:
            return
        for i, r in enumerate(b.rows):
            if b.h is not None and b.c is not None:
                r.state = (b.h[:, i : i + 1], b.c[:, i : i + 1])
            r.logits = b.logits[i]
            if b.counts is not None and r.counts is not None:
                r.counts, r.seen = b.counts[i], b.seen[i]
        self._batch = None

    def scores(self, b: _Batch) -> torch.Tensor:
        """The distribution each row samples from, before temperature: [B, V] float64 on the CPU.

        z = logits; z[unknown] = -inf; z += logit_bias;
        repetition (vLLM): z[j] = z[j] / p if z[j] > 0 else z[j] * p, for every j in prompt or output;
        frequency/presence (OpenAI): z[j] -= frequency * count[j] + presence * (count[j] > 0)."""
        z = b.logits.to("cpu", torch.float64)
        z[:, self.vocab.unk_id] = -math.inf
        if "bias" in b.p:
            z = z + b.p["bias"]
        if b.counts is not None:
            rp = b.p["repetition_penalty"][:, None]
            z = torch.where(b.seen & (rp != 1.0), torch.where(z > 0, z / rp, z * rp), z)
            z = z - b.p["frequency_penalty"][:, None] * b.counts
            z = z - b.p["presence_penalty"][:, None] * (b.counts > 0)
        return z

    @torch.inference_mode()
    def step(self, rows: Sequence[Row]) -> None:
        """One character for every unfinished row in `rows`: one model call serves them all."""
        rows = [r for r in rows if not r.finished]
        if not rows:
            return
        key = tuple(r.id for r in rows)
        if self._batch is None or self._batch.key != key:
            self._spill()
            self._batch = self._build(rows)
        b = self._batch
        z = self.scores(b)
        logprobs = torch.log_softmax(z, dim=-1)
        u = torch.from_numpy(uniforms(b.seeds, b.draws))
        b.draws += np.uint64(1)
        truncate = any(r.params.truncated for r in rows)
        nxt_t = choose_next(z, b.p["temperature"], b.p["top_k"], b.p["top_p"], b.p["min_p"], u, truncate)
        chosen = logprobs.gather(1, nxt_t[:, None]).squeeze(1).tolist()
        k = max((r.params.logprobs or 0) for r in rows)
        tops = logprobs.topk(min(k, logprobs.shape[1]), dim=-1) if k else None
        top_v, top_i = (tops.values.tolist(), tops.indices.tolist()) if tops is not None else ([], [])
        nxt = nxt_t.tolist()
        alive: list[int] = []
        for i, (r, t) in enumerate(zip(rows, nxt)):
            top = None
            if r.params.logprobs:  # top-k alternatives, and the chosen char even when outside them
                kk = r.params.logprobs
                top = {self.itos[j]: v for j, v in zip(top_i[i][:kk], top_v[i][:kk]) if v > -math.inf}
                top.setdefault(self.itos[t], chosen[i])
            r.push(self.itos[t], chosen[i], top)
            if not r.finished:
                alive.append(i)
        if b.counts is not None:
            b.counts[torch.arange(len(rows)), nxt_t] += 1
            b.seen[torch.arange(len(rows)), nxt_t] = True
        if not alive:
            self._batch = None
            return
        if len(alive) < len(rows):
            b = b.select(alive)
            nxt = [nxt[i] for i in alive]
        if self.window:
            for r, t in zip(b.rows, nxt):
                r.window = (r.window + [t])[-self.window :]
            b.logits = self._window_logits([r.window for r in b.rows], b.cond, b.steer)
        else:
            x = torch.tensor(nxt, dtype=torch.long)[:, None]
            out, (b.h, b.c) = self._forward(x, (b.h, b.c), b.cond, b.steer)
            b.logits = out[:, -1]
        self._batch = b

    # --- whole generations ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        params: SampleParams | Sequence[SampleParams],
        n: int = 1,
        best_of: int | None = None,
    ) -> list[list[Completion]]:
        """Continue every prompt (each with its own params) n times, all rows stepped together.

        With best_of > n, best_of rows (seeds seed .. seed+best_of-1) run and the n with the highest
        mean log-probability per character are returned, best first."""
        if isinstance(params, SampleParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} parameter sets")
        width = max(n, best_of or n)
        with _eval_mode(self.model):
            groups = self.start_many([(p, sp, width) for p, sp in zip(prompts, params)])
            rows = [r for g in groups for r in g]
            while any(not r.finished for r in rows):
                self.step(rows)
        return [best_completions([r.result() for r in g], n) for g in groups]

    def complete(self, prompt: str, params: SampleParams) -> Completion:
        return self.generate([prompt], params)[0][0]


def _default_unit_file(checkpoint_dir: Path | None) -> Path | None:
    """`sentiment.json` in a checkpoint dir or the run dir above it, if either has one."""
    if checkpoint_dir is None:
        return None
    for d in (Path(checkpoint_dir), Path(checkpoint_dir).parent):
        if (d / SENTIMENT_UNIT_FILE).is_file():
            return d / SENTIMENT_UNIT_FILE
    return None


def best_completions(completions: list[Completion], n: int) -> list[Completion]:
    """All of them when there are n; else the n with the highest mean log-probability, best first
    (OpenAI's best_of), renumbered 0..n-1."""
    if len(completions) <= n:
        return completions
    ranked = sorted(completions, key=lambda c: (-c.mean_logprob, c.index))[:n]
    for i, c in enumerate(ranked):
        c.index = i
    return ranked


class _eval_mode:
    """Eval mode (no dropout) while sampling; the model's own mode afterwards (the trainer's is train)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)


def training_samples(
    model: nn.Module,
    vocab: CharVocab,
    data: DataConfig,
    prime: str,
    length: int,
    temperatures: Sequence[float],
    seed: int,
) -> tuple[str, dict[str, str]]:
    """What the trainer prints and saves: one sample per temperature, all with seed `seed`, as one
    batch; (the prime as the model read it, {"0.5": text, ...}). `raylstm sample --checkpoint CKPT
    --prime PRIME --temperature T1 T2 .. --length N --seed SEED` reproduces it exactly."""
    sampler = Sampler(model, vocab, data)
    params = [SampleParams(temperature=float(t), max_chars=length, seed=seed) for t in temperatures]
    out = sampler.generate([prime or EOR] * len(params), params)
    used = out[0][0].prompt.text if out and out[0][0].prompt else prime
    return used, {f"{t:g}": g[0].text for t, g in zip(temperatures, out)}
