"""BentoML service: the exported ONNX classifier and saliency graphs behind HTTP.

    bentoml serve serving.service:Classifier --port 3000

Endpoints (files are multipart form fields; see the README for curl and Python calls):

=====================  ===================================================================
``POST /predict``      ``image``, ``k`` (default 5) → top-k labels and probabilities
``POST /predict_batch``  ``images`` (the field repeated), ``k`` → one top-k list per image
``POST /saliency``     ``image``, ``target`` (index or class name; default the predicted
                       class), ``method`` (gradient|guided|gradcam|guided_gradcam),
                       ``format`` (png|json) → the map over the upload (at most 512 px), or numbers
``GET /metadata``      classes, input size, channels, model name and version, run id,
                       metrics, limits (also ``POST /metadata`` for BentoML clients)
=====================  ===================================================================

Every image goes through :func:`pipeline.common.images.preprocess`, the function the preprocess
stage uses, so serving sees the pixels training saw. Bad input gets a 4xx with a JSON body
``{"error": "..."}`` naming the field; the only 5xx is 503 + Retry-After (overload). Settings
come from ``SERVING_*`` environment variables (:mod:`serving.settings`). Request parsing is
:mod:`serving.forms`, admission control and error shaping :mod:`serving.guard`, the API
description :mod:`serving.openapi`. Only onnxruntime, numpy and Pillow run here: never torch,
mlflow or dvc. The service makes no outbound request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Literal

# Usage tracking off before BentoML reads it (it caches the answer): `bentoml serve` imports
# this module in its main process before it would send anything.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
import prometheus_client  # noqa: E402
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable  # noqa: E402
from bentoml.validators import ContentType  # noqa: E402
from pydantic import BaseModel, Field, StrictInt, ValidationError  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from pipeline.common.contract import CLASSIFIER_FILE, SALIENCY_FILE, ModelCard  # noqa: E402
from pipeline.common.images import ImageError, open_image, preprocess  # noqa: E402
from serving import forms, guard, openapi, store, ui  # noqa: E402
from serving.render import saliency_png  # noqa: E402
from serving.settings import Settings  # noqa: E402

log = logging.getLogger(__name__)

Method = Literal["gradient", "guided", "gradcam", "guided_gradcam"]
# ImageError.reason → status: 415 = not an image format we read, 413 = too big, 422 = broken or unusable.
REASON_STATUS = {
    "empty": HTTPStatus.BAD_REQUEST,
    "not_an_image": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    "too_many_pixels": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "unreadable": HTTPStatus.UNPROCESSABLE_ENTITY,
    "corrupt": HTTPStatus.UNPROCESSABLE_ENTITY,
    "zero_pixels": HTTPStatus.UNPROCESSABLE_ENTITY,
    "too_small": HTTPStatus.UNPROCESSABLE_ENTITY,
}
# The formats decoded, handed to Pillow's own `formats=` so no other decoder ever sees an upload:
# the common web/camera formats. Pillow's rarer decoders (DDS, BLP, SPIDER, PSD, ...) are where
# fuzzed files raised errors past the handlers; nothing a client of an image classifier needs.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

SETTINGS = Settings.from_env()
MODEL_TAG = store.store_tag()  # None when SERVING_MODEL is a folder


class ImageRejected(BentoMLException):
    """An upload that is not a usable image; the status depends on why (see REASON_STATUS)."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class PayloadTooLarge(BentoMLException):
    """A request body (or one file) over ``SERVING_MAX_BYTES``."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Prediction(BaseModel):
    index: int
    label: str
    probability: float


class Predictions(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class BatchPredictions(BaseModel):
    model: str
    version: str
    predictions: list[list[Prediction]]


class SaliencyMap(BaseModel):
    method: str
    target: Prediction  # the class the map explains
    prediction: Prediction  # the top-1 class
    scale: float  # the map was divided by this (its largest |value|) to lie in [0, 1]
    map: list[list[float]]  # H×W, the model's input size


class Metadata(BaseModel):
    model: str
    version: str
    architecture: str
    classes: list[str]
    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    mlflow_run_id: str
    git_commit: str
    data_md5: str
    metrics: dict[str, float]
    files: dict[str, str]  # sha256 of classifier.onnx and saliency.onnx, as the model card records them
    source: str
    provider: str
    settings: dict[str, int | bool]


def _rejected(what: str, err: ImageError) -> ImageRejected:
    message = str(err).removeprefix("<bytes>: ").removeprefix("<input>: ")  # the name is `what`
    return ImageRejected(f"{what}: {err.reason}: {message}", error_code=REASON_STATUS[err.reason])


def check_upload(data: bytes, what: str, settings: Settings = SETTINGS) -> int:
    """The pixel count of an upload from its header (no pixel decoding), or a 4xx exception.

    Refuses what is not an allowed format (415), too many pixels (413), too small a side (422).
    """
    try:
        header = open_image(data, settings.max_pixels, ALLOWED_FORMATS)
        if min(header.size) < settings.min_side:
            raise ImageError(
                "too_small", f"{header.size[0]}x{header.size[1]}: both sides must be >= {settings.min_side} px"
            )
        return header.size[0] * header.size[1]
    except ImageError as err:
        raise _rejected(what, err) from None
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on a hostile header is a bad image
        raise ImageRejected(f"{what}: corrupt: {type(err).__name__}: {err}"[:500]) from None


def read_upload(path: Path, what: str, settings: Settings = SETTINGS) -> tuple[bytes, int]:
    """An upload's bytes (kept in memory by :mod:`serving.forms`, or a file for in-process
    callers) and its pixel count (:func:`check_upload`), or a 4xx exception."""
    data = forms.upload_bytes(path)
    size = len(data) if data is not None else path.stat().st_size
    if size > settings.max_bytes:
        raise PayloadTooLarge(f"{what}: {size} bytes, over the limit of {settings.max_bytes}")
    if data is None:
        data = path.read_bytes()
    return data, check_upload(data, what, settings)


def decode_upload(data: bytes, what: str, size: int, channels: int, settings: Settings = SETTINGS) -> np.ndarray:
    """Bytes that passed :func:`read_upload` → uint8 C×H×W via :func:`pipeline.common.images.preprocess`."""
    try:
        return preprocess(data, size, channels, settings.max_pixels, ALLOWED_FORMATS)
    except ImageError as err:
        raise _rejected(what, err) from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise many types on broken data (fuzz test)
        raise ImageRejected(f"{what}: corrupt: {type(err).__name__}: {err}"[:500]) from None


def load_image(path: Path, what: str, size: int, channels: int, settings: Settings = SETTINGS) -> np.ndarray:
    """An uploaded file → uint8 C×H×W via :func:`pipeline.common.images.preprocess`, or a 4xx exception.

    Args:
        path: the upload (kept in memory, see :mod:`serving.forms`) or a file.
        what: how error messages name it (``image``, ``images[2]``).
        size, channels: the model's input.
        settings: the limits.

    The header is read first (no pixel decoding) so that too small, too large and non-images
    are refused before any work is done.
    """
    data, _ = read_upload(path, what, settings)
    return decode_upload(data, what, size, channels, settings)


def reduce_map(maps: np.ndarray) -> tuple[np.ndarray, float]:
    """C×H×W or H×W saliency → H×W in [0, 1] (max |value| over channels), and the divisor used."""
    heat = np.abs(maps).max(axis=0) if maps.ndim == 3 else np.abs(maps)
    scale = float(heat.max())
    return (heat / scale if scale > 0 else heat).astype(np.float32), scale


def make_batcher(
    run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: int
) -> Callable[[np.ndarray], Awaitable[np.ndarray]]:
    """``await batcher(chw)`` → that image's probabilities, run in batches with other requests.

    BentoML's adaptive batching (its ``CorkDispatcher``, what ``@bentoml.api(batchable=True)``
    uses) but called in-process: going through a batchable API from another API of the same
    service serialises every 224×224 tensor to JSON and back (measured: +33 ms per request
    against 4 ms of inference for LeNet-5).
    """
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    def overloaded() -> None:  # the dispatcher gives up on requests queued past max_latency_ms
        raise ServiceUnavailable(f"overloaded: queued longer than {max_latency_ms} ms")

    dispatcher = CorkDispatcher(max_latency_ms, max_batch_size, fallback=overloaded, get_batch_size=lambda _: 1)

    async def run_batch(batch: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        BATCH_SIZE.observe(len(batch))
        return list(await asyncio.to_thread(run, np.stack(batch)))

    return dispatcher(run_batch)


# Served on /metrics with BentoML's own (bentoml.metrics is deprecated for prometheus_client).
BATCH_SIZE = prometheus_client.Histogram(
    "classifier_batch_size", "Images per onnxruntime call of /predict (adaptive batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


def onnx_session(path: Path, threads: int, spinning: bool = False, cpu_only: bool = False):
    """An onnxruntime session on CUDA when onnxruntime can really use it there, else on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle intra-op threads spin by default: fine for one caller, but in a server they burn the
    # cores that decode the next requests (bench/serve.py measures both; SERVING_ORT_SPINNING).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not cpu_only and "CUDAExecutionProvider" in ort.get_available_providers():
        # onnxruntime-gpu lists CUDA even without a driver or cuDNN; only creating a session
        # tells. It then logs an error and falls back to CPU: silence that, we log the outcome.
        ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        finally:
            ort.set_default_logger_severity(2)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_model_or_exit() -> None:
    """Load both graphs once, in the ``bentoml serve`` process before any worker starts; on
    failure print one line naming the file and the reason and exit 3.

    A worker whose ``__init__`` raises is restarted by BentoML's supervisor every few seconds
    forever, with /readyz and /livez never answering; this makes a broken model a start-up error.
    """
    current = "SERVING_MODEL"
    try:
        model_dir = store.resolve_model_dir()  # the card is valid and names both files by sha256
        for name in (CLASSIFIER_FILE, SALIENCY_FILE):
            current = str(Path(model_dir) / name)
            ModelCard.from_onnx_props(  # the graph loads and carries a valid card
                onnx_session(Path(model_dir) / name, 1, cpu_only=True).get_modelmeta().custom_metadata_map)
    except Exception as err:  # noqa: BLE001 - any reason is reported the same way, then the process exits
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        print(f"error: cannot serve the model: {current}: {reason}"[:1000], file=sys.stderr, flush=True)
        sys.exit(3)


