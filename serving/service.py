"""BentoML service: the exported ONNX classifier and saliency graphs behind HTTP.

    bentoml serve serving.service:Classifier --port 3000

``POST /predict`` (``image``, ``k``), ``POST /predict_batch`` (``images``, ``k``), ``POST /saliency``
(``image``, ``target``, ``method``, ``format``), ``POST /feedback`` (``image``, ``label``) and
``GET|POST /metadata``: files are multipart form fields (README, "Serving"). Every answer is
logged and counted, with an out-of-distribution score, by :mod:`serving.monitoring`. The typed
methods below are the APIs; :mod:`serving.routes` parses the forms, :mod:`serving.uploads` decodes.
Settings: ``SERVING_*`` variables (:mod:`serving.settings`). No torch, mlflow, dvc, outbound request.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.validators import ContentType
from pydantic import Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response

from pipeline.common.contract import ModelCard
from serving import metrics, monitoring, openapi, routes, store, ui, uploads
from serving.batching import Batcher
from serving.errors import ErrorBodies, PayloadTooLarge
from serving.model import check_model_or_exit, onnx_session, run_in_chunks
from serving.render import reduce_map, saliency_png
from serving.schemas import (
    BatchPredictions,
    FeedbackStored,
    Format,
    Metadata,
    Method,
    Prediction,
    Predictions,
    SaliencyMap,
    Target,
    TopK,
    target_index,
)
from serving.settings import MonitoringPaths, Settings

log = logging.getLogger(__name__)
SETTINGS = Settings.from_env()
MODEL_TAG = store.store_tag()  # None when SERVING_MODEL is a folder


# The web UI, the docs page, /metrics; mounted routes come before BentoML's own `/` and `/docs.json`.
@bentoml.asgi_app(Starlette(routes=[*ui.routes(), *openapi.routes(), *metrics.routes(), *monitoring.routes()]),
                  path="/")
@bentoml.service(
    # serving.routes answers 503 at SERVING_TIMEOUT; BentoML's own timeout (504) is only a backstop.
    traffic={"timeout": SETTINGS.timeout_s + 30},
    workers=SETTINGS.workers,
    # BentoML labels its request metrics with the raw path (unbounded under 404 scans), with no
    # setting to bound it: serving.metrics records requests and serves /metrics instead.
    metrics={"enabled": False, "namespace": "bentoml_service"},
    # Per-request costs with no reader (profiled): the front logs requests; spans have no exporter.
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": [".*"]},
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
        model_dir = store.resolve_model_dir()  # checks both graphs against the model card
        self.model_dir = model_dir  # the web UI reads the bundled examples from it (serving/ui.py)
        self.session = onnx_session(model_dir / "classifier.onnx", SETTINGS.threads, SETTINGS.ort_spinning)
        self.saliency_session = onnx_session(model_dir / "saliency.onnx", SETTINGS.threads, SETTINGS.ort_spinning)
        log.info("model %s on %s", model_dir, provider := self.session.get_providers()[0])
        card = ModelCard.read(model_dir)
        self.classes: list[str] = card.classes
        self.image_size, self.channels = card.image_size, card.channels
        source = f"{model_dir.parent.name}:{model_dir.name}" if store.store_tag() else model_dir.name  # no full path
        self.info = Metadata.of(card, source, provider, SETTINGS.public())
        self.monitor = monitoring.Monitor(model_dir, card, SETTINGS, MonitoringPaths.from_env())
        self.batcher = Batcher(self._run, SETTINGS.max_batch_size, SETTINGS.max_latency_ms)
        self.decoders = ThreadPoolExecutor(SETTINGS.decode_threads, thread_name_prefix="decode")  # off the loop
        # onnxruntime's arena keeps its largest batch for good: reach that plateau now (flat memory under load)
        self._run(np.zeros((SETTINGS.max_batch_size, self.channels, self.image_size, self.image_size), np.uint8))

    @bentoml.on_shutdown
    def flush_log(self) -> None:  # a stopping worker writes its queued prediction records first
        self.monitor.close()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One row per image for the batcher, N×(classes + E + 3): probabilities, embedding, and what
        monitoring needs (mean and std intensity, OOD score), computed here off the event loop, batch-wide."""
        probabilities, embedding = run_in_chunks(self.session, ["probabilities", "embedding"], batch,
                                                 SETTINGS.max_batch_size)
        return np.concatenate([probabilities, embedding, self.monitor.statistics(batch, embedding)], axis=1)

    async def _in_pool(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoders, func, *args)

    def _top_k(self, probabilities: np.ndarray, k: int) -> list[Prediction]:
        order = np.argsort(-probabilities, kind="stable")[: min(k, len(self.classes))]
        return [Prediction(index=int(i), label=self.classes[i], probability=float(probabilities[i])) for i in order]

    # ------------------------------------------------------------------ on upload bytes (serving.routes)
    async def classify(self, data: bytes, k: int = 5) -> Predictions:
        array, facts = await self._in_pool(uploads.prepare, data, "image", self.image_size, self.channels, SETTINGS)
        row = await self.batcher(array) if SETTINGS.batching else (await asyncio.to_thread(self._run, array[None]))[0]
        [(score, ood)] = self.monitor.observe("/predict", row[None], [facts])
        return Predictions(model=self.info.model, version=self.info.version,
                           predictions=self._top_k(row[:len(self.classes)], k), ood_score=score, ood=ood)

    async def classify_all(self, images: list[bytes], k: int = 5) -> BatchPredictions:
        if len(images) > SETTINGS.max_files:
            raise PayloadTooLarge(f"images: {len(images)} files, over the limit of {SETTINGS.max_files}")
        facts = [await self._in_pool(uploads.inspect_upload, data, f"images[{i}]", SETTINGS)
                 for i, data in enumerate(images)]
        if (pixels := sum(f.width * f.height for f in facts)) > SETTINGS.max_batch_pixels:
            raise PayloadTooLarge(f"images: {pixels} decoded pixels in all, over the limit of "
                                  f"{SETTINGS.max_batch_pixels} (SERVING_MAX_BATCH_PIXELS)")
        arrays = [await self._in_pool(uploads.decode_upload, data, f"images[{i}]", self.image_size, self.channels,
                                      SETTINGS)
                  for i, data in enumerate(images)]  # one at a time: a heavy batch takes turns with the others
        rows = await asyncio.to_thread(self._run, np.stack(arrays))
        flags = self.monitor.observe("/predict_batch", rows, facts)
        return BatchPredictions(model=self.info.model, version=self.info.version,
                                predictions=[self._top_k(row[:len(self.classes)], k) for row in rows],
                                ood_score=[score for score, _ in flags], ood=[ood for _, ood in flags])

    async def explain(self, data: bytes, target: Target = None, method: Method = "guided",
                      format: Format = "png") -> Response:
        index = target_index(target, self.classes)
        facts = await self._in_pool(uploads.inspect_upload, data, "image", SETTINGS)
        array, square = await self._in_pool(uploads.decode_for_display, data, "image", self.image_size, self.channels,
                                            SETTINGS)  # one decode for the model and the picture
        feeds = {"image": array[None], "target": np.array([index], dtype=np.int64)}
        logits, gradient, guided, gradcam = await asyncio.to_thread(self.saliency_session.run, None, feeds)
        rows = await asyncio.to_thread(self._run, array[None])  # the embedding: saliency.onnx has none
        [(score, ood)] = self.monitor.observe("/saliency", rows, [facts])
        maps = {"gradient": gradient[0], "guided": guided[0], "gradcam": gradcam[0],
                "guided_gradcam": guided[0] * gradcam[0][None]}
        heat, scale = reduce_map(maps[method])
        probabilities = np.exp(logits[0] - logits[0].max())
        probabilities /= probabilities.sum()
        top = self._top_k(probabilities, 1)[0]
        explained = top if index < 0 else Prediction(index=index, label=self.classes[index],
                                                     probability=float(probabilities[index]))
        if format == "json":
            return JSONResponse(SaliencyMap(method=method, target=explained, prediction=top, scale=scale,
                                            map=np.round(heat, 4).tolist(), ood_score=score, ood=ood).model_dump())
        png = await self._in_pool(saliency_png, square, heat)
        headers = {"X-Target": explained.label, "X-Prediction": top.label, "X-Method": method}
        return Response(png, media_type="image/png", headers=headers | monitoring.ood_headers(score, ood))

    # ------------------------------------------------------------------ the typed APIs
    @bentoml.api
    async def predict(self, image: Path, k: TopK = 5) -> Predictions:
        """Top-``k`` classes of one image (``k`` is capped at the number of classes)."""
        return await self.classify(uploads.read_file(image, "image", SETTINGS), k)

    @bentoml.api
    async def predict_batch(self, images: Annotated[list[Path], Field(min_length=1)], k: TopK = 5
                            ) -> BatchPredictions:
        """Top-``k`` classes of each image, in order; one onnxruntime call for all of them."""
        return await self.classify_all([uploads.read_file(p, f"images[{i}]", SETTINGS)
                                        for i, p in enumerate(images)], k)

    @bentoml.api
    async def saliency(self, image: Path, target: Target = None, method: Method = "guided", format: Format = "png"
                       ) -> Annotated[Path, ContentType("image/png")]:
        """Where the model looks: ``method``'s map for ``target``; ``png``: a heat overlay on the
        upload's centre square (at most 512 px, :mod:`serving.render`); ``json``: the map as numbers."""
        return await self.explain(uploads.read_file(image, "image", SETTINGS), target, method, format)

    @bentoml.api
    async def feedback(self, image: Path, label: str) -> FeedbackStored:
        """Store ``image`` with its right class ``label`` for review (``python -m pipeline.monitor feedback``)."""
        return await monitoring.store_feedback(self.monitor, uploads.read_file(image, "image", SETTINGS), label,
                                               SETTINGS, self.decoders)

    @bentoml.api(route="/metadata")
    def metadata(self) -> Metadata:
        """What is being served: classes, input size, model version, run id, metrics, limits."""
        return self.info


# Outermost first: request metrics, JSON error bodies + nosniff, then the API routes (admission included).
Classifier.add_asgi_middleware(metrics.RequestMetrics, known=routes.LABELLED_PATHS, folders=routes.FOLDERS)
Classifier.add_asgi_middleware(ErrorBodies, allow={"/metadata": "GET, POST"})
Classifier.add_asgi_middleware(routes.ApiRoutes, settings=SETTINGS)
