"""The HTTP API's request, response and stream-chunk models (pydantic): what /docs shows. No Ray, no torch.

Two APIs over the same sampler:
  * raylstm's own (`/v1/generate`): lengths in characters, seeds and prompt cleaning said back;
  * OpenAI completions (`/v1/completions`), with the character as the token: `max_tokens` counts
    characters, `logprobs` are per character, `logit_bias` keys are vocabulary ids (GET /v1/model lists
    them), and vLLM's extensions `top_k`, `min_p`, `repetition_penalty`.
Each request model turns itself into `sample.SampleParams` with `to_sample_params()`; range checks that
need no vocabulary happen here (a 422 naming the field), the rest in the sampler (also a 422).

To add a request field: declare it on the request model with its range and description, carry it in
`to_sample_params()`; /docs and the 422s follow (as `rating`, `category` and `steer_sentiment` do).
"""

# No `from __future__ import annotations`: FastAPI resolves these models in Serve's replica, and string
# annotations there leave the OpenAPI schema unbuildable.
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from raylstm.sample import MAX_LOGPROBS, MAX_SEED, MAX_STEER, SampleParams

# Static bounds in the schema; the configurable caps (ServeConfig.max_*) are checked per request.
HARD_MAX_CHARS = 1_000_000
StopStr = Annotated[str, StringConstraints(min_length=1, max_length=64)]
PromptStr = Annotated[str, StringConstraints(min_length=1)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


def _no_surrogates(v: Any, field: str) -> Any:
    # A lone UTF-16 surrogate (legal in JSON "\ud800") cannot be encoded back out as UTF-8.
    items = v if isinstance(v, list) else [v]
    for s in items:
        if isinstance(s, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in s):
            raise ValueError(f"{field} contains an unpaired UTF-16 surrogate")
    return v


def _stops(v: list[str] | str | None) -> tuple[str, ...]:
    return () if v is None else (v,) if isinstance(v, str) else tuple(v)


def _bias(v: dict[str, float] | None) -> dict[int, float]:
    return {int(k): x for k, x in (v or {}).items()}


class _Sampling(BaseModel):
    """The sampling fields both APIs share (OpenAI's ranges and meanings; vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(
        None, ge=0, le=1_000_000, description="keep the k most likely characters; 0/null = all (vLLM)"
    )
    min_p: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="drop characters below min_p x the most likely one (vLLM)",
    )
    presence_penalty: float | None = Field(
        0.0, ge=-2, le=2, allow_inf_nan=False, description="minus this from every character already generated"
    )
    frequency_penalty: float | None = Field(
        0.0, ge=-2, le=2, allow_inf_nan=False, description="minus this x how often a character was generated"
    )
    repetition_penalty: float = Field(
        1.0, gt=0, le=100, allow_inf_nan=False,
        description="vLLM: scores of characters in the prompt or output divided (if > 0) or multiplied by this",
    )  # fmt: skip
    logit_bias: dict[str, float] | None = Field(
        None,
        max_length=1024,
        description="{vocabulary id: bias in [-100, 100]} added to the scores (ids: GET /v1/model)",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same text; omitted = random")
    clean_prompt: bool = Field(
        True, description="clean the prompt as the training text was (HTML, NFKC, case)"
    )
    # Conditioning (docs/conditioning.md): checked against the served model's condition vocabulary,
    # a 422 naming the field and listing the valid values otherwise. An extension on /v1/completions.
    rating: int | str | None = Field(
        None,
        description="a conditioned model: write a review of this star rating (1-5; GET /v1/model lists "
        "the model's `conditions`); null = missing",
    )
    category: str | None = Field(
        None, max_length=200, description="a conditioned model: of this category (GET /v1/model lists them)"
    )
    steer_sentiment: float | None = Field(
        None,
        ge=-MAX_STEER,
        le=MAX_STEER,
        allow_inf_nan=False,
        description="fix the model's sentiment unit while sampling: +1 positive, -1 negative (needs a "
        "sentiment unit with the checkpoint)",
    )

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, x in (v or {}).items():
            if not k.isdecimal():
                raise ValueError(f"logit_bias keys are vocabulary ids (decimal integers), got {k!r}")
            if not -100 <= x <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {x}")
        return v

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return _no_surrogates(v, "stop")

    @field_validator("rating", "category")
    @classmethod
    def _condition(cls, v: Any, info: ValidationInfo) -> Any:
        return _no_surrogates(v, info.field_name)

    def _common(self) -> dict[str, Any]:
        return dict(
            top_k=self.top_k or 0,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty,
            logit_bias=_bias(self.logit_bias),
            seed=self.seed,
            clean_prompt=self.clean_prompt,
            conditions={"rating": self.rating, "category": self.category},
            steer_sentiment=self.steer_sentiment,
        )


# --- raylstm's own API -----------------------------------------------------------------------------------
class GenerateRequest(_Sampling):
    """Continue a prompt. Lengths are characters."""

    prompt: str = Field(min_length=1, description="text to continue (at least one character)")
    max_chars: int = Field(
        200, ge=0, le=HARD_MAX_CHARS, description="characters to generate (capped by config)"
    )
    temperature: float = Field(1.0, ge=0, le=10, allow_inf_nan=False, description="0 = argmax")
    top_p: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="nucleus sampling; 1 = off")
    n: int = Field(1, ge=1, le=64, description="samples (seeds seed, seed+1, ...); capped by config")
    stop: list[StopStr] | StopStr | None = Field(
        None, description="output ends before any of these (up to 8)"
    )
    logprobs: Logprobs | None = Field(
        None, description="per character its logprob and the top-k alternatives"
    )
    prompt_logprobs: Logprobs | None = Field(None, description="the same for every prompt character")
    stream: bool = Field(False, description="Server-Sent Events instead of one JSON answer")
    best_of: int | None = Field(
        None,
        ge=1,
        le=64,
        description="run this many (>= n; not streamed) and return the n with the best mean logprob",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _no_surrogates(v, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 8:
            raise ValueError("at most 8 stop strings")
        return _no_surrogates(v, "stop")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        return _check_best_of(v, info.data.get("n") or 1, info.data.get("stream"))

    def to_sample_params(self) -> SampleParams:
        return SampleParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_chars=self.max_chars,
            stop=_stops(self.stop),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            **self._common(),
        )


def _check_best_of(best_of: int | None, n: int, stream: bool | None) -> int | None:
    """best_of is validated after n and stream (declared before it), so its error names it."""
    if best_of is not None and best_of < n:
        raise ValueError(f"best_of ({best_of}) must be >= n ({n})")
    if best_of is not None and best_of > n and stream:
        raise ValueError("best_of > n cannot be streamed: the best are known only at the end")
    return best_of


class CharLogprobs(BaseModel):
    """OpenAI's logprobs object, one entry per character (the character is the token)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="natural log; null for a prompt's first char")
    top_logprobs: list[dict[str, float] | None] | None = Field(
        None, description="the top-k alternatives (and the chosen char) per position; null with logprobs=0"
    )
    text_offset: list[int] = Field(description="where each character starts in the returned text")


class Sample(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    seed: int = Field(description="this sample's seed: send it back to get the same text")
    index: int
    mean_logprob: float = Field(description="mean natural-log probability of the generated characters")
    logprobs: CharLogprobs | None = None


class PromptReport(BaseModel):
    """What the model was conditioned on."""

    prompt: str = Field(description="the prompt after cleaning: what the model read")
    prompt_changes: list[str] = Field(description="what cleaning changed (empty: nothing)")
    unknown_chars: list[str] = Field(description="prompt characters outside the vocabulary (read as unknown)")
    prompt_chars: int


class GenerateResponse(PromptReport):
    model: str
    checkpoint: str
    step: int | None
    replica: str = Field(description="the replica that answered")
    samples: list[Sample]
    prompt_logprobs: CharLogprobs | None = None


class StartEvent(PromptReport):
    """First event of a stream: which checkpoint answers, with which seeds."""

    type: Literal["start"] = "start"
    checkpoint: str
    step: int | None
    replica: str
    seeds: list[int]
    prompt_logprobs: CharLogprobs | None = None


class DeltaEvent(BaseModel):
    """New text of one sample (never a partial stop string: the deltas add up to the final text)."""

    type: Literal["delta"] = "delta"
    index: int
    text: str
    logprobs: CharLogprobs | None = None


class FinishEvent(BaseModel):
    type: Literal["finish"] = "finish"
    index: int
    finish_reason: Literal["stop", "length"]


class ErrorEvent(BaseModel):
    """Sent (then `[DONE]`) when a streamed request fails after its 200 went out."""

    type: Literal["error"] = "error"
    error: str
    status: int = Field(description="the status it would have had before streaming started")


# --- OpenAI completions ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(_Sampling):
    """The OpenAI completions request; the character is the token. Fields a character model cannot
    honour are refused with a 422 naming them (`suffix`)."""

    model: str | None = Field(None, description="must be the served model id when given")
    prompt: (
        PromptStr
        | Annotated[list[PromptStr], Field(min_length=1, max_length=64)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1, max_length=64),
        ]
    ) = Field(description="a string, a list of strings (one batch), or character ids (a list, or lists)")
    max_tokens: int | None = Field(16, ge=0, le=HARD_MAX_CHARS, description="characters to generate")
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(1, ge=1, le=64)
    stop: list[StopStr] | StopStr | None = Field(None, description="up to 4 stop strings")
    stream: bool | None = False
    best_of: int | None = Field(
        None, ge=1, le=64, description="run this many (>= n); return the n with the best mean logprob"
    )
    stream_options: StreamOptions | None = None
    echo: bool | None = Field(
        False, description="prepend the prompt; with logprobs, the prompt's logprobs too"
    )
    logprobs: Logprobs | None = Field(
        None, description="per character its logprob and the top-k alternatives"
    )
    user: str | None = None
    suffix: None = Field(None, description="not supported by a left-to-right model: must be null")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return _no_surrogates(v, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return _no_surrogates(v, "stop")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        return _check_best_of(v, info.data.get("n") or 1, info.data.get("stream"))

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch: strings, or lists of character ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # one prompt of ids
        return list(p)

    def to_sample_params(self) -> SampleParams:
        return SampleParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_chars=16 if self.max_tokens is None else self.max_tokens,
            stop=_stops(self.stop),
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
            **self._common(),
        )


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CharLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="characters")
    completion_tokens: int = Field(description="characters")
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    system_fingerprint: str = Field(description="the vocabulary's fingerprint")
    # Extensions: what the model read, per prompt (OpenAI clients ignore unknown fields).
    prompts: list[PromptReport]
    checkpoint: str
    step: int | None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class CompletionStreamError(BaseModel):
    """Sent (then `[DONE]`) when a streamed completion fails after its 200 went out (OpenAI's shape)."""

    error: dict[str, Any]


