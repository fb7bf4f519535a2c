"""Sampling from a checkpoint: batched, stateful, seeded. torch + numpy only (no Ray).

    prompt --encode (unknown chars -> unk)--> ids [1, T] --model, once--> (h, c), logits of the last char
    then, one model step per new character, for every active row at once:

        logits [B, V] --/ temperature, top-k, top-p (per row)--> probs --u ~ rng_row--> next ids [B]
        next ids [B, 1] --model(state [L, B, H])--> logits [B, V], state

Every row owns its parameters and its own random generator (seeded by the request's seed plus the sample
index), and draws exactly one uniform number per character, so a row's text depends only on its prompt,
its parameters and its seed: never on what else is in the batch. That is what makes `raylstm sample`,
`/v1/generate` and `/v1/completions` agree for the same seed, and batched agree with unbatched.

`Sampler.generate` runs a set of rows to completion (the CLI, benchmarks, tests). `Engine` is the
continuous-batching loop the server drives: jobs join and leave between model steps, and rows of an
older checkpoint keep their own sampler after a hot reload until they finish.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import secrets
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylstm.checkpoint import LoadedCheckpoint, load_checkpoint

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SampleParams:
    """How one prompt is continued. Validated here so the library refuses what the HTTP layer refuses."""

    temperature: float = 1.0  # 0 means argmax (greedy); higher flattens the distribution
    top_k: int = 0  # keep the k most likely characters; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 keeps all
    max_chars: int = 300  # characters to generate (fewer when a stop string ends the text)
    stop: tuple[str, ...] = ()  # the text ends before the first occurrence of any of these
    seed: int | None = None  # None draws a fresh seed, reported back so the output can be reproduced

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {self.max_chars}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63-1], got {self.seed}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class Completion:
    """One generated sample."""

    text: str
    finish_reason: str  # "stop" (a stop string ended it) or "length" (max_chars reached)
    seed: int
    index: int = 0


class Row:
    """One sample being generated: its parameters, random stream, LSTM state and text so far."""

    _ids = itertools.count()

    def __init__(
        self,
        sampler: Sampler,
        params: SampleParams,
        seed: int,
        index: int,
        state: tuple[torch.Tensor, torch.Tensor],
        logits: torch.Tensor,
    ) -> None:
        self.id = next(Row._ids)
        self.sampler = sampler
        self.params = params
        self.seed = seed
        self.index = index
        # PCG64 per row: ~0.3 us a draw, independent of every other row.
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.state = state  # (h, c) [L, 1, H]; stale while the row sits in its sampler's cached batch
        self.logits = logits  # [V] scores for the next character; stale likewise
        self.chars: list[str] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out by take_delta()
        self.finish_reason: str | None = None
        self._max_stop = max((len(s) for s in params.stop), default=0)
        if params.max_chars == 0:
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, ch: str) -> None:
        """Append one character; finish on a stop string (cut off, as OpenAI does) or at max_chars."""
        self.chars.append(ch)
        self.text += ch
        for s in self.params.stop:
            if self.text.endswith(s):
                self.text = self.text[: len(self.text) - len(s)]
                self.finish_reason = "stop"
                return
        if len(self.chars) >= self.params.max_chars:
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

    def take_delta(self) -> str:
        """Text that is now final and has not been handed out: the stream is the exact final text."""
        end = len(self.text) - self._held_back()
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def result(self) -> Completion:
        return Completion(self.text, self.finish_reason or "length", self.seed, self.index)


def choose_next(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Next ids [B] from logits [B, V], each row with its own temperature/top-k/top-p and uniform draw u.

    Sampling is by inverse CDF over the characters sorted by score (stable sort, so ties are ordered by
    id): the same logits and the same u always give the same character. Temperature 0 rows take argmax.
    """
    logits = logits.double()
    B, V = logits.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).double()
    scaled = logits / t[:, None]
    sorted_scores, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    ranks = torch.arange(V)[None, :]
    k = torch.where((top_k <= 0) | (top_k > V), torch.full_like(top_k, V), top_k)
    sorted_scores = sorted_scores.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    # Nucleus: drop a character when the ones ranked above it already reach top_p; always keep the first.
    before = probs.cumsum(-1) - probs
    drop = before >= top_p.double()[:, None]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    pick = (cdf < (u.double() * cdf[:, -1])[:, None]).sum(-1).clamp(max=V - 1)
    chosen = order.gather(1, pick[:, None]).squeeze(1)
    return torch.where(greedy, logits.argmax(-1), chosen)


