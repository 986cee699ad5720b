"""bench/serve.py's h2load generator (nghttp2-client, installed by .ci/run) read back right: statuses
and latencies from h2load's per-request log, driven against a small real HTTP server whose answers
and delays are known."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SLOW_MS = 40  # the server holds every 503 back this long; 200s go at once


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # head and body in one write: no Nagle + delayed-ACK wait on the 200s
    disable_nagle_algorithm = True
    counts: dict[int, int] = {200: 0, 503: 0}
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            status = 503 if sum(self.counts.values()) % 3 == 2 else 200  # every third request
            self.counts[status] += 1
        if status == 503:
            threading.Event().wait(SLOW_MS / 1e3)
        payload = str(len(body)).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_h2load_run_reads_statuses_and_latencies_from_its_log():
    assert shutil.which("h2load"), "h2load missing: apt-get install nghttp2-client (.ci/run installs it)"
    bench = load_bench()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        request = bench.http_request("/predict", bench.multipart([("image", b"\x89PNG" + bytes(1000))]))
        started: list[bool] = []
        record, cpu_s = bench.h2load_run(f"http://127.0.0.1:{server.server_port}", 4, request, 1.0, 0.5,
                                         lambda: started.append(True))
    finally:
        server.shutdown()
    assert started == [True]
    statuses = [status for status, _ in record.samples]
    ok = [ms for status, ms in record.samples if status == 200]
    shed = [ms for status, ms in record.samples if status == 503]
    assert set(statuses) == {200, 503}, statuses[:20]
    # the measured part only (no warm-up requests), every third one a 503
    assert len(statuses) < sum(Handler.counts.values())
    assert abs(len(shed) / len(statuses) - 1 / 3) < 0.1
    # milliseconds: each 503 took at least the server's hold, and the 200s far less
    assert min(shed) >= SLOW_MS * 0.95
    assert np.median(ok) < SLOW_MS
    assert 0 <= cpu_s < 2.0
    row = record.row()
    assert row["statuses"] == {200: len(ok), 503: len(shed)}
    assert row["ok/s"] == pytest.approx(len(ok) / 1.0)
