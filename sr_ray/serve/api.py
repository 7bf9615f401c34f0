"""The HTTP surface: an OpenAI-compatible FastAPI app over a `generate(job)` stream of the model replicas.

Routes: `POST /v1/chat/completions` (plain JSON or `stream: true` SSE), `GET /v1/models`, `/health`,
`/metrics`, `/openapi.json` (no `/docs` page: it would load Swagger UI from a CDN). Every request passes
the recorder (one audit record, one count, one x-request-id) and, on `/v1/`, the gatekeeper (API key,
body size and budget; `sr_ray.serve.gate`); then the request is validated, turned into a
`GenerationJob` (images decoded within the decode budget, safety options checked against policy) and
answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from sr_ray.models import Prompt
from sr_ray.reminder import SamplingConfig
from sr_ray.serve.audit import AuditLog
from sr_ray.serve.budget import Busy, ByteBudget
from sr_ray.serve.config import Limits, ServeConfig
from sr_ray.serve.gate import ERROR_TYPES, AsciiJSONResponse, Gatekeeper, Recorder, error_response, note
from sr_ray.serve.holdback import Chunk
from sr_ray.serve.images import ImageError, ImagePolicy, load_image
from sr_ray.serve.metrics import ServeMetrics
from sr_ray.serve.model import Admission, GenerationJob
from sr_ray.serve.policy import PolicyError, resolve_safety, sha256_hex
from sr_ray.serve.protocol import (
    ERROR_RESPONSES, SSE_EVENT_SCHEMA, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    Health, ModelCard, ModelList, TextPart,
)

logger = logging.getLogger("sr_ray.serve")
Generate = Callable[[GenerationJob], AsyncIterator[Admission | Chunk]]


def short(value: str, n: int = 64) -> str:
    """An echo of client input in an error message, cut (a 1 MiB model name is not repeated back)."""
    return repr(value) if len(value) <= n else repr(value[:n]) + f"... ({len(value)} characters)"


def error_path(body, loc) -> str:
    """Pydantic's error location as a path into the sent JSON. Steps that index the data are kept (and a
    missing field's name); the union tags pydantic inserts are dropped: `string`/`list` (a str-or-list
    field) and a content part's own `type` value, which is its tag."""
    path, node, tag_skipped = [], body, None
    for step in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(node, dict) and node.get("type") == step and tag_skipped is not node:
            tag_skipped = node
        elif isinstance(node, dict):
            node = node.get(step)  # None below a missing field: nothing further to index
            path.append(str(step))
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
            path.append(str(step))
    return ".".join(path)