class Sampler:
    """A loaded checkpoint ready to generate. Not thread-safe: one thread steps it at a time."""

    def __init__(self, ckpt: LoadedCheckpoint, device: str | torch.device = "cpu") -> None:
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.vocab = ckpt.vocab
        self.itos = self.vocab.itos
        # The rows of the last step and their batched state/logits: reused while the set does not change,
        # so a steady batch costs one model call and no tensor shuffling per character.
        self._cache: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._rows_in_cache: list[Row] = []

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Sampler:
        """A run dir (its best.json) or a checkpoint dir."""
        return cls(load_checkpoint(path, map_location=device), device)

    @property
    def path(self) -> Path:
        return self.ckpt.path

    def info(self) -> dict[str, Any]:
        c = self.ckpt
        return {
            "checkpoint": str(c.path),
            "step": c.step,
            "epoch": c.epoch,
            "val_bpc": c.metrics.get("val_bpc"),
            "metrics": c.metrics,
            "vocab_size": len(self.vocab),
            "vocab_fingerprint": self.vocab.fingerprint(),
            "parameters": self.model.num_parameters(),
            "model": dict(vars(c.config.model)),
            "config": c.config.to_dict(),
        }

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, list[str]]:
        """Prompt -> ids [1, T] (unknown characters become the vocabulary's unk id) and those characters."""
        if not prompt:
            raise ValueError("prompt must contain at least one character")
        try:
            enc = self.vocab.encode(prompt)
        except UnicodeEncodeError:  # a lone surrogate: look characters up one by one (it becomes unk)
            enc = np.array([self.vocab.stoi.get(c, self.vocab.unk_id) for c in prompt])
        ids = torch.from_numpy(enc.astype(np.int64))[None, :]
        return ids.to(self.device), self.vocab.unknown_chars(prompt)

    @torch.inference_mode()
    def start(
        self, prompt: str, params: SampleParams, n: int = 1, first_index: int = 0
    ) -> tuple[list[Row], list[str]]:
        """Run the prompt through the model once; n rows share that state, seeds seed+0 .. seed+n-1."""
        ids, unknown = self.encode_prompt(prompt)
        logits, state = self.model(ids)
        last = logits[0, -1]
        base = params.seed if params.seed is not None else secrets.randbits(62)
        rows = [Row(self, params, base + i, first_index + i, state, last) for i in range(n)]
        return rows, unknown

    @torch.inference_mode()
    def step(self, rows: Sequence[Row]) -> None:
        """One character for every unfinished row in `rows`: one model call serves them all."""
        rows = [r for r in rows if not r.finished]
        if not rows:
            return
        key = tuple(r.id for r in rows)
        if self._cache is not None and self._cache[0] == key:
            _, h, c, logits = self._cache
        else:
            self._spill()
            h = torch.cat([r.state[0] for r in rows], dim=1)
            c = torch.cat([r.state[1] for r in rows], dim=1)
            logits = torch.stack([r.logits for r in rows])
        temp = torch.tensor([r.params.temperature for r in rows])
        top_k = torch.tensor([r.params.top_k for r in rows])
        top_p = torch.tensor([r.params.top_p for r in rows])
        u = torch.tensor([r.rng.random() for r in rows])
        nxt = choose_next(logits.float().cpu(), temp, top_k, top_p, u).tolist()
        alive: list[int] = []
        for i, (r, t) in enumerate(zip(rows, nxt)):
            r.push(self.itos[t])
            if not r.finished:
                alive.append(i)
        if not alive:
            self._cache = None
            return
        if len(alive) < len(rows):
            sel = torch.tensor(alive, device=self.device)
            h, c = h.index_select(1, sel), c.index_select(1, sel)
            nxt = [nxt[i] for i in alive]
            rows = [rows[i] for i in alive]
        x = torch.tensor(nxt, dtype=torch.long, device=self.device)[:, None]
        out, (h, c) = self.model(x, (h, c))
        self._cache = (tuple(r.id for r in rows), h, c, out[:, -1])
        self._rows_in_cache = rows

    def _spill(self) -> None:
        """Hand the cached batch's state back to its rows before the batch is rebuilt."""
        if self._cache is None:
            return
        _, h, c, logits = self._cache
        for i, r in enumerate(self._rows_in_cache):
            r.state = (h[:, i : i + 1], c[:, i : i + 1])
            r.logits = logits[i]
        self._cache = None

    def generate(
        self, prompts: Sequence[str], params: SampleParams | Sequence[SampleParams], n: int = 1
    ) -> list[list[Completion]]:
        """Continue every prompt (each with its own params) n times, all rows stepped together."""
        if isinstance(params, SampleParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} parameter sets")
        groups = [self.start(p, sp, n)[0] for p, sp in zip(prompts, params)]
        rows = [r for g in groups for r in g]
        while any(not r.finished for r in rows):
            self.step(rows)
        return [[r.result() for r in g] for g in groups]

    def complete(self, prompt: str, params: SampleParams) -> Completion:
        return self.generate([prompt], params)[0][0]


