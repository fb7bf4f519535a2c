"""Ray Serve deployment: HTTP around `raylstm.sample`. No Ray Data, no Ray Train.

    client --HTTP--> Serve proxy --> LSTMServer replica (FastAPI ingress)
                                       |  @serve.batch _admit: requests arriving together join together
                                       v
                                     Engine (sample.py), stepped by one background task in a thread:
                                       every model step advances every active request by one character
                                       (continuous batching: requests join and leave between steps)
                                       |
                                       v  per-request asyncio.Queue of events -> JSON or SSE

Routes: POST /v1/generate, POST /v1/completions (OpenAI completions shape; max_tokens counts characters),
GET /v1/models, GET /v1/model, GET /healthz, POST /admin/reload, GET / (web page), /docs (OpenAPI).
A bearer token (sha256 passed in, or read from the env var named by ServeConfig.token_env) guards every
route that touches the model or admin; /healthz, the static page and the OpenAPI schema stay open.
Hot reload: a replica following a run dir polls best.json; POST /admin/reload reloads the replica that
receives it. Rows already generating finish on the checkpoint they started with, so no request fails.
"""

# No `from __future__ import annotations`: FastAPI must resolve the request models in Serve's replica
# (string annotations there leave the OpenAPI schema unbuildable).
import asyncio
import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from ray import serve

from raylstm import storage as store
from raylstm.checkpoint import BEST, META, CheckpointError, resolve_checkpoint
from raylstm.config import Config, ServeConfig, load_config
from raylstm.engine import Engine, Event, Job
from raylstm.ray_env import serve_http_address
from raylstm.sample import MAX_SEED, SampleParams, Sampler

log = logging.getLogger("ray.serve")

# Static bounds in the schema; the configurable caps (ServeConfig.max_*) are checked per request.
HARD_MAX_CHARS = 1_000_000
StopStr = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _no_surrogates(v: Any, field: str) -> Any:
    # A lone UTF-16 surrogate (legal in JSON "\ud800") cannot be encoded back out as UTF-8.
    items = v if isinstance(v, list) else [v]
    for s in items:
        if isinstance(s, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in s):
            raise ValueError(f"{field} contains an unpaired UTF-16 surrogate")
    return v


class GenerateRequest(BaseModel):
    """raylstm's own request: lengths are characters."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="text to continue (at least one character)")
    max_chars: int = Field(
        200, ge=0, le=HARD_MAX_CHARS, description="characters to generate (capped by config)"
    )
    temperature: float = Field(1.0, ge=0, le=10, allow_inf_nan=False, description="0 = argmax")
    top_k: int = Field(0, ge=0, le=1_000_000, description="keep the k most likely characters; 0 = all")
    top_p: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="nucleus sampling; 1 = off")
    n: int = Field(1, ge=1, le=64, description="samples (seeds seed, seed+1, ...); capped by config")
    stop: list[StopStr] | StopStr | None = Field(None, description="output ends before any of these")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same text; omitted = random")
    stream: bool = Field(False, description="Server-Sent Events instead of one JSON answer")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _no_surrogates(v, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 8:
            raise ValueError("at most 8 stop strings")
        return _no_surrogates(v, "stop")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The OpenAI completions request. max_tokens counts characters (this model's tokens are characters).

    Fields OpenAI defines that a char-LSTM cannot honour are accepted only at their neutral values.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="must be the served model id when given")
    prompt: (
        Annotated[str, StringConstraints(min_length=1)]
        | Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1, max_length=64)]
    ) = Field(description="a string, or a list of strings (one batch)")
    max_tokens: int | None = Field(16, ge=0, le=HARD_MAX_CHARS, description="characters to generate")
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="extension (as in vLLM)")
    n: int | None = Field(1, ge=1, le=64)
    stop: list[StopStr] | StopStr | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    user: str | None = None
    logprobs: None = Field(None, description="not supported: must be null")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1")
    suffix: None = Field(None, description="not supported: must be null")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="only 0")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="only empty")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return _no_surrogates(v, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return _no_surrogates(v, "stop")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="checkpoint or run dir; default: the run's best.json")


def _stops(v: list[str] | str | None) -> tuple[str, ...]:
    return () if v is None else (v,) if isinstance(v, str) else tuple(v)


def _field_error(field: str, msg: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the field, for limits that come from config."""
    return RequestValidationError(
        [{"loc": ("body", field), "msg": msg, "type": "value_error", "input": None}]
    )


