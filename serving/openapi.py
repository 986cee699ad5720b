"""The API description (``/docs.json``) and its docs page (``/docs``), written from the service's own types.

The spec is built here from the pydantic answer shapes (:mod:`serving.schemas`) and the
settings, not derived from BentoML's generated one: it declares what the HTTP layer really does
(every error is ``{"error": "..."}``, the 503's Retry-After, ``/saliency``'s PNG and JSON answers,
``target`` as an index or a class name, the batch's count limit, ``GET /metadata``); a test runs
schemathesis against it. The page is Swagger UI from BentoML's bundled files with nothing loaded
from elsewhere (and a CSP that forbids it).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from serving.schemas import BatchPredictions, FeedbackStored, Metadata, Predictions, SaliencyMap
from serving.settings import Settings

REF = "#/components/schemas/{model}"
ERROR_REF = {"$ref": REF.format(model="Error")}
ERROR_SCHEMA = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong, starting with the field's name"}},
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer", "minimum": 0}}}
STATUSES = {
    "400": "a field missing, unknown, repeated or invalid; text where a file belongs; a body that is not a form",
    "413": "body over SERVING_MAX_BYTES, image or batch over SERVING_MAX_PIXELS / SERVING_MAX_BATCH_PIXELS decoded "
           "pixels, more than SERVING_MAX_FILES images",
    "415": "not an image in an accepted format (JPEG, PNG, GIF, BMP, WebP, TIFF)",
    "422": "an image its decoder cannot read (truncated, corrupt), 0 pixels, a side under SERVING_MIN_SIDE, or a "
           "JPEG of more than SERVING_MAX_JPEG_SCANS scans",
    "503": "overloaded: too many requests in progress or queued too long; retry after Retry-After seconds",
}
IMAGE_ERRORS = ("400", "413", "415", "422", "503")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'")
TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _errors(statuses: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        out[status] = {"description": STATUSES[status], "content": {"application/json": {"schema": ERROR_REF}}}
        if status == "503":
            out[status]["headers"] = RETRY_AFTER
    return out


def _json(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=model)}}}


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def _operation(name: str, summary: str, body: dict | None, ok: dict[str, Any], errors: tuple[str, ...]
               ) -> dict[str, Any]:
    operation = {"operationId": name, "summary": summary, "tags": ["Service APIs"],
                 "responses": {"200": {"description": "the answer", "content": ok}, **_errors(errors)}}
    if body is not None:
        operation["requestBody"] = body
    return operation


def contract_spec(classes: list[str], settings: Settings, version: str) -> dict[str, Any]:
    """The OpenAPI 3.0 description of the service's HTTP contract."""
    models = (Predictions, BatchPredictions, SaliencyMap, Metadata, FeedbackStored)
    _, defs = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
    image = {"type": "string", "format": "binary", "minLength": 1, "description": "the image file"}
    k = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5, "description": "how many classes"}
    target = {"nullable": True, "default": None,
              "description": "the class to explain: an index or a class name (default: the predicted class)",
              "anyOf": [{"type": "integer", "minimum": 0, "maximum": max(0, len(classes) - 1)},
                        {"type": "string", "enum": list(classes) or ["?"]}]}
    saliency_form = {"image": image, "target": target,
                     "method": {"type": "string", "enum": ["gradient", "guided", "gradcam", "guided_gradcam"],
                                "default": "guided"},
                     "format": {"type": "string", "enum": ["png", "json"], "default": "png"}}
    batch = {"type": "array", "items": image, "minItems": 1, "maxItems": settings.max_files}
    label = {"type": "string", "enum": list(classes) or ["?"], "description": "the right class of the image"}
    metadata = _operation("metadata", "what is being served", None, _json("Metadata"), ())
    probe = {"get": {"summary": "health probe", "tags": ["Infrastructure"],
                     "responses": {"200": {"description": "ok", "content": TEXT}}}}
    return {
        "openapi": "3.0.2",
        "info": {"title": "cnn-mlops image classifier", "version": version or "0",
                 "description": "Image classification and saliency maps. Every error answer is "
                                "`{\"error\": \"...\"}` naming the field; the only 5xx is 503 (overload) "
                                "with Retry-After."},
        "paths": {
            "/predict": {"post": _operation("predict", "top-k classes of one image",
                                            _form({"image": image, "k": k}, ["image"]), _json("Predictions"),
                                            IMAGE_ERRORS)},
            "/predict_batch": {"post": _operation("predict_batch", "top-k classes of each image",
                                                  _form({"images": batch, "k": k}, ["images"]),
                                                  _json("BatchPredictions"), IMAGE_ERRORS)},
            "/saliency": {"post": _operation(
                "saliency", "where the model looks", _form(saliency_form, ["image"]),
                {"image/png": {"schema": {"type": "string", "format": "binary"}}, **_json("SaliencyMap")},
                IMAGE_ERRORS)},
            "/feedback": {"post": _operation("feedback", "this image is of class `label`: stored for review",
                                             _form({"image": image, "label": label}, ["image", "label"]),
                                             _json("FeedbackStored"), IMAGE_ERRORS)},
            "/monitoring": {"get": {"summary": "predicted classes since start, the reference's, the last drift "
                                               "verdict (the web UI's panel)", "tags": ["Infrastructure"],
                                    "responses": {"200": {"description": "ok", "content": {"application/json": {
                                        "schema": {"type": "object"}}}}}}},
            "/metadata": {"get": {**metadata, "operationId": "metadata_get"},
                          "post": {**_operation("metadata", "what is being served (for BentoML's clients)", None,
                                                _json("Metadata"), ("400", "413", "503")),
                                   "requestBody": {"required": False, "content": {"application/json": {
                                       "schema": {"type": "object", "properties": {},
                                                  "additionalProperties": False}}}}}},
            "/livez": probe, "/healthz": probe,
            "/readyz": {"get": {**probe["get"], "responses": {**probe["get"]["responses"], **_errors(("503",))}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["Infrastructure"],
                                 "responses": {"200": {"description": "ok", "content": TEXT}}}},
        },
        "components": {"schemas": {**defs["$defs"], "Error": ERROR_SCHEMA}},
    }


@cache
def _served_spec() -> dict[str, Any]:
    import bentoml

    info = bentoml.get_current_service().info
    return contract_spec(info.classes, Settings.from_env(), info.version)


async def _docs_json(_: Request) -> JSONResponse:
    return JSONResponse(_served_spec())


async def _docs_page(_: Request) -> Response:
    return Response(DOCS_PAGE, media_type="text/html", headers={"Content-Security-Policy": CSP})


async def _docs_init(_: Request) -> Response:
    return Response(DOCS_INIT, media_type="text/javascript")


def routes() -> list[BaseRoute]:
    """``/docs``, ``/docs.json``, ``/docs-init.js`` (mounted before BentoML's own page and spec)."""
    return [Route("/docs", _docs_page, methods=["GET"]), Route("/docs.json", _docs_json, methods=["GET"]),
            Route("/docs-init.js", _docs_init, methods=["GET"])]


DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>cnn-mlops classifier: API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./docs-init.js" charset="UTF-8"></script>
  </body>
</html>
"""
# validatorUrl null: Swagger UI otherwise loads a badge from validator.swagger.io.
DOCS_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null});
};
"""