# --- reading a review's rating back (raylstm.classify) ---------------------------------------------------
ReviewStr = Annotated[str, StringConstraints(min_length=1)]


class ClassifyRequest(BaseModel):
    """Reviews to read the rating (and category) of, by Bayes' rule on a conditioned model."""

    model_config = ConfigDict(extra="forbid")
    text: ReviewStr | Annotated[list[ReviewStr], Field(min_length=1, max_length=64)] = Field(
        description="a review, or a list of up to 64"
    )
    category: str | None = Field(
        None,
        max_length=200,
        description="the category the reviews were filed under: the rating is read given it (else summed "
        "over every category)",
    )

    @field_validator("text", "category")
    @classmethod
    def _text(cls, v: Any, info: ValidationInfo) -> Any:
        return _no_surrogates(v, info.field_name)

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class ClassifyResult(BaseModel):
    text: str = Field(description="the review as the model read it (cleaned as its training text was)")
    posterior: dict[str, dict[str, float]] = Field(
        description="per condition field, P(value | review) by Bayes' rule with the training prior"
    )
    predicted: dict[str, str] = Field(description="per field, the most probable value")


class ClassifyResponse(BaseModel):
    model: str
    checkpoint: str
    step: int | None
    results: list[ClassifyResult]


# --- the rest --------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raylstm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelInfo(BaseModel):
    """The served checkpoint, and this replica's state."""

    model_config = ConfigDict(extra="allow")
    model_id: str
    checkpoint: str | None
    step: int | None
    val_bpc: float | None
    vocab_size: int
    vocab: dict[str, int] = Field(description="every character's id (the keys logit_bias takes); 0 = unknown")
    window_mode: str
    conditions: dict[str, list[str]] = Field(
        default_factory=dict,
        description="a conditioned model's fields and their valid values (what rating/category take); {} if none",
    )
    replica: str
    pid: int
    engine_pid: int | None = Field(
        None, description="the engine process's pid (serve.engine_process = true); null: in the replica"
    )
    reloads: int
    active_rows: int
    waiting: int


class Health(BaseModel):
    """Only a replica that has loaded its checkpoint answers (Serve routes nothing to one in __init__)."""

    status: Literal["ok"]
    checkpoint: str
    step: int | None
    replica: str
    loading: str | None = Field(None, description="a checkpoint being loaded beside the served one (reload)")
