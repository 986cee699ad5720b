"""Request metrics with bounded labels on ``/metrics``, without the gauges of dead workers.

BentoML labels its request metrics with the raw path (every 404 path adds series; no setting
bounds it) and never marks a SIGKILLed worker's multiprocess gauge files dead, so its in-progress
gauge stays up for good. The service turns BentoML's metrics off (``metrics={"enabled": False}``)
and records its own: ``classifier_requests_total{endpoint,method,status}``,
``classifier_request_duration_seconds{endpoint}`` and ``classifier_requests_in_progress{endpoint}``
(summed over live workers: the gauge to autoscale on), each ``endpoint`` a known path, a static
folder or ``/unknown``. :func:`metrics_page` serves them (with ``classifier_batch_size``) from
prometheus_client's multiprocess collector, after dropping the gauge files of worker processes
that no longer exist (``multiprocess.mark_process_dead``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable

import prometheus_client
from prometheus_client import multiprocess
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger(__name__)
METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"})
REQUESTS = prometheus_client.Counter("classifier_requests", "HTTP requests answered",
                                     ["endpoint", "method", "status"])
DURATION = prometheus_client.Histogram("classifier_request_duration_seconds", "Time to answer a request",
                                       ["endpoint"])
IN_PROGRESS = prometheus_client.Gauge("classifier_requests_in_progress", "Requests being answered (live workers)",
                                      ["endpoint"], multiprocess_mode="livesum")
LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")  # prometheus_client's per-process file of a live* gauge


def label_of(path: str, known: frozenset[str], folders: tuple[str, ...]) -> str:
    """``path`` itself for known routes, its folder for static files, else ``/unknown``."""
    if path in known:
        return path
    for prefix in folders:
        if path.startswith(prefix):
            return prefix.rstrip("/")
    return "/unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_dead_workers(directory: str | None = None) -> list[int]:
    """Mark dead every process with live-gauge files in the multiprocess directory that no longer runs."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return []
    pids = {int(m.group(1)) for name in os.listdir(directory) if (m := LIVE_GAUGE_FILE.match(name))}
    dead = sorted(pid for pid in pids if not pid_alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return dead


async def metrics_page(_: Request) -> Response:
    """Every worker's metrics (one worker answers for all), the dead ones' gauges dropped first."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    registry = prometheus_client.REGISTRY
    if directory:
        if dead := drop_dead_workers(directory):
            log.info("dropped the live gauges of dead worker processes %s", dead)
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, directory)
    return Response(prometheus_client.generate_latest(registry), media_type=prometheus_client.CONTENT_TYPE_LATEST)


def routes() -> list[Route]:
    return [Route("/metrics", metrics_page, methods=["GET"])]


class RequestMetrics:
    """ASGI middleware: counts, times and gauges every HTTP request under a bounded label."""

    def __init__(self, app, known: Iterable[str], folders: Iterable[str]) -> None:
        self.app, self.known, self.folders = app, frozenset(known), tuple(folders)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = label_of(scope["path"], self.known, self.folders)
        method = scope["method"] if scope["method"] in METHODS else "other"
        status = 500  # if the app raises before answering
        started = time.perf_counter()

        async def recorded(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_progress = IN_PROGRESS.labels(endpoint)
        in_progress.inc()
        try:
            await self.app(scope, receive, recorded)
        finally:
            in_progress.dec()
            elapsed = time.perf_counter() - started
            REQUESTS.labels(endpoint, method, str(status)).inc()
            DURATION.labels(endpoint).observe(elapsed)


