"""The HTTP routes: protocol models in, engine streams out. No Ray (serve.py builds this app per replica).

    POST /v1/generate      GenerateRequest   -> GenerateResponse, or SSE: start, delta..., finish, [DONE]
    POST /v1/completions   CompletionRequest -> CompletionResponse, or SSE CompletionStreamResponse chunks
    POST /v1/classify      ClassifyRequest   -> ClassifyResponse (a conditioned model's rating read back)
    GET  /v1/models, /v1/model, /healthz, /metrics, /

`build_api(server, token_sha256)` returns a FastAPI app whose routes close over `server` (the replica:
its engine, config and metrics): auth, metrics and error mapping need no module globals. Errors
are typed (sample.SampleParamError, engine.*, checkpoint.CheckpointError) and mapped to statuses by
exception handlers, never by reading message text:

    SampleParamError / cap exceeded  422 naming the field      QueueFull        429 + Retry-After
    RequestTimeout / EngineStopped   503 + Retry-After          GenerationFailed 500
    bad or missing token             401
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures at app build time.
import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic.json_schema import models_json_schema

from raylstm.config import ServeConfig
from raylstm.engine import EngineError, EngineStopped, Job, QueueFull, RequestTimeout, ServingEngine, Stream
from raylstm.metrics import CONTENT_TYPE, ServeMetrics
from raylstm.protocol import (
    CharLogprobs,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    CompletionUsage,
    DeltaEvent,
    ErrorEvent,
    FinishEvent,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelInfo,
    ModelList,
    PromptReport,
    Sample,
    StartEvent,
)
from raylstm.sample import Prompt, SampleParamError, SampleParams, TokenLogprobs


class Server(Protocol):
    """What the routes need from a replica (serve.LSTMServer)."""

    cfg: ServeConfig
    engine: ServingEngine
    metrics: ServeMetrics
    replica: str
    created: int
    loading: str | None

    def model_info(self) -> dict[str, Any]: ...

    async def submit(
        self, prompts: list[Any], params: SampleParams, n: int, best_of: int | None, stream: bool
    ) -> Stream: ...


def token_sha256(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def _status_of(e: BaseException) -> int:
    if isinstance(e, SampleParamError):
        return 422
    if isinstance(e, QueueFull):
        return 429
    if isinstance(e, (RequestTimeout, EngineStopped)):
        return 503
    return 500


def _field_error(field: str, msg: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the field."""
    return RequestValidationError(
        [{"loc": ("body", field), "msg": msg, "type": "value_error", "input": None}]
    )


def _sse(model: Any) -> str:
    data = model if isinstance(model, str) else model.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


def _logprobs(text: str, lp: TokenLogprobs | None, first_offset: int) -> CharLogprobs | None:
    """OpenAI's logprobs object for `text` (one token per character), offsets from `first_offset`."""
    if lp is None:
        return None
    tops = lp.top_logprobs if any(t is not None for t in lp.top_logprobs) else None  # logprobs=0: null
    return CharLogprobs(
        tokens=list(text),
        token_logprobs=list(lp.token_logprobs),
        top_logprobs=tops,
        text_offset=list(range(first_offset, first_offset + len(text))),
    )


def _concat(a: CharLogprobs | None, b: CharLogprobs | None) -> CharLogprobs | None:
    if a is None or b is None:
        return a or b
    tops = None
    if a.top_logprobs is not None or b.top_logprobs is not None:
        tops = (a.top_logprobs or [None] * len(a.tokens)) + (b.top_logprobs or [None] * len(b.tokens))
    return CharLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=tops,
        text_offset=a.text_offset + b.text_offset,
    )


def _report(p: Prompt) -> dict[str, Any]:
    return {
        "prompt": p.text,
        "prompt_changes": p.changes,
        "unknown_chars": p.unknown_chars,
        "prompt_chars": len(p.text),
    }


