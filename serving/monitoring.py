"""What the service watches in its answers: OOD flags, the prediction log, class metrics, the panel, feedback.

Each model call adds :meth:`Monitor.statistics` to its rows (input mean and std, the OOD score
against the deployable's ``reference.npz``), batch-wide and off the event loop. Every answered
image then goes through :meth:`Monitor.observe`: counted on ``/metrics`` and handed, as the values
already computed, to the prediction log (:class:`pipeline.common.predlog.PredictionLog`: a
background writer that never blocks or raises and builds the feature record of
:func:`pipeline.common.features.feature_records` there; ``SERVING_LOG=off`` turns it off):

    classifier_predictions_total{class}            answered images per predicted class (the model's classes only)
    classifier_prediction_confidence               histogram of the top probability
    classifier_ood_total                           answered images flagged out-of-distribution
    classifier_prediction_log_dropped_total        records the log could not take (queue full, write failed)

``GET /monitoring`` (the web UI's panel) returns the predicted-class counts of every worker since
the service started beside the reference's (the validation split as the model predicted it), and
the last drift verdict read from ``SERVING_DRIFT_REPORT``. ``POST /feedback`` stores an image
with its right label in ``SERVING_REVIEW_DIR`` (:func:`pipeline.common.feedback.write_feedback`).
A model exported before monitoring (no ``reference.npz``) still serves: no OOD score, a log line says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from functools import partial
from http import HTTPStatus
from pathlib import Path

import numpy as np
import prometheus_client
from prometheus_client import multiprocess
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.common.contract import CARD_FILE, ModelCard, sha256_file
from pipeline.common.features import AnswerStats, Reference, UploadFacts, feature_records, load_reference
from pipeline.common.feedback import FeedbackError, write_feedback
from pipeline.common.predlog import DEFAULT_FILE_BYTES, PredictionLog, deferred, model_identity
from serving import uploads
from serving.errors import FieldError, ImageRejected
from serving.schemas import FeedbackStored
from serving.settings import MonitoringPaths, Settings

log = logging.getLogger(__name__)
PREDICTIONS = prometheus_client.Counter("classifier_predictions", "Answered images per predicted class", ["class"])
CONFIDENCE = prometheus_client.Histogram("classifier_prediction_confidence", "Top probability of each answered image",
                                         buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
OUT_OF_DISTRIBUTION = prometheus_client.Counter("classifier_ood", "Answered images flagged out-of-distribution")
LOG_DROPPED = prometheus_client.Counter("classifier_prediction_log_dropped",
                                        "Prediction log records dropped (queue full or write failed)")


class Monitor:
    """One worker's monitoring of the served model in ``model_dir`` (see the module docstring)."""

    def __init__(self, model_dir: Path, card: ModelCard, settings: Settings, paths: MonitoringPaths) -> None:
        self.classes, self.paths, self.version = card.classes, paths, card.version
        self.image_size, self.channels = card.image_size, card.channels
        try:
            self.reference: Reference | None = load_reference(model_dir)
        except ValueError as err:  # an incomplete reference: serve without OOD scores rather than not at all
            log.warning("monitoring: %s; serving without OOD scores", err)
            self.reference = None
        if self.reference is None:
            log.warning("monitoring: %s has no reference.npz (exported before monitoring): answers carry no OOD "
                        "score and `python -m pipeline.monitor` cannot check this model; re-export it", model_dir)
        self.identity = model_identity(card.registered_model or card.architecture, card.version,
                                       sha256_file(model_dir / CARD_FILE))
        self.log: PredictionLog | None = None
        if settings.log:
            # Each worker deletes the oldest files down to its bound minus one file when it rotates, while
            # the other workers' open files keep growing: a bound less their files keeps the folder in its bound.
            workers = max(1, settings.workers)
            file_bytes = min(DEFAULT_FILE_BYTES, settings.log_max_bytes // (2 * workers))
            bound = settings.log_max_bytes - (workers - 1) * file_bytes
            self.log = PredictionLog(paths.log_dir, max_bytes=bound, file_bytes=file_bytes)
            log.info("prediction log: %s (bound %d bytes)", paths.log_dir, settings.log_max_bytes)
        self.dropped_seen = 0
        for name in self.classes:  # every class has a series from the start: an alert on a rate sees 0, not nothing
            PREDICTIONS.labels(name)

    def statistics(self, pixels: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """N×3: each image's mean and std intensity and OOD score (NaN without a reference), appended
        to the model's rows where the model runs (:meth:`observe` reads them back)."""
        stats = AnswerStats.of(pixels, embedding, self.reference)
        scores = stats.ood_score if stats.ood_score is not None else np.full(len(pixels), np.nan)
        return np.column_stack([stats.mean_intensity, stats.std_intensity, scores])

    def observe(self, endpoint: str, rows: np.ndarray, uploads: Sequence[UploadFacts | None]
                ) -> list[tuple[float | None, bool | None]]:
        """Count and log N answers from their rows (probabilities, embedding, :meth:`statistics`);
        their (OOD score, flag), None without a reference."""
        k = len(self.classes)
        probabilities, embedding, extra = rows[:, :k], rows[:, k:-3], rows[:, -3:].astype(np.float64)
        scores = extra[:, 2] if self.reference is not None else None
        predicted = probabilities.argmax(axis=1)
        flags: list[tuple[float | None, bool | None]] = []
        for row, index in enumerate(predicted.tolist()):
            PREDICTIONS.labels(self.classes[index]).inc()
            CONFIDENCE.observe(float(probabilities[row, index]))
            if scores is None:
                flags.append((None, None))
                continue
            score, ood = self.reference.flag(scores[row])
            if ood:
                OUT_OF_DISTRIBUTION.inc()
            flags.append((score, ood))
        if self.log is not None:
            stats = AnswerStats(extra[:, 0], extra[:, 1], scores)
            # the record is built on the log's thread from these values: the answer pays one append
            self.log.log(deferred(partial(feature_records, probabilities, embedding, None, self.classes,
                                          self.reference, uploads=list(uploads), stats=stats),
                                  self.identity, endpoint, time.time()))
            if (dropped := self.log.dropped) > self.dropped_seen:
                LOG_DROPPED.inc(dropped - self.dropped_seen)
                self.dropped_seen = dropped
        return flags

    def close(self) -> None:
        """Write the prediction log's queued records and stop its thread (a worker shutting down)."""
        if self.log is not None:
            self.log.close()

    def reference_counts(self) -> dict[str, int] | None:
        if self.reference is None:
            return None
        counts = np.bincount(self.reference.predicted.astype(np.int64), minlength=len(self.classes))
        return {name: int(count) for name, count in zip(self.classes, counts, strict=False)}

    def panel(self) -> dict:
        """``GET /monitoring``: traffic's predicted classes beside the reference's, and the last drift verdict."""
        return {"model": self.identity, "traffic": traffic_counts(self.classes), "reference": self.reference_counts(),
                "ood_threshold": self.reference.ood_threshold if self.reference is not None else None,
                "drift": last_drift(self.paths.drift_report)}


def ood_headers(score: float | None, ood: bool | None) -> dict[str, str]:
    """``/saliency``'s PNG answer carries the OOD score and flag as headers (none without a reference)."""
    return {} if score is None else {"X-OOD-Score": f"{score:.4f}", "X-OOD": str(bool(ood)).lower()}


async def store_feedback(monitor: Monitor, data: bytes, label: str, settings: Settings,
                         pool: Executor) -> FeedbackStored:
    """``POST /feedback``: the label checked as a class (400), the upload as for ``/predict`` (413/415/422), stored.

    Args:
        monitor: the worker's :class:`Monitor` (the classes, the model version, the review folder).
        data: the uploaded image's bytes, stored unchanged (uploads are stored only for feedback).
        label: the right class name.
        pool: where the blocking checks and writes run (the service's decoding threads).
    """
    loop = asyncio.get_running_loop()
    if label not in monitor.classes:
        raise FieldError(f"label: {label!r} is not a class of this model (one of: {', '.join(monitor.classes)})")
    # checked and decoded whole, as /predict would: a truncated file must not reach the dataset and break preprocess
    await loop.run_in_executor(pool, uploads.prepare, data, "image", monitor.image_size, monitor.channels, settings)
    try:
        path = await loop.run_in_executor(pool, write_feedback, monitor.paths.review_dir, data, label,
                                          monitor.classes, monitor.version)
    except FeedbackError as err:  # a format the dataset cannot hold: what /predict answers 415 to
        raise ImageRejected(f"image: {err}", error_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE) from None
    log.info("feedback: %s stored as class %s", path.stem[:12], label)
    return FeedbackStored(stored=path.stem, label=label)


def traffic_counts(classes: Sequence[str]) -> dict[str, int]:
    """``classifier_predictions_total`` per class, summed over every worker (this one's without multiprocess)."""
    registry = prometheus_client.REGISTRY
    if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, directory)
    counts = dict.fromkeys(classes, 0)
    for family in registry.collect():
        if family.name == "classifier_predictions":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("class") in counts:
                    counts[sample.labels["class"]] += int(sample.value)
    return counts


def last_drift(path: Path) -> dict:
    """The drift verdict in ``path`` (``drift.json``) in brief; ``{"checked": False, ...}`` when there is none."""
    try:
        document = json.loads(path.read_text())
        drift = document["drift"]
    except FileNotFoundError:
        return {"checked": False, "message": "no drift check yet"}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {"checked": False, "message": f"the last drift report is unreadable ({type(err).__name__})"}
    signals = document.get("signals") or {}
    fired = sorted(name for name, entry in signals.items() if isinstance(entry, dict) and entry.get("drift"))
    return {"checked": True, "drift": bool(drift), "signals": fired, "model": document.get("model"),
            "window": document.get("window"), "time": _mtime(path)}


def _mtime(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def monitoring_page(_: Request) -> JSONResponse:
    import bentoml

    return JSONResponse(bentoml.get_current_service().monitor.panel())


def routes() -> list[Route]:
    return [Route("/monitoring", monitoring_page, methods=["GET"])]
