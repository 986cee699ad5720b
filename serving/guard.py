"""Admission control and error shaping around the service, below BentoML's own middleware.

:class:`RequestGuard` (ASGI middleware on every request):

* **Overload → 503 + Retry-After, decided before the body is read.** Requests are counted in
  two stages: *receiving* (the body is still arriving: cheap, a socket and a buffer) and
  *working* (parsing, decoding, inference). A request is refused when working is full on arrival
  or once its body is in, so slow uploaders never hold the slots that do work (BentoML's
  ``max_concurrency`` counts both and answers 429, slowly).
* **Budgets:** the body must be at most ``max_bytes`` (413) and arrive within
  ``body_timeout_s`` (408, connection closed); the answer must start within ``timeout_s`` of
  the body's arrival, else 503 + Retry-After (BentoML's own timeout, which answers 504, is set
  beyond it as a backstop).
* **Every 4xx/503 is JSON ``{"error": "..."}``:** Starlette's plain-text 404/405, BentoML's
  ``[{"error": ...}]`` (bentoml#4232) and its ``{"error", "detail": [...]}`` validation bodies
  are rewritten; every 503 gets ``Retry-After``.

Two process-wide patches, installed by :func:`install` (both are no-ops until a server runs):

* :class:`BoundedPathMetrics`: BentoML labels its request metrics with the raw path, so every
  distinct 404 path adds ~20 series to ``/metrics`` (BentoML 1.4 has no setting for this);
  unknown paths now share the label ``/unknown``.
* :class:`HeaderDeadlineProtocol`: uvicorn's h11 protocol with a deadline for the request
  headers (uvicorn has none: a client sending one header byte a minute holds a connection forever).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.forms import close_uploads
from serving.settings import Settings

RETRY_AFTER_S = 1
ORIGINAL_PATH = "serving.original_path"
# The guard of this process (one app per worker), for HeaderDeadlineProtocol's early refusals.
_ACTIVE: RequestGuard | None = None


class _Disconnected(Exception):
    pass


class _TooLarge(Exception):
    pass


def json_response_messages(status: int, error: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> list[dict]:
    body = json.dumps({"error": error}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if status == 503:
        head.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    return [{"type": "http.response.start", "status": status, "headers": head},
            {"type": "http.response.body", "body": body, "more_body": False}]


async def send_error(send, status: int, error: str, close: bool = False) -> None:
    for message in json_response_messages(status, error, [(b"connection", b"close")] if close else []):
        await send(message)


class RequestGuard:
    """ASGI middleware: see the module docstring.

    Args:
        app: the inner ASGI app.
        settings: limits (per-replica ones are split over ``settings.workers``).
        api_paths: the POST routes that do work (admission control applies to them only).
        allow: the methods of paths served by more than one route (``/metadata``: GET and POST),
            for the ``Allow`` header of a 405, which Starlette fills from the first route alone.
    """

    def __init__(self, app, settings: Settings, api_paths: Iterable[str], allow: dict[str, str] | None = None) -> None:
        self.app, self.settings, self.api_paths = app, settings, frozenset(api_paths)
        self.allow = allow or {}
        self.max_working = settings.per_worker(settings.max_concurrency)
        self.max_receiving = settings.per_worker(settings.max_uploads)
        self.working = 0
        self.receiving = 0
        global _ACTIVE
        _ACTIVE = self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _ErrorShaper(send, scope, self.allow.get(scope["path"]))
        try:
            if scope["method"] == "POST" and scope["path"] in self.api_paths:
                await self._admit(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            close_uploads(scope)

    def overloaded(self) -> str | None:
        if self.working >= self.max_working:
            return f"overloaded: {self.working} requests in progress in this worker; retry after {RETRY_AFTER_S} s"
        if self.receiving >= self.max_receiving:
            return f"overloaded: {self.receiving} uploads in progress in this worker; retry after {RETRY_AFTER_S} s"
        return None

    async def _admit(self, scope, receive, send) -> None:
        limit = self.settings.max_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await send_error(send, 413, f"body: {int(length)} bytes, over the limit of {limit} "
                                                "(SERVING_MAX_BYTES)")
        if reason := self.overloaded():
            return await send_error(send, 503, reason)
        self.receiving += 1
        try:
            body = await asyncio.wait_for(self._read_body(receive, limit), self.settings.body_timeout_s)
        except asyncio.TimeoutError:
            return await send_error(send, 408, f"body: not received within {self.settings.body_timeout_s} s "
                                                "(SERVING_BODY_TIMEOUT)", close=True)
        except _TooLarge:
            return await send_error(send, 413, f"body: over the limit of {limit} bytes (SERVING_MAX_BYTES)",
                                    close=True)
        except _Disconnected:
            return None
        finally:
            self.receiving -= 1
        if reason := self.overloaded():
            return await send_error(send, 503, reason)
        self.working += 1
        try:
            await self._run(scope, _replay(body, receive), send)
        finally:
            self.working -= 1

    @staticmethod
    async def _read_body(receive, limit: int) -> bytes:
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:  # chunked uploads declare no length
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope, receive, send) -> None:
        """The inner app, with a deadline for the answer to start (503 + Retry-After past it)."""
        started = asyncio.Event()

        async def tracked_send(message) -> None:
            started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=self.settings.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done() and not started.is_set():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return await send_error(send, 503, f"overloaded: no answer within {self.settings.timeout_s} s "
                                               f"(SERVING_TIMEOUT); retry after {RETRY_AFTER_S} s")
        await task


def _replay(body: bytes, receive):
    """A ``receive`` that hands over the buffered body once, then waits on the real one (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _ErrorShaper:
    """Wraps ``send``: every 4xx and 5xx answer becomes ``{"error": "..."}`` JSON; 503s get Retry-After."""

    def __init__(self, send, scope, allow: str | None = None) -> None:
        self.send, self.scope, self.allow = send, scope, allow
        self.start: dict | None = None
        self.body = b""

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start, self.body = message, b""
            return None
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.body += message.get("body", b"")
        if message.get("more_body", False):
            return None
        start, self.start = self.start, None
        status = start["status"]
        error = self._message(status, start)
        drop = (b"content-length", b"content-type", b"retry-after", *((b"allow",) if self.allow else ()))
        keep = [(k, v) for k, v in start["headers"] if k.lower() not in drop]
        if status == 405 and self.allow:
            keep.append((b"allow", self.allow.encode()))
        for out in json_response_messages(status, error, keep):
            await self.send(out)

    def _message(self, status: int, start: dict) -> str:
        try:
            parsed: Any = json.loads(self.body)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and len(parsed) == 1:
            parsed = parsed[0]
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(parsed, dict) and isinstance(parsed.get("detail"), list):  # BentoML's ValidationError body
            parts = [f"{'.'.join(map(str, d.get('loc', ()))) or 'body'}: {d.get('msg', '')}"
                     for d in parsed["detail"] if isinstance(d, dict)]
            error = "; ".join(parts) or error
        path, method = self.scope.get("path", ""), self.scope.get("method", "")
        if status == 503 and (not isinstance(error, str) or "overloaded" not in error):
            # BentoML words every 5xx as "An unexpected error has occurred": here only its batch
            # queue answers 503 (a request waited past SERVING_MAX_LATENCY_MS), which is overload
            return f"overloaded: the service is busy (SERVING_MAX_LATENCY_MS); retry after {RETRY_AFTER_S} s"
        if isinstance(error, str) and error:
            return error
        if status == 404:
            return f"path: no such endpoint: {method} {path}"
        if status == 405:
            allow = self.allow or dict(start["headers"]).get(b"allow", b"").decode()
            return f"method: {method} not allowed on {path}" + (f"; allowed: {allow}" if allow else "")
        text = self.body.decode("utf-8", "replace").strip()[:200]
        return text or HTTPStatus(status).phrase


# ----------------------------------------------------------------------------- /metrics cardinality
def install_metric_path_labels(label: Callable[[str], str]) -> None:
    """Make BentoML's request metrics label each request with ``label(path)``, not the raw path."""
    from bentoml._internal.server.http import instruments

    original = instruments.RunnerTrafficMetricsMiddleware
    if getattr(original, "bounded_paths", False):
        return

    class BoundedPathMetrics(original):  # type: ignore[misc, valid-type]
        bounded_paths = True

        def __init__(self, app, *args, **kwargs) -> None:
            super().__init__(_restore_path(app), *args, **kwargs)

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] in ("http", "websocket"):
                named = label(scope["path"])
                if named != scope["path"]:
                    scope = {**scope, "path": named, ORIGINAL_PATH: scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedPathMetrics


def _restore_path(app):
    async def restored(scope, receive, send) -> None:
        if ORIGINAL_PATH in scope:
            scope = {k: v for k, v in scope.items() if k != ORIGINAL_PATH} | {"path": scope[ORIGINAL_PATH]}
        await app(scope, receive, send)

    return restored


def path_labeller(exact: Iterable[str], prefixes: Iterable[str]) -> Callable[[str], str]:
    """``path`` → itself for known routes, its prefix for static folders, else ``/unknown``."""
    known, folders = frozenset(exact), tuple(prefixes)

    def label(path: str) -> str:
        if path in known:
            return path
        for prefix in folders:
            if path.startswith(prefix):
                return prefix.rstrip("/")
        return "/unknown"

    return label


# ----------------------------------------------------------------------------- header deadline
class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers take longer than
    ``header_timeout_s`` to arrive (timed from the connection or from the previous answer),
    and refusing API requests while this worker's guard is full *before* BentoML's middleware
    (tracing, metrics, access log, routing: about a millisecond of Python per request, which
    under hundreds of clients is what made a refusal take a second)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.app = _shed_early(self.app)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (headers over 16 KiB, a bad request
        line), as JSON like every other error; uvicorn's own is plain text."""
        body = json.dumps({"error": f"request: not valid HTTP/1.1 ({msg.rstrip('.')})"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 cannot answer in its state: send the bytes ourselves
            head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    f"content-length: {len(body)}\r\n\r\n").encode()
            self.transport.write(head + body)
        self.transport.close()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            body = json.dumps({"error": f"headers: not received within {self.header_timeout_s:g} s "
                                        "(SERVING_HEADER_TIMEOUT)"}).encode()
            head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
            self.transport.write(head + body)
            self.transport.close()


def _shed_early(app):
    async def early(scope, receive, send) -> None:
        guard = _ACTIVE
        if (guard is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] in guard.api_paths):
            reason = guard.overloaded()
            if reason is not None:
                SHED.inc()
                for message in json_response_messages(503, reason):
                    await send(message)
                return None
        await app(scope, receive, send)

    return early


def _shed_counter():
    import prometheus_client

    return prometheus_client.Counter(
        "classifier_shed_requests", "API requests refused with 503 before BentoML's middleware (overload)")


SHED = _shed_counter()


def install_lighter_tracing() -> None:
    """BentoML's OpenTelemetry middleware without its per-message ``receive``/``send`` spans.

    BentoML keeps tracing's sample rate at 0 unless configured, yet the middleware still builds
    five spans per request (measured: about a sixth of the service's CPU per LeNet-5 request);
    the request span, which gives BentoML its request ids, stays.
    """
    from opentelemetry.instrumentation import asgi

    original = asgi.OpenTelemetryMiddleware
    if getattr(original, "lighter", False):
        return

    class LighterTracing(original):  # type: ignore[misc, valid-type]
        lighter = True

        def __init__(self, app, *args, **kwargs) -> None:
            kwargs.setdefault("exclude_spans", ["receive", "send"])
            super().__init__(app, *args, **kwargs)

    asgi.OpenTelemetryMiddleware = LighterTracing


def install(settings: Settings, label: Callable[[str], str]) -> None:
    """The process-wide patches: bounded metric labels, lighter tracing, the header deadline in uvicorn."""
    import uvicorn.config

    install_metric_path_labels(label)
    install_lighter_tracing()
    HeaderDeadlineProtocol.header_timeout_s = float(settings.header_timeout_s)
    for name in ("auto", "h11"):  # BentoML's worker builds uvicorn.Config with the default, "auto"
        uvicorn.config.HTTP_PROTOCOLS[name] = "serving.guard:HeaderDeadlineProtocol"
