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

Every image goes through :func:`pipeline.images.preprocess`, the function the preprocess
stage uses, so serving sees the pixels training saw. Bad input gets a 4xx with a JSON body
``{"error": "..."}``. Settings come from ``SERVING_*`` environment variables (:class:`Settings`).
Only onnxruntime, numpy and Pillow run here: never torch, mlflow or dvc.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
import prometheus_client
from bentoml.exceptions import BadInput, BentoMLException, InvalidArgument, ServiceUnavailable
from bentoml.validators import ContentType
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.contract import ModelCard
from pipeline.images import ImageError, open_image, preprocess
from serving import store, ui
from serving.render import saliency_png

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
# What Pillow's decoders raise on hostile files beyond ImageError (its own fuzzing targets list these).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, ZeroDivisionError)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


@dataclass(frozen=True)
class Settings:
    """Serving knobs: each field is read from ``SERVING_<FIELD>`` (integers; 0/1 for batching)."""

    max_bytes: int = 10 * 1024 * 1024  # SERVING_MAX_BYTES: request body limit (10 MiB) → 413
    max_pixels: int = 25_000_000  # SERVING_MAX_PIXELS: decoded-size limit (bombs) → 413
    min_side: int = 8  # SERVING_MIN_SIDE: shorter side below this → 422 (1×N, 3×3 ...)
    max_files: int = 64  # SERVING_MAX_FILES: images per /predict_batch request
    batching: bool = True  # SERVING_BATCHING=0 runs every /predict alone
    max_batch_size: int = 32  # SERVING_MAX_BATCH_SIZE
    max_latency_ms: int = 2000  # SERVING_MAX_LATENCY_MS: queueing longer than this → 503
    threads: int = 0  # SERVING_THREADS: onnxruntime intra-op threads, 0 = its default
    workers: int = 1  # SERVING_WORKERS: server processes, each with its own sessions
    timeout_s: int = 30  # SERVING_TIMEOUT
    max_concurrency: int = 128  # SERVING_MAX_CONCURRENCY: more in flight → 503

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        values: dict[str, Any] = {
            name: _env_int(f"SERVING_{name.upper()}", int(default)) for name, default in asdict(defaults).items()
        }
        values["batching"] = bool(values["batching"])
        return cls(**values)


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


def load_image(path: Path, what: str, size: int, channels: int, settings: Settings = SETTINGS) -> np.ndarray:
    """An uploaded file → uint8 C×H×W via :func:`pipeline.images.preprocess`, or a 4xx exception.

    Args:
        path: the upload (BentoML saves it to a temporary file).
        what: how error messages name it (``image``, ``images[2]``).
        size, channels: the model's input.
        settings: the limits.

    The header is read first (no pixel decoding) so that too small, too large and non-images
    are refused before any work is done.
    """
    if path.stat().st_size > settings.max_bytes:
        raise PayloadTooLarge(f"{what}: {path.stat().st_size} bytes, over the limit of {settings.max_bytes}")
    data = path.read_bytes()
    try:
        header = open_image(data, settings.max_pixels)
        if min(header.size) < settings.min_side:
            raise ImageError(
                "too_small", f"{header.size[0]}x{header.size[1]}: both sides must be >= {settings.min_side} px"
            )
        return preprocess(data, size, channels, settings.max_pixels)
    except ImageError as err:
        message = str(err).removeprefix("<bytes>: ").removeprefix("<input>: ")  # the name is `what`
        raise ImageRejected(f"{what}: {err.reason}: {message}", error_code=REASON_STATUS[err.reason]) from None
    except DECODE_ERRORS as err:
        raise ImageRejected(f"{what}: corrupt: {type(err).__name__}: {err}") from None


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