class CountRequests:
    """Pure ASGI middleware: every answered request counted by route template and status (streamed
    bodies pass through untouched; a request the client abandons counts with the status it was sent)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(getattr(scope.get("route"), "path", "unmatched"), status)


# What a streamed body's `data:` lines carry; registered as OpenAPI components so /docs shows them.
GENERATE_EVENTS = [StartEvent, DeltaEvent, FinishEvent, ErrorEvent]
STREAM_MODELS = [*GENERATE_EVENTS, CompletionStreamResponse]


def _ref_any(models: list[type]) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    return refs[0] if len(refs) == 1 else {"anyOf": refs}


def _with_stream_models(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _, defs = models_json_schema(
                [(m, "serialization") for m in STREAM_MODELS], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def build_api(server: Server, token_sha256_hex: str | None) -> FastAPI:
    app = FastAPI(
        title="raylstm",
        version="0.2.0",
        description="Character-level LSTM text generation. Lengths (max_chars, max_tokens) count characters; "
        "in the OpenAI API the character is the token.",
    )
    cfg = server.cfg
    bearer = HTTPBearer(auto_error=False, description="required when the server's token env var is set")

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not token_sha256_hex:
            return
        got = token_sha256(creds.credentials) if creds else None
        if got is None or not hmac.compare_digest(got, token_sha256_hex):
            raise HTTPException(
                401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    auth = [Depends(require_token)]

    # --- requests by route and status, and the typed errors --------------------------------------------
    app.add_middleware(CountRequests, metrics=server.metrics)

    def retry_after(e: EngineError) -> dict[str, str]:
        s = getattr(e, "retry_after_s", cfg.retry_after_s)
        return {"Retry-After": str(max(1, int(round(s))))}

    @app.exception_handler(SampleParamError)
    async def bad_param(request: Request, e: SampleParamError) -> JSONResponse:
        return await request_validation_exception_handler(request, _field_error(e.field, str(e)))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        status = _status_of(e)
        headers = retry_after(e) if status in (429, 503) else None
        return JSONResponse({"detail": str(e)}, status_code=status, headers=headers)

    # --- shared by the two generation routes -----------------------------------------------------------
    def check_caps(prompts: list[Any], max_chars: int, n: int, width: int, length_field: str) -> None:
        for p in prompts:
            if len(p) > cfg.max_prompt_chars:
                raise _field_error(
                    "prompt", f"prompt has {len(p)} characters; the cap is {cfg.max_prompt_chars}"
                )
        if max_chars > cfg.max_new_chars:
            raise _field_error(
                length_field, f"{length_field}={max_chars} is over the cap of {cfg.max_new_chars}"
            )
        if n > cfg.max_n:
            raise _field_error("n", f"n={n} is over the cap of {cfg.max_n}")
        if width > cfg.max_n:
            raise _field_error("best_of", f"best_of={width} is over the cap of {cfg.max_n}")

    async def submit(
        prompts: list[Any], params: SampleParams, n: int, best_of: int | None, stream: bool
    ) -> Stream:
        """Validate against the served model (422 before anything is sent), then queue (429/503 at once)."""
        sampler = server.engine.sampler
        sampler.check_params(params)
        for p in prompts:
            if isinstance(p, list):
                sampler.prompt_from_ids(p)
            else:
                sampler.prepare_prompt(p, params.clean_prompt)
        return await server.submit(prompts, params, n, best_of, stream)

    def samples_of(job: Job) -> list[Sample]:
        return [
            Sample(
                text=c.text,
                finish_reason=c.finish_reason,
                seed=c.seed,
                index=c.index,
                mean_logprob=c.mean_logprob,
                logprobs=_logprobs(c.text, c.logprobs, 0),
            )
            for c in job.completions()
        ]

    # --- routes ----------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, summary="200 once this replica has loaded its checkpoint")
    async def healthz() -> Health:
        s = server.engine.sampler
        return Health(
            status="ok",
            checkpoint=str(s.path),
            step=s.step_number,
            replica=server.replica,
            loading=server.loading,
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(resources.files("raylstm").joinpath("static/index.html").read_text())

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus text format: this replica's requests, rows, queue, chars, latencies, checkpoint",
        responses={200: {"content": {CONTENT_TYPE: {}}}},
    )
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, summary="OpenAI-style model list")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=cfg.model_id, created=server.created)])

    @app.get(
        "/v1/model",
        dependencies=auth,
        response_model=ModelInfo,
        summary="the served checkpoint, its vocabulary ids, this replica's state",
    )
    async def model_info() -> dict[str, Any]:
        return server.model_info()

    @app.post(
        "/v1/generate",
        dependencies=auth,
        response_model=GenerateResponse,
        summary="continue a prompt (JSON, or Server-Sent Events with stream=true)",
        responses={200: {"content": {"text/event-stream": {"schema": _ref_any(GENERATE_EVENTS)}}}},
    )  # fmt: skip
    async def generate(req: GenerateRequest):
        params = req.to_sample_params()
        check_caps([req.prompt], req.max_chars, req.n, max(req.n, req.best_of or 1), "max_chars")
        stream = await submit([req.prompt], params, req.n, req.best_of, req.stream)
        if req.stream:
            return StreamingResponse(generate_sse(stream), media_type="text/event-stream")
        job = (await stream.collect())[0]
        s = job.sampler
        p = job.prompt_info
        return GenerateResponse(
            model=cfg.model_id,
            checkpoint=str(s.path),
            step=s.step_number,
            replica=server.replica,
            samples=samples_of(job),
            prompt_logprobs=_logprobs(p.text, p.logprobs, 0),
            **_report(p),
        )

    async def generate_sse(stream: Stream) -> AsyncIterator[str]:
        try:
            async for ev in stream:
                job = ev.job
                if ev.started:
                    p = job.prompt_info
                    yield _sse(StartEvent(
                        checkpoint=str(job.sampler.path), step=job.sampler.step_number, replica=server.replica,
                        seeds=[r.seed for r in job.rows], prompt_logprobs=_logprobs(p.text, p.logprobs, 0), **_report(p),
                    ))  # fmt: skip
                for d in ev.deltas:
                    yield _sse(
                        DeltaEvent(
                            index=d.index, text=d.text, logprobs=_logprobs(d.text, d.logprobs, d.offset)
                        )
                    )
                for idx, reason in ev.finished:
                    yield _sse(FinishEvent(index=idx, finish_reason=reason))
        except (EngineError, SampleParamError) as e:
            yield _sse(ErrorEvent(error=str(e), status=_status_of(e)))
        yield _sse("[DONE]")

    @app.post(
        "/v1/completions",
        dependencies=auth,
        response_model=CompletionResponse,
        summary="OpenAI completions; the character is the token (max_tokens, logprobs and logit_bias count characters)",
        responses={200: {"content": {"text/event-stream": {"schema": _ref_any([CompletionStreamResponse])}}}},
    )  # fmt: skip
    async def completions(req: CompletionRequest):
        if req.model is not None and req.model != cfg.model_id:
            raise HTTPException(
                404, f"model {req.model!r} is not served here; this server has {cfg.model_id!r}"
            )
        prompts = req.prompts()
        params = req.to_sample_params()
        n = req.n or 1
        check_caps(prompts, params.max_chars, n, max(n, req.best_of or 1), "max_tokens")
        stream = await submit(prompts, params, n, req.best_of, bool(req.stream))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": cfg.model_id}
        echo = bool(req.echo)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                completions_sse(stream, head, n, echo, usage), media_type="text/event-stream"
            )
        jobs = await stream.collect()
        choices = []
        for job in jobs:
            p = job.prompt_info
            for c in job.completions():
                lp = _logprobs(c.text, c.logprobs, len(p.text) if echo else 0)
                if echo:
                    lp = _concat(_logprobs(p.text, p.logprobs, 0), lp)
                text = (p.text if echo else "") + c.text
                choices.append(
                    CompletionChoice(
                        text=text, index=job.index * n + c.index, logprobs=lp, finish_reason=c.finish_reason
                    )
                )
        return CompletionResponse(
            **head,
            choices=choices,
            usage=usage_of(jobs),
            system_fingerprint=jobs[0].sampler.vocab.fingerprint(),
            prompts=[PromptReport(**_report(j.prompt_info)) for j in jobs],
            checkpoint=str(jobs[0].sampler.path),
            step=jobs[0].sampler.step_number,
        )

    @app.post(
        "/v1/classify",
        dependencies=auth,
        response_model=ClassifyResponse,
        summary="a conditioned model read in reverse: P(rating | review) (and category) by Bayes' rule",
    )
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        from raylstm.classify import classify_reviews, clean_review

        sampler = server.engine.sampler
        ckpt = sampler.ckpt
        if sampler.conditions is None or ckpt is None:
            raise HTTPException(
                400,
                "this model is not conditioned (trained with model.conditions = []): there is no rating "
                'to read back; serve a model trained with model.conditions = ["rating", "category"]',
            )
        texts = req.texts()
        for t in texts:
            if len(t) > cfg.max_prompt_chars:
                raise _field_error(
                    "text", f"a review has {len(t)} characters; the cap is {cfg.max_prompt_chars}"
                )
        known = None
        if req.category is not None:
            # An unknown category is a 422 naming it with the valid ones (as rating/category on /v1/generate).
            sampler.condition_ids(SampleParams(conditions={"category": req.category}))
            known = {"category": [req.category] * len(texts)}
        # The model is read-only here: its forward runs beside the engine's step thread.
        post = await asyncio.to_thread(classify_reviews, ckpt, texts, known, None, str(sampler.device))
        results = [
            ClassifyResult(
                text=clean_review(t, ckpt),
                posterior=d,
                predicted={f: max(p, key=p.get) for f, p in d.items()},
            )
            for t, d in zip(texts, post)
        ]
        return ClassifyResponse(
            model=cfg.model_id, checkpoint=str(sampler.path), step=sampler.step_number, results=results
        )

    def usage_of(jobs: list[Job]) -> CompletionUsage:
        prompt = sum(len(j.prompt_info.text) for j in jobs if j.prompt_info)
        completion = sum(len(c.text) for j in jobs if j.rows for c in j.completions())
        return CompletionUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    async def completions_sse(
        stream: Stream, head: dict, n: int, echo: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(index: int, text: str, lp: CharLogprobs | None, reason: str | None) -> str:
            choice = CompletionChoice(text=text, index=index, logprobs=lp, finish_reason=reason)
            return _sse(CompletionStreamResponse(**head, choices=[choice]))

        try:
            async for ev in stream:
                base = ev.job.index * n
                p = ev.job.prompt_info
                shift = len(p.text) if echo else 0
                if ev.started and echo:
                    for r in ev.job.rows:
                        yield chunk(base + r.index, p.text, _logprobs(p.text, p.logprobs, 0), None)
                for d in ev.deltas:
                    yield chunk(base + d.index, d.text, _logprobs(d.text, d.logprobs, shift + d.offset), None)
                for idx, reason in ev.finished:
                    yield chunk(base + idx, "", None, reason)
            if include_usage:
                yield _sse(CompletionStreamResponse(**head, choices=[], usage=usage_of(stream.jobs)))
        except (EngineError, SampleParamError) as e:
            err = {
                "message": str(e),
                "type": "server_error" if _status_of(e) >= 500 else "invalid_request_error",
                "code": _status_of(e),
            }
            yield f"data: {json.dumps({'error': err})}\n\n"
        yield _sse("[DONE]")

    app.openapi = _with_stream_models(app)
    return app
