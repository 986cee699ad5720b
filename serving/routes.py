"""The HTTP face of the APIs: API paths parsed (:mod:`serving.forms`), admitted within bounds, answered.

BentoML's own routes for the typed APIs would parse requests with its serdes (which fetch a URL
sent where a file belongs, and answer 500 to unknown fields); this ASGI middleware, added with
``Classifier.add_asgi_middleware``, answers the API paths itself, so those routes only serve
in-process callers. Every other path passes through (health probes, /metrics, the pages).

Admission: at most ``SERVING_MAX_CONCURRENCY`` / workers requests in progress per worker; one
more is answered 503 + Retry-After at once, logged as one WARNING line; an answer not ready
within ``SERVING_TIMEOUT`` seconds is 503 too. Protocol limits (slow clients, connection counts,
framing) are the HTTP front's (README, "Serving").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import bentoml
from bentoml.exceptions import BentoMLException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving import forms, monitoring
from serving.errors import RETRY_AFTER_S
from serving.schemas import FeedbackFields, NoFields, PredictFields, SaliencyFields
from serving.settings import Settings

log = logging.getLogger(__name__)
API_PATHS = ("/predict", "/predict_batch", "/saliency", "/feedback", "/metadata")
# Metric labels: these paths as themselves, the two static folders by their prefix, anything else /unknown.
LABELLED_PATHS = (*API_PATHS, "/", "/ui", "/docs", "/docs.json", "/docs-init.js", "/schema.json", "/livez",
                  "/healthz", "/readyz", "/metrics", "/monitoring")
FOLDERS = ("/static_content/", "/ui/")
FORMS = {
    "/predict": forms.Form({"image": False}, PredictFields),
    "/predict_batch": forms.Form({"images": True}, PredictFields),
    "/saliency": forms.Form({"image": False}, SaliencyFields),
    "/feedback": forms.Form({"image": False}, FeedbackFields),
    "/metadata": forms.Form({}, NoFields),
}
METHODS = {"/metadata": ("GET", "POST")}


def error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == HTTPStatus.SERVICE_UNAVAILABLE else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def call_api(path: str, request: Request, settings: Settings) -> Response:
    """Parse the request for ``path`` and call the running service's method for it."""
    service = bentoml.get_current_service()
    if request.method == "GET":
        return JSONResponse(service.info.model_dump())
    parsed = await forms.parse(request, FORMS[path], settings)
    values = parsed.values.model_dump()
    if path == "/predict":
        answer = await service.classify(parsed.files["image"], **values)
    elif path == "/predict_batch":
        answer = await service.classify_all(parsed.files["images"], **values)
    elif path == "/saliency":
        return await service.explain(parsed.files["image"], **values)
    elif path == "/feedback":
        answer = await monitoring.store_feedback(service.monitor, parsed.files["image"], values["label"], settings,
                                                 service.decoders)
    else:
        answer = service.info
    # pydantic's own encoder (in Rust): the fields JSONResponse(answer.model_dump()) would give, without the dict
    return Response(answer.model_dump_json(), media_type="application/json")


class ApiRoutes:
    """ASGI middleware: the API paths answered here (see the module docstring), the rest passed on."""

    def __init__(self, app, settings: Settings,
                 handler: Callable[[str, Request, Settings], Awaitable[Response]] = call_api) -> None:
        self.app, self.settings, self.handler = app, settings, handler
        self.max_working = settings.per_worker(settings.max_concurrency)
        self.working = 0

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in FORMS:
            return await self.app(scope, receive, send)
        allowed = METHODS.get(path, ("POST",))
        if scope["method"] not in allowed:
            response = error(HTTPStatus.METHOD_NOT_ALLOWED, f"method: {scope['method']} not allowed on {path}; "
                                                            f"allowed: {', '.join(allowed)}")
            response.headers["Allow"] = ", ".join(allowed)
        else:
            response = await self._admitted(path, Request(scope, receive))
        await response(scope, receive, send)

    async def _admitted(self, path: str, request: Request) -> Response:
        if self.working >= self.max_working:
            message = (f"overloaded: {self.working} requests in progress in this worker "
                       f"(SERVING_MAX_CONCURRENCY); retry after {RETRY_AFTER_S} s")
            log.warning("%s %s: 503 %s", request.method, path, message)
            return error(HTTPStatus.SERVICE_UNAVAILABLE, message)
        self.working += 1
        try:
            return await asyncio.wait_for(self.handler(path, request, self.settings), self.settings.timeout_s)
        except TimeoutError:
            message = f"overloaded: no answer within {self.settings.timeout_s} s (SERVING_TIMEOUT); retry after " \
                      f"{RETRY_AFTER_S} s"
            log.warning("%s %s: 503 %s", request.method, path, message)
            return error(HTTPStatus.SERVICE_UNAVAILABLE, message)
        except BentoMLException as err:  # serving.errors.ApiError and BentoML's InvalidArgument: a refusal
            status = int(err.error_code)
            message = " ".join(str(err).split())
            log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s: %d %s", request.method, path,
                    status, message[:300])
            return error(status, message)
        finally:
            self.working -= 1
