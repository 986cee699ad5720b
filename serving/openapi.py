"""The API description clients and fuzzers read (``/docs.json``), and the docs page at ``/``.

BentoML 1.4 derives ``/docs.json`` from the Python signatures alone, so it declares only
400/404/500, a ``detail`` string the 400 body does not have, ``/saliency``'s PNG answer but not
its JSON one, ``target`` as a string, ``images`` without a count limit and no ``GET /metadata``.
:func:`contract_spec` rewrites it into what the service really does (a test runs schemathesis
against it). BentoML's page at ``/`` loads Google Tag Manager; :func:`docs_page` is the same
Swagger UI from BentoML's bundled files with nothing loaded from elsewhere (and a CSP that
forbids it).
"""

from __future__ import annotations

import copy
from typing import Any

from serving.settings import Settings

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong, starting with the field's name"}},
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer", "minimum": 0}}}
STATUSES = {
    "400": "a field missing, unknown, repeated or invalid; text where a file belongs; a body that is not a form",
    "408": "the body did not arrive within SERVING_BODY_TIMEOUT seconds",
    "413": "body over SERVING_MAX_BYTES, image or batch over SERVING_MAX_PIXELS / SERVING_MAX_BATCH_PIXELS decoded "
           "pixels, more than SERVING_MAX_FILES images",
    "415": "not an image in an accepted format (JPEG, PNG, GIF, BMP, WebP, TIFF)",
    "422": "an image its decoder cannot read (truncated, corrupt), 0 pixels, or a side under SERVING_MIN_SIDE",
    "503": "overloaded: too many requests in progress or queued too long; retry after Retry-After seconds",
}
IMAGE_APIS = ("/predict", "/predict_batch", "/saliency")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'")


def _errors(statuses: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        out[status] = {"description": STATUSES[status], "content": {"application/json": {"schema": ERROR_REF}}}
        if status == "503":
            out[status]["headers"] = RETRY_AFTER
    return out


def contract_spec(base: dict[str, Any], classes: list[str], settings: Settings, version: str) -> dict[str, Any]:
    """BentoML's generated spec (``service.openapi_spec.asdict()``) → the service's real contract."""
    spec = copy.deepcopy(base)
    spec["info"] = {"title": "cnn-mlops image classifier", "version": version or "0",
                    "description": "Image classification and saliency maps. Every error answer is "
                                   "`{\"error\": \"...\"}` naming the field; the only 5xx is 503 (overload) "
                                   "with Retry-After."}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    paths = spec["paths"]
    for item in paths.values():  # BentoML keys some responses by int
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"] = {str(k): v for k, v in operation["responses"].items()}
    for path, item in paths.items():
        operation = item.get("post")
        if operation is None:
            continue
        ok = operation["responses"].get("200")
        statuses = ("400", "408", "413", "415", "422", "503") if path in IMAGE_APIS else ("400", "408", "413", "503")
        operation["responses"] = {"200": ok, **_errors(statuses)}
        body = operation.get("requestBody")
        if body:
            for media in body.get("content", {}).values():
                _tighten_fields(media.get("schema", {}), classes, settings)
            # /metadata takes no field: an empty body is as good as {} (BentoML's client sends none)
            body["required"] = any(media.get("schema", {}).get("required") for media in body["content"].values())
    if "/saliency" in paths:
        png = paths["/saliency"]["post"]["responses"]["200"]
        png["description"] = "format=png: the overlay (headers X-Target, X-Prediction, X-Method); format=json: numbers"
        png["content"]["application/json"] = {"schema": {"$ref": "#/components/schemas/SaliencyMap"}}
        schemas["SaliencyMap"] = _saliency_schema()
    if "/metadata" in paths:
        answer = copy.deepcopy(paths["/metadata"]["post"]["responses"]["200"])
        paths["/metadata"]["get"] = {
            "summary": "what is being served", "operationId": "Classifier__metadata_get", "tags": ["Service APIs"],
            "responses": {"200": answer},
        }
    for probe in ("/livez", "/healthz", "/readyz"):
        if probe in paths:
            paths[probe]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    if "/readyz" in paths:
        paths["/readyz"]["get"]["responses"].update(_errors(("503",)))
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return spec


def _tighten_fields(schema: dict[str, Any], classes: list[str], settings: Settings) -> None:
    props = schema.get("properties", {})
    schema["additionalProperties"] = False
    for name in ("image", "images"):  # an empty upload is not an image: 400, like a missing one
        if name in props:
            (props[name].get("items") or props[name])["minLength"] = 1
    if "k" in props:
        props["k"].update({"type": "integer", "minimum": 1, "maximum": 1000})
    if "images" in props:
        props["images"].update({"minItems": 1, "maxItems": settings.max_files})
    if "target" in props:
        default = props["target"].get("default")
        props["target"] = {
            "title": "Target", "default": default, "nullable": True,
            "description": "the class to explain: an index or a class name (default: the predicted class)",
            "anyOf": [{"type": "integer", "minimum": 0, "maximum": max(0, len(classes) - 1)},
                      {"type": "string", "enum": list(classes) or ["?"]}],
        }


def _saliency_schema() -> dict[str, Any]:
    prediction = {"$ref": "#/components/schemas/Prediction"}
    return {
        "type": "object", "title": "SaliencyMap", "required": ["method", "target", "prediction", "scale", "map"],
        "properties": {
            "method": {"type": "string", "enum": ["gradient", "guided", "gradcam", "guided_gradcam"]},
            "target": prediction, "prediction": prediction, "scale": {"type": "number"},
            "map": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
    }


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
