"""Every answer's error shape: ``{"error": "..."}`` JSON naming the field, and nosniff on everything.

:class:`ApiError` (and its kinds) carry the HTTP status of a refusal; the HTTP layer
(:mod:`serving.routes`) turns them into JSON, and in-process callers see the same exceptions.
:class:`ErrorBodies` is ASGI middleware for the answers that do not come from our routes
(BentoML's and Starlette's 404/405, the health probes): their bodies become the same JSON, every
503 gets ``Retry-After``, and every response carries ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BentoMLException

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
NOSNIFF = (b"x-content-type-options", b"nosniff")


class ApiError(BentoMLException):
    """A refusal with an HTTP status (``error_code``); the message starts with the field's name."""

    error_code = HTTPStatus.BAD_REQUEST


class FieldError(ApiError):
    """A request field outside the contract (400)."""


class PayloadTooLarge(ApiError):
    """A body, a file or a batch over its limit (413)."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ImageRejected(ApiError):
    """An upload that is not a usable image; the status depends on why (see serving.uploads.REASON_STATUS)."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class Overloaded(ApiError):
    """Too much work in progress or queued too long (503 + Retry-After)."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


def error_messages(status: int, error: str) -> list[dict]:
    """The ASGI messages of a JSON error answer (503s with Retry-After)."""
    body = json.dumps({"error": error}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        head.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    return [{"type": "http.response.start", "status": status, "headers": head},
            {"type": "http.response.body", "body": body, "more_body": False}]


class ErrorBodies:
    """ASGI middleware: nosniff on every answer; every 4xx/5xx body as ``{"error": "..."}``.

    Args:
        app: the inner ASGI app.
        allow: the methods of paths served by more than one route (``/metadata``: GET, POST),
            for the ``Allow`` header of a 405.
    """

    def __init__(self, app, allow: dict[str, str] | None = None) -> None:
        self.app, self.allow = app, allow or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        body = b""
        started = False

        async def shaped(message) -> None:
            nonlocal start, body, started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != NOSNIFF[0]]
                message = {**message, "headers": [*headers, NOSNIFF]}
                if message["status"] >= 400:
                    start = message
                    return None
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body += message.get("body", b"")
            if message.get("more_body", False):
                return None
            await self._send_error(send, scope, start, body)

        try:
            await self.app(scope, receive, shaped)
        except Exception:  # a bug: logged with its traceback, answered as JSON like every other error
            log.exception("%s %s: unhandled error", scope.get("method"), scope.get("path"))
            if not started:
                first, last = error_messages(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the server log")
                await send({**first, "headers": [*first["headers"], NOSNIFF]})
                await send(last)

    async def _send_error(self, send, scope, start: dict, body: bytes) -> None:
        status = start["status"]
        error = describe(status, body, scope, self.allow.get(scope["path"]) or
                         dict(start["headers"]).get(b"allow", b"").decode())
        allow = self.allow.get(scope["path"]) if status == HTTPStatus.METHOD_NOT_ALLOWED else None
        drop = {b"content-length", b"content-type", b"retry-after", *((b"allow",) if allow else ())}
        keep = [(k, v) for k, v in start["headers"] if k.lower() not in drop]
        if allow:  # Starlette fills Allow from the first route alone
            keep.append((b"allow", allow.encode()))
        first, last = error_messages(status, error)
        await send({**first, "headers": [*first["headers"], *keep]})
        await send(last)


def describe(status: int, body: bytes, scope: dict, allow: str = "") -> str:
    """The one-line message of an error answer: its own ``error`` if it has one, else one from the status."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:  # BentoML's [{"error": ...}] (bentoml#4232)
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    path, method = scope.get("path", ""), scope.get("method", "")
    if isinstance(error, str) and error:
        return error
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        return f"overloaded: the service is busy; retry after {RETRY_AFTER_S} s"
    if status == HTTPStatus.NOT_FOUND:
        return f"path: no such endpoint: {method} {path}"
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        return f"method: {method} not allowed on {path}" + (f"; allowed: {allow}" if allow else "")
    text = body.decode("utf-8", "replace").strip()[:200]
    return text or HTTPStatus(status).phrase
