"""The web UI at ``/ui``: one static page (``serving/static/``) that calls the service's own API.

    GET /                      → 307 to /ui/
    GET /ui/                   the page (index.html, app.js, style.css: no framework, nothing external)
    GET /ui/examples           [{"index", "label", "url"}]: the bundled test-split images, if any
    GET /ui/examples/{i}.png   one of them, as the preprocess stage stored it
    GET /ui/colormap.png       the saliency colour scale (pipeline.common.colormap), for the legend

The page itself runs ``POST /predict``, ``POST /saliency`` (``format=png``) and ``GET /metadata``.
Every page response carries a Content-Security-Policy that only allows this origin, so the
browser itself refuses any script, font, style or request to another host.
Examples come from ``examples.npz`` in the served deployable (written by the export stage,
:func:`pipeline.export.write_examples`): images of the served model's own test split.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.common.colormap import colorize
from pipeline.common.contract import EXAMPLES_FILE

STATIC = Path(__file__).resolve().parent / "static"
# Only this origin; blob: for the pictures the page builds from API answers.
CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


class UIStatic(StaticFiles):
    """StaticFiles with the page's security headers on every file."""

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 C×H×W (C = 1 or 3) or H×W×3 → PNG."""
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, "PNG")
    return buffer.getvalue()


@lru_cache(maxsize=4)
def load_examples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``examples.npz`` → (uint8 images N×C×H×W, int labels N); empty arrays when there is no file."""
    if not path.is_file():
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64)
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["labels"]


def _served():
    """The running service instance (``serving.service.Classifier``): its model folder and classes."""
    import bentoml

    return bentoml.get_current_service()


async def examples(_: Request) -> JSONResponse:
    service = _served()
    _, labels = load_examples(service.model_dir / EXAMPLES_FILE)
    return JSONResponse([{"index": i, "label": service.classes[int(label)], "url": f"examples/{i}.png"}
                         for i, label in enumerate(labels)])


async def example_png(request: Request) -> Response:
    images, _ = load_examples(_served().model_dir / EXAMPLES_FILE)
    index = request.path_params["index"]
    if not 0 <= index < len(images):
        return JSONResponse({"error": f"no example {index}: there are {len(images)}"}, status_code=404)
    return Response(png_bytes(images[index]), media_type="image/png", headers={"Cache-Control": "max-age=3600"})


async def colormap_png(_: Request) -> Response:
    strip = colorize(np.linspace(0.0, 1.0, 256)).T[:, None, :]  # 3×1×256: C×H×W
    return Response(png_bytes(strip), media_type="image/png", headers={"Cache-Control": "max-age=3600"})


async def index(_: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


async def to_ui(_: Request) -> RedirectResponse:
    return RedirectResponse("/ui/")


def routes() -> list[BaseRoute]:
    """What the service mounts: ``/`` and ``/ui`` lead to the page, ``/ui/...`` serves it."""
    page = [Route("/", index, methods=["GET"]),
            Route("/examples", examples, methods=["GET"]),
            Route("/examples/{index:int}.png", example_png, methods=["GET"]),
            Route("/colormap.png", colormap_png, methods=["GET"]),
            Mount("/static", UIStatic(directory=STATIC), name="ui-static")]
    return [Route("/", to_ui, methods=["GET"]), Route("/ui", to_ui, methods=["GET"]), Mount("/ui", routes=page)]
