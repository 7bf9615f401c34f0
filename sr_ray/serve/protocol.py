"""The wire format: OpenAI chat-completions request/response models plus the `safety` extension.

Requests accept the OpenAI fields the guarded engine implements; any other field is refused with a 400
naming it (rather than silently ignored). Responses are plain OpenAI objects with one extra top-level
key, `safety`, which OpenAI clients keep (`response.safety` / `response.model_extra["safety"]`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag


def _no_lone_surrogates(text: str) -> str:
    """JSON's `\\ud800` escapes decode to lone surrogates, which are not text: nothing can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains a lone UTF-16 surrogate at position {err.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


def _json_kind(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "list" if isinstance(value, list) else None


def string_or_list(item, what: str):
    """`str | list[item]` chosen by the JSON type, so an error names the one shape that was sent (a plain
    union reports every member's error, e.g. 'should be a valid string' for a bad list element)."""
    return Annotated[Union[Annotated[Text, Tag("string")], Annotated[list[item], Tag("list")]],
                     Discriminator(_json_kind, custom_error_type="string_or_list",
                                   custom_error_message=f"expected {what}")]


class _Strict(BaseModel):
    """JSON types as OpenAI documents them: no coercion ("16" is not an int), no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ---- request ------------------------------------------------------------------------------------
class ImageURL(_Strict):
    url: Text = Field(max_length=16 * 2**20)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: string_or_list(ContentPart, "a string or a list of content parts")
    name: Text | None = Field(None, max_length=256)


class SafetyOptions(_Strict):
    """Per-request guard settings; the server accepts them only within its configured bounds."""

    enabled: bool | None = Field(None, description="false turns the guard off (admin key required)")
    interval: int | None = Field(None, ge=1, description="answer tokens between checks")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="flag when P(safe) < threshold")
    stream_mode: Literal["holdback", "stream_first"] | None = Field(
        None, description="stream_first releases tokens before they are checked (admin key required)")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Text = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: string_or_list(Text, "a string or a list of strings") | None = None
    n: Literal[1] = 1
    user: Text | None = Field(None, max_length=256)
    safety: SafetyOptions | None = None


# ---- responses ----------------------------------------------------------------------------------
class SafetyReport(BaseModel):
    """What the guard did for this response."""

    enabled: bool
    stream_mode: Literal["holdback", "stream_first"]
    flagged: bool
    checks_run: int
    flagged_at: int | None = Field(None, description="answer tokens generated when the probe flagged")
    p_safe_at_flag: float | None = None
    p_safe_min: float | None = Field(None, description="lowest P(safe) over the checks")
    tokens_released_before_flag: int | None = Field(None, description="tokens the client got before the flag")
    tokens_dropped: int = Field(0, description="held-back (unchecked) tokens discarded at the flag")
    model_version: str | None = Field(None, description="the reminder that guarded it: registered name/version or a directory")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    safety: SafetyReport


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class StreamChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event. The last choice-bearing chunk has `finish_reason` and `safety`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None
    safety: SafetyReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sr_ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request", 401: "missing or unknown API key", 403: "not allowed for this key",
        404: "unknown model", 413: "body or image too large",
        503: "busy: the replica's memory budget for bodies or decoded images is in use; retry", 500: "internal error",
        504: "generation timed out",
    }.items()
}

# One event of the stream as SSE parses it (on OpenAPI 3.0/3.1 a text/event-stream `schema` describes each event):
# `data` holds a chat.completion.chunk as JSON, an in-band error, or the closing "[DONE]".
SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chat.completion.chunk or {error} as JSON, or [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}