# --- auth -----------------------------------------------------------------------------------------------
_AUTH: dict[str, str | None] = {"sha256": None}  # set per replica process in LSTMServer.__init__
_bearer = HTTPBearer(auto_error=False, description="set when the server's token env var is set")


def token_sha256(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def require_token(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    want = _AUTH["sha256"]
    if not want:
        return
    got = token_sha256(creds.credentials) if creds else None
    if got is None or not hmac.compare_digest(got, want):
        raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


AUTH = [Depends(require_token)]

app = FastAPI(
    title="raylstm",
    version="0.1.0",
    description="Character-level LSTM text generation. Lengths (max_chars, max_tokens) count characters.",
)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


def _cancel_unfinished(jobs: list["ServeJob"]) -> None:
    for j in jobs:
        if not j.finished:
            j.cancelled = True


@dataclass(eq=False)
class ServeJob(Job):
    queue: asyncio.Queue | None = None  # events for the request handler (shared by a multi-prompt request)
    prompt_index: int = 0


@serve.deployment
@serve.ingress(app)
class LSTMServer:
    def __init__(
        self,
        source: str,
        follow: bool = False,
        serve_config: dict | None = None,
        token_hash: str | None = None,
    ) -> None:
        import torch

        self.cfg = ServeConfig(**(serve_config or {}))
        # Small-batch LSTM steps gain nothing from a thread pool, and on a busy host it spins.
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        self.device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if store.is_remote(source):
            # On object storage: each replica copies the best (or given) checkpoint into its own node's
            # cache and serves that verified copy; following best.json in a bucket is not supported.
            source, follow = str(store.localize_checkpoint(source)), False
        self.source = source
        self.follow = follow
        self.sampler = Sampler.load(source, self.device)
        self._last_best = self.sampler.path.resolve()  # what best.json named when last looked at
        self.engine = Engine(self.sampler, self.cfg.max_batch_size)
        self._admit.set_max_batch_size(self.cfg.max_batch_size)
        self._admit.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        # Through the imported module: Serve ships this class by value, so a bare `_AUTH` here would be
        # a copy, not the dict `require_token` reads.
        import raylstm.serve as this_module

        this_module._AUTH["sha256"] = token_hash or token_sha256(os.environ.get(self.cfg.token_env))
        self._step_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raylstm-step")
        self._load_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raylstm-load")
        self._tasks: list[asyncio.Task] = []
        self._wake: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.reloads = 0
        self.created = int(time.time())
        try:  # Serve builds replicas on their event loop: start the loop and the best.json poller now
            asyncio.get_running_loop()
            self._ensure_started()
        except RuntimeError:  # no loop here: the first request starts them
            pass

    # --- engine loop ------------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        """Start the generation loop and the best.json poller on the replica's event loop (first request)."""
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks.append(asyncio.create_task(self._run_engine()))
        if self.follow and self.cfg.reload_poll_s > 0:
            self._tasks.append(asyncio.create_task(self._poll_best()))

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                if not self.engine.has_work():
                    await self._wake.wait()
                continue
            try:
                events: list[Event] = await loop.run_in_executor(self._step_pool, self.engine.step)
            except Exception as e:  # a device or model error: fail what is in flight, keep serving
                log.exception("generation step failed")
                events = []
                for job in list(self.engine.active) + list(self.engine.waiting):
                    job.error = f"generation failed: {e}"
                    events.append(Event(job, done=True))
                self.engine.active.clear()
                self.engine.waiting.clear()
            for ev in events:
                ev.job.queue.put_nowait(ev)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _admit(self, jobs: list[ServeJob]) -> list[bool]:
        # Requests that arrive within batch_wait_timeout_s join the running batch at the same model step.
        self.engine.submit(jobs)
        self._wake.set()
        return [True] * len(jobs)

    async def _submit(self, prompts: list[str], params: SampleParams, n: int) -> list[ServeJob]:
        self._ensure_started()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [ServeJob(p, params, n, queue=queue, prompt_index=i) for i, p in enumerate(prompts)]
        await asyncio.gather(*(self._admit(j) for j in jobs))
        return jobs

    async def _events(self, jobs: list[ServeJob]) -> AsyncIterator[Event]:
        """Events of these jobs until all are done; a client that goes away cancels its rows."""
        pending = len(jobs)
        try:
            while pending:
                ev = await jobs[0].queue.get()
                if ev.job.error:
                    raise HTTPException(500 if "generation failed" in ev.job.error else 400, ev.job.error)
                if ev.done:
                    pending -= 1
                yield ev
        finally:
            _cancel_unfinished(jobs)

    def _check_caps(self, prompts: list[str], max_chars: int, n: int, length_field: str) -> None:
        c = self.cfg
        for p in prompts:
            if len(p) > c.max_prompt_chars:
                raise _field_error(
                    "prompt", f"prompt has {len(p)} characters; the cap is {c.max_prompt_chars}"
                )
        if max_chars > c.max_new_chars:
            raise _field_error(
                length_field, f"{length_field}={max_chars} is over the cap of {c.max_new_chars}"
            )
        if n > c.max_n:
            raise _field_error("n", f"n={n} is over the cap of {c.max_n}")

    # --- routes -------------------------------------------------------------------------------------------
    @app.get("/healthz", summary="liveness: 200 once the replica has loaded a checkpoint")
    async def healthz(self) -> dict:
        self._ensure_started()
        return {"status": "ok", "checkpoint": str(self.sampler.path)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(resources.files("raylstm").joinpath("static/index.html").read_text())

    @app.get("/v1/models", dependencies=AUTH, summary="OpenAI-style model list")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": self.cfg.model_id, "object": "model", "created": self.created, "owned_by": "raylstm"}
            ],
        }

    @app.get(
        "/v1/model", dependencies=AUTH, summary="the served checkpoint: path, step, val bpc, vocab, config"
    )
    async def model_info(self) -> dict:
        self._ensure_started()
        info = self.sampler.info()
        info.update(
            model_id=self.cfg.model_id,
            source=self.source,
            follow=self.follow,
            reloads=self.reloads,
            replica=serve.get_replica_context().replica_id.unique_id,
            active_rows=sum(len(j.rows) for j in self.engine.active),
            waiting=len(self.engine.waiting),
            max_batch_size=self.cfg.max_batch_size,
            mean_rows_per_step=self.engine.rows_stepped / max(1, self.engine.steps),
        )
        return info

    @app.post("/v1/generate", dependencies=AUTH, summary="continue a prompt (JSON, or SSE with stream=true)")
    async def generate(self, req: GenerateRequest):
        self._check_caps([req.prompt], req.max_chars, req.n, "max_chars")
        params = SampleParams(
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            max_chars=req.max_chars,
            stop=_stops(req.stop),
            seed=req.seed,
        )
        jobs = await self._submit([req.prompt], params, req.n)
        if req.stream:
            return StreamingResponse(self._generate_sse(jobs), media_type="text/event-stream")
        async for _ in self._events(jobs):
            pass
        return self._generate_body(jobs[0])

    def _generate_body(self, job: ServeJob) -> dict:
        return {
            "model": self.cfg.model_id,
            "checkpoint": str(job.sampler.path),
            "step": job.sampler.ckpt.step,
            "samples": [
                {"text": c.text, "finish_reason": c.finish_reason, "seed": c.seed, "index": c.index}
                for c in job.completions()
            ],
            "unknown_chars": job.prompt_info.unknown_chars,
            "prompt": job.prompt_info.text,
            "prompt_changes": job.prompt_info.changes,
            "prompt_chars": len(job.prompt_info.text),
        }

    async def _generate_sse(self, jobs: list[ServeJob]) -> AsyncIterator[str]:
        try:
            async for ev in self._events(jobs):
                job = ev.job
                if ev.started:
                    yield _sse(
                        {
                            "type": "start",
                            "checkpoint": str(job.sampler.path),
                            "step": job.sampler.ckpt.step,
                            "seeds": [r.seed for r in job.rows],
                            "unknown_chars": job.prompt_info.unknown_chars,
                            "prompt": job.prompt_info.text,
                            "prompt_changes": job.prompt_info.changes,
                        }
                    )
                for d in ev.deltas:
                    yield _sse({"type": "delta", "index": d.index, "text": d.text})
                for idx, reason in ev.finished:
                    yield _sse({"type": "finish", "index": idx, "finish_reason": reason})
        except HTTPException as e:
            yield _sse({"type": "error", "error": e.detail})
        finally:
            _cancel_unfinished(jobs)  # the client went away mid-stream: free its rows
        yield _sse("[DONE]")

    @app.post(
        "/v1/completions", dependencies=AUTH, summary="OpenAI completions (max_tokens counts characters)"
    )
    async def completions(self, req: CompletionRequest):
        if req.model is not None and req.model != self.cfg.model_id:
            raise HTTPException(
                404, f"model {req.model!r} is not served here; this server has {self.cfg.model_id!r}"
            )
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        n = req.n or 1
        max_chars = 16 if req.max_tokens is None else req.max_tokens
        self._check_caps(prompts, max_chars, n, "max_tokens")
        params = SampleParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_chars=max_chars,
            stop=_stops(req.stop),
            seed=req.seed,
        )
        jobs = await self._submit(prompts, params, n)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.cfg.model_id,
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._completions_sse(jobs, head, n, bool(req.echo), include_usage),
                media_type="text/event-stream",
            )
        async for _ in self._events(jobs):
            pass
        choices = []
        for job in jobs:
            for r in job.rows:
                text = (job.prompt_info.text if req.echo else "") + r.text
                choices.append(
                    {
                        "text": text,
                        "index": job.prompt_index * n + r.index,
                        "logprobs": None,
                        "finish_reason": r.finish_reason,
                    }
                )
        return {
            **head,
            "choices": choices,
            "usage": self._usage(jobs),
            "system_fingerprint": jobs[0].sampler.vocab.fingerprint(),
            "unknown_chars": jobs[0].prompt_info.unknown_chars,
            "prompt_changes": [j.prompt_info.changes for j in jobs],
        }

    @staticmethod
    def _usage(jobs: list[ServeJob]) -> dict:
        prompt = sum(len(j.prompt_info.text) for j in jobs if j.prompt_info)
        completion = sum(len(r.text) for j in jobs for r in j.rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _completions_sse(
        self, jobs: list[ServeJob], head: dict, n: int, echo: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(index: int, text: str, reason: str | None) -> str:
            return _sse(
                {
                    **head,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}],
                }
            )

        try:
            async for ev in self._events(jobs):
                base = ev.job.prompt_index * n
                if ev.started and echo:
                    for r in ev.job.rows:
                        yield chunk(base + r.index, ev.job.prompt_info.text, None)
                for d in ev.deltas:
                    yield chunk(base + d.index, d.text, None)
                for idx, reason in ev.finished:
                    yield chunk(base + idx, "", reason)
        except HTTPException as e:
            yield _sse({"error": {"message": e.detail, "type": "server_error"}})
        finally:
            _cancel_unfinished(jobs)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": self._usage(jobs)})
        yield _sse("[DONE]")

    # --- hot reload ---------------------------------------------------------------------------------------
    @app.post(
        "/admin/reload",
        dependencies=AUTH,
        summary="switch this replica to the run's best (or a given) checkpoint",
    )
    async def admin_reload(self, req: ReloadRequest | None = None) -> dict:
        self._ensure_started()
        target = (req.checkpoint if req and req.checkpoint else None) or self.source
        try:
            changed = await self._reload(target)
        except (CheckpointError, ValueError, OSError) as e:
            raise HTTPException(409, f"reload refused, still serving {self.sampler.path}: {e}") from e
        return {"reloaded": changed, "checkpoint": str(self.sampler.path), "step": self.sampler.ckpt.step}

    async def _reload(self, target: str) -> bool:
        """Load `target` in a thread, then swap it in: running rows finish on the old sampler."""
        async with self._reload_lock:
            path = resolve_checkpoint(target).resolve()
            if path == Path(self.sampler.path).resolve():
                return False
            loop = asyncio.get_running_loop()
            sampler = await loop.run_in_executor(self._load_pool, Sampler.load, str(path), self.device)
            self.sampler = sampler
            self.engine.set_sampler(sampler)
            self.reloads += 1
            log.info("raylstm: now serving %s (step %s)", sampler.path, sampler.ckpt.step)
            return True

    async def _poll_best(self) -> None:
        # Reload when best.json names a new checkpoint (not whenever it differs from what is served, so an
        # explicit /admin/reload to another checkpoint sticks until the trainer writes a new best).
        while True:
            await asyncio.sleep(self.cfg.reload_poll_s)
            try:
                best = resolve_checkpoint(self.source).resolve()
                if best != self._last_best:
                    await self._reload(str(best))
                    self._last_best = best
            except (CheckpointError, ValueError, OSError) as e:
                log.warning("raylstm: best.json poll: keeping %s: %s", self.sampler.path, e)