# --- continuous batching --------------------------------------------------------------------------------
@dataclass
class Job:
    """One request: n samples of one prompt. The engine fills `rows` when the job is admitted."""

    prompt: str
    params: SampleParams
    n: int = 1
    rows: list[Row] = field(default_factory=list)
    unknown_chars: list[str] = field(default_factory=list)
    sampler: Sampler | None = None
    error: str | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.error is not None or (bool(self.rows) and all(r.finished for r in self.rows))


@dataclass
class Event:
    """What one engine step produced for a job: new text per sample, and samples that just finished."""

    job: Job
    started: bool = False
    deltas: list[tuple[int, str]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)  # (index, finish_reason)
    done: bool = False


class Engine:
    """Steps every active row together, admitting waiting jobs between steps (continuous batching).

    `max_rows` caps the rows in one model step (the batch size): waiting jobs are admitted in order when
    their rows fit (a job larger than the cap runs alone). `submit` may be called from any thread;
    `step` runs in one thread. New jobs use the current sampler; after `set_sampler` (hot reload),
    rows already running finish on the sampler they started with.
    """

    def __init__(self, sampler: Sampler, max_rows: int = 32) -> None:
        self.sampler = sampler
        self.max_rows = max(1, int(max_rows))
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self._lock = threading.Lock()
        self.steps = 0
        self.rows_stepped = 0

    def set_sampler(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            self.waiting.extend(jobs)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.active)

    def _admit(self) -> list[Event]:
        events = []
        rows = sum(len(j.rows) for j in self.active)
        with self._lock:
            while self.waiting:
                job = self.waiting[0]
                if rows and rows + job.n > self.max_rows:
                    break
                self.waiting.popleft()
                if job.cancelled:
                    continue
                sampler = self.sampler
                try:
                    job.rows, job.unknown_chars = sampler.start(job.prompt, job.params, job.n)
                    job.sampler = sampler
                except (ValueError, RuntimeError) as e:
                    job.error = str(e)
                    events.append(Event(job, done=True))
                    continue
                rows += job.n
                self.active.append(job)
                events.append(Event(job, started=True))
        return events

    def step(self) -> list[Event]:
        """Admit what fits, advance every active row by one character, report what changed."""
        events = {id(e.job): e for e in self._admit()}
        self.active = [j for j in self.active if not j.cancelled]
        by_sampler: dict[int, tuple[Sampler, list[Row]]] = {}
        for job in self.active:
            rows = [r for r in job.rows if not r.finished]
            if rows:
                by_sampler.setdefault(id(job.sampler), (job.sampler, []))[1].extend(rows)
        for sampler, rows in by_sampler.values():
            sampler.step(rows)
            self.steps += 1
            self.rows_stepped += len(rows)
        still = []
        for job in self.active:
            ev = events.get(id(job)) or Event(job)
            for r in job.rows:
                d = r.take_delta()
                if d:
                    ev.deltas.append((r.index, d))
                if r.finished and not getattr(r, "_reported", False):
                    r._reported = True  # type: ignore[attr-defined]
                    ev.finished.append((r.index, r.finish_reason or "length"))
            ev.done = job.finished
            if ev.started or ev.deltas or ev.finished or ev.done:
                events[id(job)] = ev
            if not job.finished:
                still.append(job)
        self.active = still
        return list(events.values())


# --- CLI ----------------------------------------------------------------------------------------------
def run_sample_cli(args: argparse.Namespace) -> int:
    """`raylstm sample`: the original project's predict.py, one block of text per temperature and sample."""
    if args.length < 0:
        raise ValueError("--length must be >= 0")
    if args.n < 1:
        raise ValueError("--n must be >= 1")
    sampler = Sampler.load(args.checkpoint)
    info = sampler.info()
    print(
        f"# checkpoint {info['checkpoint']}  step {info['step']}  val_bpc {info['val_bpc']}", file=sys.stderr
    )
    unknown = sampler.vocab.unknown_chars(args.prime)
    if unknown:
        print(f"# prime characters outside the vocabulary (read as unknown): {unknown!r}", file=sys.stderr)
    for t in args.temperature:
        params = SampleParams(
            temperature=t,
            top_k=args.top_k,
            top_p=args.top_p,
            max_chars=args.length,
            stop=tuple(args.stop),
            seed=args.seed,
        )
        for c in sampler.generate([args.prime], params, n=args.n)[0]:
            print(f"----- temperature {t}  seed {c.seed}  sample {c.index}  ({c.finish_reason})")
            print(args.prime + c.text)
    return 0