def onnx_session(path: Path, threads: int):
    """An onnxruntime session on CUDA when onnxruntime can really use it there, else on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle intra-op threads spin by default: fine for one caller, but in a server they burn the
    # cores that decode the next requests (measured: 11 → 8 ms of CPU per LeNet-5 request).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # onnxruntime-gpu lists CUDA even without a driver or cuDNN; only creating a session
        # tells. It then logs an error and falls back to CPU: silence that, we log the outcome.
        ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        finally:
            ort.set_default_logger_severity(2)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# GET /metadata: BentoML APIs are POST-only, so a plain route on a mounted app serves the GET.
async def _get_metadata(_: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info.model_dump())


@bentoml.asgi_app(Starlette(routes=[Route("/metadata", _get_metadata, methods=["GET"]), *ui.routes()]), path="/")
@bentoml.service(
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    workers=SETTINGS.workers,
)
class Classifier:
    """Image classifier with saliency maps, from ``SERVING_MODEL`` (a folder or a store tag)."""

    # A store model declared here is checked before the server starts and packed by `bentoml
    # build`; a folder (tests, quick trials) needs no store. __init__ resolves either.
    if MODEL_TAG is not None:
        model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        model_dir = store.resolve_model_dir()
        self.model_dir = model_dir  # the web UI reads the bundled examples from it (serving/ui.py)
        self.session = onnx_session(model_dir / "classifier.onnx", SETTINGS.threads)
        self.saliency_session = onnx_session(model_dir / "saliency.onnx", SETTINGS.threads)
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
            source=f"{model_dir.parent.name}:{model_dir.name}" if store.store_tag() else str(model_dir),
            provider=provider, settings=asdict(SETTINGS),
        )
        self.batcher = (make_batcher(self._probabilities, SETTINGS.max_batch_size, SETTINGS.max_latency_ms)
                        if SETTINGS.batching else None)

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": batch})[0]

    async def _load(self, path: Path, what: str) -> np.ndarray:
        return await asyncio.to_thread(load_image, path, what, self.size, self.channels)

    def _top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(-probabilities, kind="stable")[: min(k, len(self.classes))]
        return [Prediction(index=int(i), label=self.classes[i], probability=float(probabilities[i])) for i in order]

    def _target_index(self, target: str | int | None) -> int:
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
    async def predict(self, image: Path, k: Annotated[int, Field(ge=1)] = 5) -> Predictions:
        """Top-``k`` classes of one image (``k`` is capped at the number of classes)."""
        array = await self._load(image, "image")
        if self.batcher is not None:
            probabilities = await self.batcher(array)
        else:
            probabilities = (await asyncio.to_thread(self._probabilities, array[None]))[0]
        return Predictions(model=self.info.model, version=self.info.version,
                           predictions=self._top_k(probabilities, k))

    @bentoml.api
    async def predict_batch(self, images: list[Path], k: Annotated[int, Field(ge=1)] = 5) -> BatchPredictions:
        """Top-``k`` classes of each image, in order; one onnxruntime call for all of them."""
        if len(images) > SETTINGS.max_files:
            raise PayloadTooLarge(f"images: {len(images)} files, over the limit of {SETTINGS.max_files}")
        arrays = await asyncio.gather(*(self._load(path, f"images[{i}]") for i, path in enumerate(images)))
        probabilities = await asyncio.to_thread(self._probabilities, np.stack(arrays))
        return BatchPredictions(model=self.info.model, version=self.info.version,
                                predictions=[self._top_k(p, k) for p in probabilities])

    @bentoml.api
    async def saliency(
        self, image: Path, target: str | int | None = None, method: Method = "guided",
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
        array = await self._load(image, "image")
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
        png = await asyncio.to_thread(saliency_png, image, heat, self.channels, SETTINGS.max_pixels)
        return Response(png, media_type="image/png", headers=headers)

    @bentoml.api(route="/metadata")
    def metadata(self) -> Metadata:
        """What is being served: classes, input size, model version, run id, metrics, limits."""
        return self.info


class RequestGuard:
    """ASGI middleware around every route.

    * Bodies over ``max_bytes`` get 413 before anything parses them: BentoML 1.4 has no
      request-size limit of its own (``api_server.max_request_size`` was removed).
    * BentoML 1.4 sends 4xx errors as ``[{"error": ...}]`` (a stray tuple, bentoml#4232, fix
      pending in PR #5709); this unwraps them to ``{"error": ...}``.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await self._drain(receive, 8 * self.max_bytes)  # so the client gets to read our answer
            message = f"request body is {int(length)} bytes, over the limit of {self.max_bytes} (SERVING_MAX_BYTES)"
            return await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # chunked uploads declare no length
                raise PayloadTooLarge(f"request body is over the limit of {self.max_bytes} bytes (SERVING_MAX_BYTES)")
            return message

        await self.app(scope, counted_receive, _unwrap_errors(send))

    @staticmethod
    async def _drain(receive, limit: int) -> None:
        total, more = 0, True
        while more and total <= limit:
            message = await receive()
            total += len(message.get("body", b""))
            more = message.get("more_body", False)


def _unwrap_errors(send):
    """Wrap ``send``: a 4xx JSON body that is a one-element list of an object becomes the object."""
    held: dict[str, Any] = {}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            held["start"], held["body"] = message, b""
            return
        if "start" not in held or message["type"] != "http.response.body":
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        body, start = held.pop("body"), held.pop("start")
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
            body = json.dumps(parsed[0]).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


Classifier.add_asgi_middleware(RequestGuard, max_bytes=SETTINGS.max_bytes)


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


def _strict_form_parser() -> None:
    """Make malformed multipart bodies a 400, not a 500.

    Starlette reports them as its own ``HTTPException``, which BentoML 1.4's endpoint wrapper
    does not recognise (only its exceptions and pydantic's) and turns into a 500.
    """
    from _bentoml_impl import serde

    class FormSerde(serde.MultipartSerde):
        async def parse_request(self, request, cls):
            try:
                return await super().parse_request(request, cls)
            except HTTPException as err:
                raise BadInput(f"malformed multipart/form-data body: {err.detail}") from None

    serde.ALL_SERDE["multipart/form-data"] = FormSerde  # type: ignore[index]


_strict_form_parser()
