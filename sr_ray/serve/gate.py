"""The ASGI layers every request passes before a route: the recorder, then the gatekeeper for `/v1/`.

- `Recorder` (outermost): gives the request its id, makes sure the response carries exactly one
  `x-request-id`, and when the response is done writes exactly one audit record and one
  `sr_ray_requests_total` count, whatever answered: a route, the gatekeeper, a validation error, an
  unknown route, a crash. Routes add their fields to `scope["state"]["record"]`.
- `Gatekeeper` (`/v1/` only): API key (401), body size (413), and the replica's in-flight body budget
  (503 with Retry-After when other bodies hold it for longer than `busy_wait_s`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.responses import JSONResponse

from sr_ray.serve.audit import AuditLog
from sr_ray.serve.budget import Busy, ByteBudget
from sr_ray.serve.metrics import ServeMetrics
from sr_ray.serve.policy import PolicyError, authenticate

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               500: "server_error", 503: "server_busy", 504: "timeout"}
UNRECORDED = ("/health", "/metrics")  # probes and scrapes: counted by their callers, not audited
ROUTES = {"/v1/chat/completions": "chat", "/v1/models": "models", "/openapi.json": "openapi"}
CHAT = "/v1/chat/completions"


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting a lone surrogate cannot fail to encode (a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}
    return AsciiJSONResponse(body, status_code=status, headers=headers)


def note(scope, **fields) -> None:
    """Add fields to this request's audit record (a no-op outside the recorder, e.g. unrecorded paths)."""
    record = scope.get("state", {}).get("record")
    if record is not None:
        record.update(fields)


def route_path(scope) -> str:
    return scope.get("path", "").removeprefix(scope.get("root_path", ""))


class Recorder:
    def __init__(self, app, metrics: ServeMetrics, audit: AuditLog, proxy_sets_request_id: bool):
        self.app, self.metrics, self.audit = app, metrics, audit
        self.proxy_sets_request_id = proxy_sets_request_id  # Serve's proxy adds its own x-request-id header

    async def __call__(self, scope, receive, send):
        path = route_path(scope)
        if scope["type"] != "http" or path in UNRECORDED:
            return await self.app(scope, receive, send)
        request_id = ("chatcmpl-" if path == CHAT else "req-") + uuid.uuid4().hex
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = dict(request_id=request_id, method=scope.get("method"), path=path, key_id=None, reason=None,
                      x_request_id=headers.get("x-request-id"), client=(scope.get("client") or ("?",))[0])
        scope.setdefault("state", {})["record"] = record
        status, t0 = None, time.perf_counter()

        async def send_recorded(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                if not self.proxy_sets_request_id:
                    kept.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": kept}
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            # a stream's outcome (499, an in-band 500/504) is the route's to say; HTTP's status otherwise
            final = record.pop("outcome", None) or status or 499
            record.update(status=final, latency_s=round(time.perf_counter() - t0, 4))
            self.metrics.requests.labels(str(final), str(record.get("stream", "false")).lower(),
                                         ROUTES.get(path, "other")).inc()
            if not self.audit.write(record):
                self.metrics.audit_failures.inc()


class Gatekeeper:
    def __init__(self, app, keys, max_body_bytes: int, bodies: ByteBudget):
        self.app, self.keys, self.max_body_bytes, self.bodies = app, keys, max_body_bytes, bodies

    async def refuse(self, scope, receive, send, status: int, message: str, type_: str | None = None,
                     headers: dict | None = None):
        note(scope, reason=message)
        await error_response(status, message, type_, headers=headers)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not route_path(scope).startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            principal = authenticate(headers.get("authorization"), self.keys)
        except PolicyError as err:
            return await self.refuse(scope, receive, send, err.status, err.message, err.type)
        scope.setdefault("state", {})["principal"] = principal
        note(scope, key_id=principal.key_id)
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return await self.refuse(scope, receive, send, 400, "invalid Content-Length header")
        if int(length) > self.max_body_bytes:
            return await self.refuse(scope, receive, send, 413, self.too_large())
        held = 0
        try:
            try:
                await self.bodies.take(int(length))
                held, body = int(length), bytearray()
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return note(scope, reason="client disconnected")
                    body += message.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        return await self.refuse(scope, receive, send, 413, self.too_large())
                    if len(body) > held:  # no or a wrong Content-Length: reserve as the bytes arrive
                        self.bodies.take_now(len(body) - held)
                        held = len(body)
                    if not message.get("more_body", False):
                        break
            except Busy as err:
                return await self.refuse(scope, receive, send, 503, err.message, "server_busy", {"Retry-After": "1"})
            body = bytes(body)  # drops the bytearray: one copy of the body while the route runs
            await self.app(scope, replay(receive, body), send)
        finally:
            if held:
                await self.bodies.give(held)

    def too_large(self) -> str:
        return f"request body above the limit of {self.max_body_bytes} bytes"


def replay(receive, body: bytes):
    """`receive` that hands the app the body already read, then defers to the client's stream."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