def parts(message: ChatMessage) -> list:
    return [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content


def split_messages(messages: list[ChatMessage], limits: Limits) -> tuple[str | None, str, list[str]]:
    """(system text, user text, image URLs) of `[system/developer...] user`; refuses other shapes."""
    if len(messages) > limits.max_messages:
        raise PolicyError(400, f"at most {limits.max_messages} messages", param="messages")
    *head, last = messages
    if last.role != "user" or any(m.role not in ("system", "developer") for m in head):
        raise PolicyError(400, "expected optional system/developer messages followed by one user message; "
                               "multi-turn history is not supported by this model server", param="messages")
    system = []
    for i, m in enumerate(head):
        if any(p.type != "text" for p in parts(m)):
            raise PolicyError(400, "images are only accepted in the user message", param=f"messages.{i}.content")
        system += [p.text for p in parts(m)]
    texts = [p.text for p in parts(last) if p.type == "text"]
    urls = [p.image_url.url for p in parts(last) if p.type == "image_url"]
    if len(urls) > limits.max_images:
        raise PolicyError(400, f"at most {limits.max_images} image(s) per request, got {len(urls)}", param="messages")
    text = "\n".join(texts)
    if sum(map(len, system)) + len(text) > limits.max_text_chars:
        raise PolicyError(400, f"message text above the limit of {limits.max_text_chars} characters",
                          param="messages")
    if not text.strip() and not urls:
        raise PolicyError(400, "the user message is empty", param="messages")
    return ("\n".join(system) if system else None), text, urls


def stop_list(stop: str | list[str] | None, limits: Limits) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop or any(not s or len(s) > limits.max_stop_chars for s in stops):
        raise PolicyError(400, f"stop: up to {limits.max_stop} non-empty strings of at most "
                               f"{limits.max_stop_chars} characters", param="stop")
    return stops


def create_api(cfg: ServeConfig, generate: Generate, retry_on: tuple[type[BaseException], ...] = (),
               proxy_sets_request_id: bool = False) -> FastAPI:
    """The app. `proxy_sets_request_id`: behind Serve's proxy, which adds its own x-request-id header."""
    app = FastAPI(title="sr_ray guarded VLM", version="0.1.0", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat completions guarded by SafetyReminder (see docs/api.md)")
    metrics = ServeMetrics(cfg.reminder_version)
    audit = AuditLog(cfg.audit_log, cfg.audit_max_bytes, cfg.audit_backups, cfg.audit_max_field_chars)
    limits = cfg.limits
    image_policy = ImagePolicy(limits.max_image_bytes, limits.max_image_pixels, limits.max_image_side,
                               cfg.images.allow_remote, tuple(h.lower() for h in cfg.images.allowed_hosts),
                               cfg.images.timeout_s, limits.max_image_decoded_bytes)
    bodies = ByteBudget("request bodies", limits.max_inflight_body_bytes, limits.busy_wait_s)
    decodes = ByteBudget("decoded image pixels", limits.max_inflight_decoded_bytes, limits.busy_wait_s)
    reminder_loaded, started = bool(cfg.bundle or cfg.probe), int(time.time())

    app.add_middleware(Gatekeeper, keys=cfg.api_keys, max_body_bytes=limits.max_body_bytes, bodies=bodies)
    app.add_middleware(Recorder, metrics=metrics, audit=audit, proxy_sets_request_id=proxy_sets_request_id)

    def refused(request: Request, status: int, message: str, param: str | None = None, **kw) -> Response:
        note(request.scope, reason=message)
        return error_response(status, message, param=param, **kw)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            return refused(request, 400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}"
                                         f" (at character {err['loc'][-1]})")
        where = error_path(exc.body, err.get("loc", ()))
        return refused(request, 400, f"{where + ': ' if where else ''}{err.get('msg')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, 405, ...
        return refused(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.get("/health", response_model=Health)
    async def health():
        return Health()

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
    async def models():
        return ModelList(data=[ModelCard(id=cfg.model_name, created=started)])

    async def build_job(body: ChatCompletionRequest, principal) -> GenerationJob:
        if body.model != cfg.model_name:
            raise PolicyError(404, f"model {short(body.model)} does not exist; this server serves "
                                   f"{cfg.model_name!r}", param="model")
        if body.stream_options is not None and not body.stream:
            raise PolicyError(400, "stream_options is only allowed with stream: true", param="stream_options")
        system, text, urls = split_messages(body.messages, limits)
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise PolicyError(400, f"max_tokens={max_tokens} is above this server's limit of {limits.max_tokens}",
                              param="max_tokens")
        stops = stop_list(body.stop, limits)
        guard = resolve_safety(body.safety, principal, cfg.guard, reminder_loaded)
        image = await load_image(urls[0], image_policy, decodes) if urls else None
        temperature = cfg.default_temperature if body.temperature is None else body.temperature
        sampling = SamplingConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                                  top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)
        return GenerationJob(Prompt(text, image, system), sampling, guard, stops, limits.max_prompt_tokens)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
                                                  "description": "the completion, or SSE chunks with stream=true"}})
    async def chat(body: ChatCompletionRequest, request: Request):
        call = Call(body, request, metrics, generate, retry_on, limits.request_timeout_s, cfg.reminder_version)
        try:
            job = await asyncio.wait_for(build_job(body, call.principal), call.remaining())
            await call.admit(job)
            if not body.stream:
                return await call.complete()
        except asyncio.CancelledError:  # the client went away (Serve cancels the handler)
            call.finish(499, reason="client disconnected")
            raise
        except (PolicyError, ImageError, Busy) as err:
            headers = {"Retry-After": "1"} if isinstance(err, Busy) else None
            return call.refuse(err.status, str(err), getattr(err, "type", None), getattr(err, "param", None), headers)
        except TimeoutError:
            return call.refuse(504, f"the request exceeded its timeout of {limits.request_timeout_s} s")
        except Exception as err:  # noqa: BLE001 (a replica failure is a 500 with an audit record, not a crash)
            logger.exception("chat completion %s failed", call.request_id)
            return call.refuse(500, f"internal error: {type(err).__name__}")
        return StreamingResponse(call.sse(), media_type="text/event-stream")

    default_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI's schema, stating this server's facts: model name, max_tokens, bearer auth, no 422s."""
        if app.openapi_schema is None:
            schema = default_openapi()
            request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
            request["model"]["enum"] = [cfg.model_name]
            for name in ("max_tokens", "max_completion_tokens"):
                request[name]["anyOf"][0]["maximum"] = limits.max_tokens
            if cfg.api_keys:
                schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for route, path in schema["paths"].items():
                for operation in path.values():
                    operation["responses"].pop("422", None)
                    if cfg.api_keys and route.startswith("/v1/"):
                        operation["security"] = [{"apiKey": []}]
        return app.openapi_schema

    app.openapi = openapi
    return app


class Call:
    """One chat completion in flight: ids, deadline, the text released so far, metrics and its fields of
    the request's audit record (written by the recorder when the response is done).

    If a model replica is lost (`retry_on`) before any text reached the client (always true for a plain
    response, which is sent whole), the request is re-sent once; the client never sees the retry.
    """

    def __init__(self, body: ChatCompletionRequest, request: Request, metrics: ServeMetrics, generate: Generate,
                 retry_on: tuple[type[BaseException], ...], timeout_s: float, model_version: str | None = None):
        self.body, self.scope, self.principal, self.metrics = body, request.scope, request.state.principal, metrics
        self.model_version = model_version
        self.generate, self.retry_on = generate, retry_on
        self.t0 = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + timeout_s  # image fetch and decode count too
        self.request_id = request.state.record["request_id"]
        note(self.scope, model=body.model, stream=body.stream, model_version=model_version)
        self.base = dict(id=self.request_id, created=int(time.time()), model=body.model)
        self.prompt_tokens = 0
        self.parts: list[str] = []
        self.delivered = self.retried = self.finished = False
        metrics.in_flight.inc()

    def remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    async def _next(self):
        return await asyncio.wait_for(anext(self.items), self.remaining())

    async def _start(self) -> None:
        self.parts.clear()
        self.items = self.generate(self.job)
        admission: Admission = await self._next()
        if admission.error:
            raise PolicyError(400, admission.error, param="messages")
        self.prompt_tokens = admission.prompt_tokens

    def _may_retry(self, err: BaseException) -> bool:
        if self.delivered or self.retried:
            return False
        self.retried = True
        logger.warning("chat completion %s: model replica lost (%s), re-sending", self.request_id, err)
        return True

    async def admit(self, job: GenerationJob) -> None:
        self.job = job
        try:
            await self._start()
        except self.retry_on as err:
            if not self._may_retry(err):
                raise
            await self._start()

    async def chunks(self) -> AsyncIterator[Chunk]:
        while True:
            try:
                chunk: Chunk = await self._next()
            except self.retry_on as err:
                if not self._may_retry(err):
                    raise
                await self._start()
                continue
            self.parts.append(chunk.text)
            if chunk.finish_reason is not None and chunk.safety is not None:
                chunk.safety["model_version"] = self.model_version
            yield chunk
            if chunk.finish_reason is not None:
                return

    def finish(self, status: int, final: Chunk | None = None, reason: str | None = None) -> None:
        """Metrics and the audit fields, exactly once per call; `status` is the request's outcome."""
        if self.finished:
            return
        self.finished = True
        latency = time.perf_counter() - self.t0
        self.metrics.in_flight.dec()
        self.metrics.finished(status, self.body.stream, latency, self.prompt_tokens, final and final.safety,
                              final.completion_tokens if final else 0)
        text, safety = "".join(self.parts), (final.safety if final else None) or {}
        note(self.scope, outcome=status, reason=reason, guard=safety.get("enabled"),
             stream_mode=safety.get("stream_mode"), flagged=safety.get("flagged"), flagged_at=safety.get("flagged_at"),
             p_safe_at_flag=safety.get("p_safe_at_flag"), checks_run=safety.get("checks_run"),
             finish_reason=final.finish_reason if final else None, retried=self.retried,
             prompt_tokens=self.prompt_tokens, completion_tokens=final.completion_tokens if final else 0,
             emitted_sha256=sha256_hex(text), emitted_chars=len(text))

    def refuse(self, status: int, message: str, type_: str | None = None, param: str | None = None,
               headers: dict | None = None) -> Response:
        self.finish(status, reason=message)
        return error_response(status, message, type_, param, headers)

    def usage(self, final: Chunk) -> dict:
        n = final.completion_tokens
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=n, total_tokens=self.prompt_tokens + n)

    async def complete(self) -> Response:
        final = None
        async for final in self.chunks():
            pass
        self.finish(200, final)
        response = ChatCompletionResponse(
            **self.base, choices=[{"message": {"content": "".join(self.parts)}, "finish_reason": final.finish_reason}],
            usage=self.usage(final), safety=final.safety)
        return AsciiJSONResponse(response.model_dump())

    def event(self, **fields) -> str:
        return f"data: {ChatCompletionChunk(**self.base, **fields).model_dump_json(exclude_none=True)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """OpenAI SSE: a role chunk, content chunks, a finish chunk with `safety`, [usage], [DONE]."""
        status, final, reason = 499, None, "client disconnected"
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            yield self.event(choices=[{"delta": {"role": "assistant", "content": ""}}])
            async for final in self.chunks():
                if final.text and not self.delivered:  # from here on a replica loss cannot be retried
                    self.delivered = True
                    self.metrics.first_token.labels("true").observe(time.perf_counter() - self.t0)
                done = final.finish_reason is not None
                yield self.event(choices=[{"delta": {"content": final.text}, "finish_reason": final.finish_reason}],
                                 safety=final.safety if done else None)
            if include_usage:
                yield self.event(choices=[], usage=self.usage(final))
            yield "data: [DONE]\n\n"
            status, reason = 200, None
        except Exception as err:  # noqa: BLE001 (headers are sent: report in-band, as OpenAI servers do)
            status, reason = (504, "timeout") if isinstance(err, TimeoutError) else (500, type(err).__name__)
            if status == 500:
                logger.exception("chat completion %s failed mid-stream", self.request_id)
            error = {"message": f"generation failed: {reason}", "type": ERROR_TYPES[status]}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            self.finish(status, final if status == 200 else None, reason)
