"""The HTTP surface: an OpenAI-compatible FastAPI app over a `generate(job)` stream of the model replicas.

Routes: `POST /v1/chat/completions` (plain JSON or `stream: true` SSE), `GET /v1/models`, `/health`,
`/metrics`. Every `/v1/` request passes the gatekeeper first (API key, body size), then the request is
validated, turned into a `GenerationJob` (images decoded, safety options checked against policy) and
answered. Every chat request, refused or served, leaves one audit record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from sr_ray.models import Prompt
from sr_ray.reminder import SamplingConfig
from sr_ray.serve.config import Limits, ServeConfig
from sr_ray.serve.holdback import Chunk
from sr_ray.serve.images import ImageError, ImagePolicy, load_image
from sr_ray.serve.metrics import ServeMetrics
from sr_ray.serve.model import Admission, GenerationJob
from sr_ray.serve.policy import AuditLog, PolicyError, authenticate, resolve_safety, sha256_hex
from sr_ray.serve.protocol import (
    ERROR_RESPONSES, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, Health,
    ModelCard, ModelList, TextPart,
)

logger = logging.getLogger("sr_ray.serve")
Generate = Callable[[GenerationJob], AsyncIterator[Admission | Chunk]]
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               500: "server_error", 504: "timeout"}


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class Gatekeeper:
    """ASGI middleware for `/v1/`: authenticate, and refuse bodies above `max_body_bytes` (413).
    Refusals are reported to `on_refusal(status, path, reason)` (metrics and the audit log)."""

    def __init__(self, app, keys, max_body_bytes: int, on_refusal: Callable[[int, str, str], None]):
        self.app, self.keys, self.max_body_bytes, self.on_refusal = app, keys, max_body_bytes, on_refusal

    async def refuse(self, scope, receive, send, status: int, message: str, type_: str | None = None):
        self.on_refusal(status, scope["path"], message)
        await error_response(status, message, type_)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            principal = authenticate(headers.get("authorization"), self.keys)
        except PolicyError as err:
            return await self.refuse(scope, receive, send, err.status, err.message, err.type)
        scope.setdefault("state", {})["principal"] = principal
        too_large = f"request body above the limit of {self.max_body_bytes} bytes"
        if not headers.get("content-length", "0").isdigit():
            return await self.refuse(scope, receive, send, 400, "invalid Content-Length header")
        if int(headers.get("content-length", "0")) > self.max_body_bytes:
            return await self.refuse(scope, receive, send, 413, too_large)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self.refuse(scope, receive, send, 413, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


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


def create_api(cfg: ServeConfig, generate: Generate, retry_on: tuple[type[BaseException], ...] = ()) -> FastAPI:
    app = FastAPI(title="sr_ray guarded VLM", version="0.1.0",
                  description="OpenAI-compatible chat completions guarded by SafetyReminder (see docs/api.md)")
    metrics, audit = ServeMetrics(), AuditLog(cfg.audit_log)
    limits = cfg.limits
    image_policy = ImagePolicy(limits.max_image_bytes, limits.max_image_pixels, limits.max_image_side,
                               cfg.images.allow_remote, tuple(h.lower() for h in cfg.images.allowed_hosts),
                               cfg.images.timeout_s)
    reminder_loaded, started = bool(cfg.bundle or cfg.probe), int(time.time())

    def gate_refused(status: int, path: str, reason: str) -> None:
        metrics.requests.labels(str(status), "unknown").inc()
        audit.write(dict(request_id=f"gate-{uuid.uuid4().hex}", key_id=None, path=path, status=status, reason=reason))

    app.add_middleware(Gatekeeper, keys=cfg.api_keys, max_body_bytes=limits.max_body_bytes, on_refusal=gate_refused)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        return error_response(400, f"{where + ': ' if where else ''}{err.get('msg')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):  # unparsable body, unknown route, 405...
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

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
            raise PolicyError(404, f"model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                              param="model")
        system, text, urls = split_messages(body.messages, limits)
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise PolicyError(400, f"max_tokens={max_tokens} is above this server's limit of {limits.max_tokens}",
                              param="max_tokens")
        stops = stop_list(body.stop, limits)
        guard = resolve_safety(body.safety, principal, cfg.guard, reminder_loaded)
        image = await load_image(urls[0], image_policy) if urls else None
        temperature = cfg.default_temperature if body.temperature is None else body.temperature
        sampling = SamplingConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                                  top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)
        return GenerationJob(Prompt(text, image, system), sampling, guard, stops, limits.max_prompt_tokens)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                                  "description": "the completion, or SSE chunks with stream=true"}})
    async def chat(body: ChatCompletionRequest, request: Request):
        call = Call(body, request.state.principal, metrics, audit, generate, retry_on, limits.request_timeout_s)
        try:
            await call.admit(await build_job(body, call.principal))
            if not body.stream:
                return await call.complete()
        except asyncio.CancelledError:  # the client went away (Serve cancels the handler)
            call.finish(499, reason="client disconnected")
            raise
        except (PolicyError, ImageError) as err:
            return call.refuse(err.status, str(err), getattr(err, "type", None), getattr(err, "param", None))
        except TimeoutError:
            return call.refuse(504, "generation exceeded the request timeout")
        except Exception as err:  # noqa: BLE001 (a replica failure is a 500 with an audit record, not a crash)
            logger.exception("chat completion %s failed", call.request_id)
            return call.refuse(500, f"internal error: {type(err).__name__}")
        return StreamingResponse(call.sse(), media_type="text/event-stream", headers=call.headers)

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
    """One chat completion in flight: ids, deadline, the text released so far, metrics and the audit record.

    If a model replica is lost (`retry_on`) before any text reached the client (always true for a plain
    response, which is sent whole), the request is re-sent once; the client never sees the retry.
    """

    def __init__(self, body: ChatCompletionRequest, principal, metrics: ServeMetrics, audit: AuditLog,
                 generate: Generate, retry_on: tuple[type[BaseException], ...], timeout_s: float):
        self.body, self.principal, self.metrics, self.audit = body, principal, metrics, audit
        self.generate, self.retry_on, self.timeout_s = generate, retry_on, timeout_s
        self.t0 = time.perf_counter()
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.headers = {"x-request-id": self.request_id}
        self.base = dict(id=self.request_id, created=int(time.time()), model=body.model)
        self.prompt_tokens = 0
        self.parts: list[str] = []
        self.delivered = self.retried = self.finished = False
        metrics.in_flight.inc()

    async def _next(self):
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(anext(self.items), max(0.0, self.deadline - loop.time()))

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
        self.job, self.deadline = job, asyncio.get_running_loop().time() + self.timeout_s
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
            yield chunk
            if chunk.finish_reason is not None:
                return

    def finish(self, status: int, final: Chunk | None = None, reason: str | None = None) -> None:
        """Metrics + audit record, exactly once per call."""
        if self.finished:
            return
        self.finished = True
        latency = time.perf_counter() - self.t0
        self.metrics.in_flight.dec()
        self.metrics.finished(status, self.body.stream, latency, self.prompt_tokens, final and final.safety,
                              final.completion_tokens if final else 0)
        text, safety = "".join(self.parts), (final.safety if final else None) or {}
        self.audit.write(dict(
            request_id=self.request_id, key_id=self.principal.key_id, model=self.body.model, stream=self.body.stream,
            status=status, reason=reason, latency_s=round(latency, 4), guard=safety.get("enabled"),
            stream_mode=safety.get("stream_mode"), flagged=safety.get("flagged"), flagged_at=safety.get("flagged_at"),
            p_safe_at_flag=safety.get("p_safe_at_flag"), checks_run=safety.get("checks_run"),
            finish_reason=final.finish_reason if final else None, retried=self.retried,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=final.completion_tokens if final else 0,
            emitted_sha256=sha256_hex(text), emitted_chars=len(text)))

    def refuse(self, status: int, message: str, type_: str | None = None, param: str | None = None) -> JSONResponse:
        self.finish(status, reason=message)
        return error_response(status, message, type_, param)

    def usage(self, final: Chunk) -> dict:
        n = final.completion_tokens
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=n, total_tokens=self.prompt_tokens + n)

    async def complete(self) -> JSONResponse:
        final = None
        async for final in self.chunks():
            pass
        self.finish(200, final)
        response = ChatCompletionResponse(
            **self.base, choices=[{"message": {"content": "".join(self.parts)}, "finish_reason": final.finish_reason}],
            usage=self.usage(final), safety=final.safety)
        return JSONResponse(response.model_dump(), headers=self.headers)

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