# --- building and running -------------------------------------------------------------------------------
def build_app(
    source: str | Path,
    cfg: ServeConfig | None = None,
    *,
    follow: bool | None = None,
    token: str | None = None,
) -> serve.Application:
    """The Serve application for a checkpoint dir or a run dir (a run dir is followed via best.json)."""
    cfg = cfg or ServeConfig()
    if store.is_remote(source):
        store.best_checkpoint_uri(str(source))  # fail here, in the driver, with a clear message
        follow = False
    else:
        source = Path(source).resolve()
        resolve_checkpoint(source)  # fail here, in the driver, with a clear message
    if follow is None:
        follow = (source / BEST).exists() and not (source / META).exists()
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # One replica must take every request of a full batch (Serve's default is 5 at a time).
        "max_ongoing_requests": max(64, 4 * cfg.max_batch_size),
    }
    if cfg.max_replicas > cfg.num_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.num_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": max(1, cfg.max_batch_size),
        }
    else:
        opts["num_replicas"] = cfg.num_replicas
    token = token if token is not None else os.environ.get(cfg.token_env)
    return LSTMServer.options(**opts).bind(str(source), follow, dataclasses.asdict(cfg), token_sha256(token))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run/deploy` entry (serve_config.yaml): args {run: DIR} or {checkpoint: DIR}, plus any
    ServeConfig field (e.g. max_batch_size) and optionally `config: path/to/config.toml`."""
    args = dict(args)
    source = args.pop("run", None) or args.pop("checkpoint", None)
    if not source:
        raise ValueError("serve_config.yaml: application args need `run: RUN_DIR` or `checkpoint: CKPT_DIR`")
    cfg_path = args.pop("config", None)
    # Through the config layer, so the YAML's fields get the same checks and errors as --set overrides.
    cfg = load_config(cfg_path, [f"serve.{k}={json.dumps(v)}" for k, v in args.items()]).serve
    return build_app(source, cfg)


@dataclass
class ServerHandle:
    """A running Serve app started by `start_server`; `shutdown()` stops Serve cleanly."""

    url: str
    name: str

    def shutdown(self) -> None:
        serve.shutdown()


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:  # proxy not listening yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz not answering after {timeout_s:.0f} s ({last})")


def start_server(
    source: str | Path,
    cfg: ServeConfig | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    name: str = "raylstm",
    follow: bool | None = None,
    token: str | None = None,
) -> ServerHandle:
    """Start Serve on the connected Ray (ray.init first) and run the app; returns once /healthz answers.

    Serve's HTTP host/port are cluster-wide and fixed while Serve runs, so this owns Serve on the cluster:
    call `handle.shutdown()` (serve.shutdown) before starting another on a different port.
    """
    cfg = dataclasses.replace(cfg or ServeConfig())
    cfg.host = host or cfg.host
    cfg.port = port if port is not None else cfg.port
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(source, cfg, follow=follow, token=token), name=name, route_prefix="/", blocking=False)
    cfg.host, cfg.port = serve_http_address(cfg.host, cfg.port)  # an earlier serve.start wins
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    _wait_healthy(url)
    return ServerHandle(url=url, name=name)


def run_server(args: Any, cfg: Config) -> int:
    """`raylstm serve`: serve until Ctrl-C, then shut Serve down."""
    from raylstm.ray_env import ensure_ray

    sc = cfg.serve
    if args.host:
        sc.host = args.host
    if args.port is not None:
        sc.port = args.port
    if args.replicas:
        sc.num_replicas = args.replicas
        sc.max_replicas = max(sc.max_replicas, args.replicas)
    if args.gpu:
        sc.num_gpus = 1.0
    source = args.run or args.checkpoint
    ensure_ray(args.address)
    remote = store.is_remote(source)  # s3://...: served from a copy, not followed (see LSTMServer)
    try:
        handle = start_server(source, sc, follow=bool(args.run) and not remote)
        auth = "on" if os.environ.get(sc.token_env) else f"off (set {sc.token_env} to require a bearer token)"
        serving = store.best_checkpoint_uri(source) if remote else resolve_checkpoint(source)
        print(
            f"raylstm serving {serving}\n  {handle.url}/  (web page)\n  {handle.url}/docs"
            f"  (OpenAPI)\n  auth: {auth}\nCtrl-C to stop.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down Serve", flush=True)
    finally:
        serve.shutdown()  # also when Ctrl-C comes during startup
    return 0