API_PATHS = ("/predict", "/predict_batch", "/saliency", "/metadata")
LABELLED_PATHS = (*API_PATHS, "/", "/ui", "/docs", "/docs.json", "/docs-init.js", "/schema.json", "/livez",
                  "/healthz", "/readyz", "/metrics")


# GET /metadata: BentoML APIs are POST-only, so a plain route on a mounted app serves the GET.
async def _get_metadata(_: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info.model_dump())


@cache
def _spec() -> dict:
    info = bentoml.get_current_service().info
    return openapi.contract_spec(Classifier.openapi_spec.asdict(), info.classes, SETTINGS, info.version)


async def _docs_json(_: Request) -> JSONResponse:
    return JSONResponse(_spec())


async def _docs_page(_: Request) -> Response:
    return Response(openapi.DOCS_PAGE, media_type="text/html", headers={"Content-Security-Policy": openapi.CSP})


async def _docs_init(_: Request) -> Response:
    return Response(openapi.DOCS_INIT, media_type="text/javascript")


# The mounted app's routes come before BentoML's own `/` and `/docs.json` (BentoML appends its
# mounts first), so these replace its Google-Tag-Manager page and its generated schema. `/` leads
# to the web UI (serving/ui.py); the API docs page is at `/docs`.
PAGES = Starlette(routes=[
    Route("/metadata", _get_metadata, methods=["GET"]),
    *ui.routes(),
    Route("/docs", _docs_page, methods=["GET"]),
    Route("/docs.json", _docs_json, methods=["GET"]),
    Route("/docs-init.js", _docs_init, methods=["GET"]),
])


@bentoml.asgi_app(PAGES, path="/")
@bentoml.service(
    # Admission control is serving.guard's (503 + Retry-After); BentoML's timeout (504) only
    # backs up the guard's deadlines, so it is set beyond them.
    traffic={"timeout": SETTINGS.timeout_s + SETTINGS.body_timeout_s + 30},
    workers=SETTINGS.workers,
)
class Classifier:
    """Image classifier with saliency maps, from ``SERVING_MODEL`` (a folder or a store tag)."""

    # A store model declared here is checked before the server starts and packed by `bentoml
    # build`; a folder (tests, quick trials) needs no store. __init__ resolves either.
    if MODEL_TAG is not None:
        model = bentoml.models.BentoModel(MODEL_TAG)

    @bentoml.on_deployment
    def preflight() -> None:  # runs once in the `bentoml serve` process, before the workers
        check_model_or_exit()

    def __init__(self) -> None:
        model_dir = store.resolve_model_dir()
        self.model_dir = model_dir  # the web UI reads the bundled examples from it (serving/ui.py)
        self.session = onnx_session(model_dir / "classifier.onnx", SETTINGS.threads, SETTINGS.ort_spinning)
        self.saliency_session = onnx_session(model_dir / "saliency.onnx", SETTINGS.threads, SETTINGS.ort_spinning)
        provider = self.session.get_providers()[0]
        log.info("model %s on %s", model_dir, provider)
        card = ModelCard.read(model_dir)  # resolve_model_dir checked the files against it
        self.classes: list[str] = card.classes
        self.size, self.channels = card.image_size, card.channels
        self.info = Metadata(
            model=card.registered_model or card.architecture, version=card.version,
            architecture=card.architecture, classes=self.classes, image_size=self.size, channels=self.channels,
            mean=card.mean, std=card.std, mlflow_run_id=card.mlflow_run_id, git_commit=card.git_commit,
            data_md5=card.data_md5, metrics=card.metrics, files=card.files,
            source=f"{model_dir.parent.name}:{model_dir.name}" if store.store_tag() else model_dir.name,
            provider=provider, settings=SETTINGS.public(),
        )
        self.batcher = (make_batcher(self._probabilities, SETTINGS.max_batch_size, SETTINGS.max_latency_ms)
                        if SETTINGS.batching else None)
        # Decoding runs here, off the event loop, a bounded number at a time; each request
        # submits one image at a time, so a heavy batch takes turns with the others.
        self.decoders = ThreadPoolExecutor(SETTINGS.decode_threads, thread_name_prefix="decode")

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": batch})[0]

    async def _in_pool(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoders, func, *args)

    async def _load(self, path: Path, what: str) -> np.ndarray:
        data, _ = await self._in_pool(read_upload, path, what)
        return await self._in_pool(decode_upload, data, what, self.size, self.channels)

    async def _load_all(self, paths: list[Path], field: str) -> list[np.ndarray]:
        """Every image of a batch, within SERVING_MAX_BATCH_PIXELS decoded pixels in all (413)."""
        uploads = [await self._in_pool(read_upload, path, f"{field}[{i}]") for i, path in enumerate(paths)]
        pixels = sum(count for _, count in uploads)
        if pixels > SETTINGS.max_batch_pixels:
            raise PayloadTooLarge(f"{field}: {pixels} decoded pixels in all, over the limit of "
                                  f"{SETTINGS.max_batch_pixels} (SERVING_MAX_BATCH_PIXELS)")
        return [await self._in_pool(decode_upload, data, f"{field}[{i}]", self.size, self.channels)
                for i, (data, _) in enumerate(uploads)]

    def _top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(-probabilities, kind="stable")[: min(k, len(self.classes))]
        return [Prediction(index=int(i), label=self.classes[i], probability=float(probabilities[i])) for i in order]

    def _target_index(self, target: int | str | None) -> int:
        """The class index to explain (−1 = the predicted one); 400 naming the valid choices."""
        if target is None:
            return -1
        if isinstance(target, int) and not isinstance(target, bool):
            if 0 <= target < len(self.classes):
                return target
            raise InvalidArgument(f"target {target} is out of range: 0..{len(self.classes) - 1}")
        if target in self.classes:
            return self.classes.index(target)
        raise InvalidArgument(f"target {target!r} is not a class index or name; classes: {self.classes}")

    @bentoml.api
    async def predict(self, image: Path, k: Annotated[StrictInt, Field(ge=1, le=1000)] = 5) -> Predictions:
        """Top-``k`` classes of one image (``k`` is capped at the number of classes)."""
        array = await self._load(image, "image")
        if self.batcher is not None:
            probabilities = await self.batcher(array)
        else:
            probabilities = (await asyncio.to_thread(self._probabilities, array[None]))[0]
        return Predictions(model=self.info.model, version=self.info.version,
                           predictions=self._top_k(probabilities, k))

    @bentoml.api
    async def predict_batch(
        self, images: Annotated[list[Path], Field(min_length=1)], k: Annotated[StrictInt, Field(ge=1, le=1000)] = 5
    ) -> BatchPredictions:
        """Top-``k`` classes of each image, in order; one onnxruntime call for all of them."""
        if len(images) > SETTINGS.max_files:
            raise PayloadTooLarge(f"images: {len(images)} files, over the limit of {SETTINGS.max_files}")
        arrays = await self._load_all(images, "images")
        probabilities = await asyncio.to_thread(self._probabilities, np.stack(arrays))
        return BatchPredictions(model=self.info.model, version=self.info.version,
                                predictions=[self._top_k(p, k) for p in probabilities])

    @bentoml.api
    async def saliency(
        self, image: Path, target: StrictInt | str | None = None, method: Method = "guided",
        format: Literal["png", "json"] = "png",
    ) -> Annotated[Path, ContentType("image/png")]:
        """Where the model looks: ``method``'s map for ``target``, over the input as the model saw it.

        ``png``: the map as a heat overlay on the upload's centre square at the upload's own
        resolution (at most 512 px, :mod:`serving.render`), its top 1% clipped so a few extreme
        pixels do not hide the rest (headers ``X-Target``, ``X-Prediction``);
        ``json``: the map at the model's input size as numbers (H×W in [0, 1], divided by its
        maximum) and the prediction.
        """
        index = self._target_index(target)
        data, _ = await self._in_pool(read_upload, image, "image")  # kept: the PNG is drawn over it
        array = await self._in_pool(decode_upload, data, "image", self.size, self.channels)
        feeds = {"image": array[None], "target": np.array([index], dtype=np.int64)}
        logits, gradient, guided, gradcam = await asyncio.to_thread(self.saliency_session.run, None, feeds)
        maps = {"gradient": gradient[0], "guided": guided[0], "gradcam": gradcam[0],
                "guided_gradcam": guided[0] * gradcam[0][None]}
        heat, scale = reduce_map(maps[method])
        probabilities = np.exp(logits[0] - logits[0].max())
        probabilities /= probabilities.sum()
        top = self._top_k(probabilities, 1)[0]
        explained = top if index < 0 else Prediction(index=index, label=self.classes[index],
                                                     probability=float(probabilities[index]))
        if format == "json":
            body = SaliencyMap(method=method, target=explained, prediction=top, scale=scale,
                               map=np.round(heat, 4).tolist())
            return JSONResponse(body.model_dump())
        headers = {"X-Target": explained.label, "X-Prediction": top.label, "X-Method": method}
        png = await self._in_pool(saliency_png, data, heat, self.channels, SETTINGS.max_pixels)
        return Response(png, media_type="image/png", headers=headers)

    @bentoml.api(route="/metadata")
    def metadata(self) -> Metadata:
        """What is being served: classes, input size, model version, run id, metrics, limits."""
        return self.info


forms.install(SETTINGS)
guard.install(SETTINGS, guard.path_labeller(LABELLED_PATHS, ["/static_content/", "/ui/"]))
Classifier.add_asgi_middleware(guard.RequestGuard, settings=SETTINGS, api_paths=API_PATHS,
                               allow={"/metadata": "GET, POST"})


class ClientErrorsAsWarnings(logging.Filter):
    """BentoML logs every failed request at ERROR with a traceback; a 4xx is the client's
    doing, so it becomes one WARNING line (5xx keep their traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        status = getattr(error, "error_code", None)
        if isinstance(error, ValidationError) or (status is not None and status < 500):
            detail = " ".join(str(error).split())
            record.msg, record.args = f"{record.getMessage()}: {type(error).__name__}: {detail}", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsAsWarnings())
