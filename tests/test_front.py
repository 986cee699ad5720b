"""The HTTP front (nginx, ``serving/front/nginx.conf``) in front of a real ``bentoml serve``, as
``python -m pipeline.serve`` (``make serve``) runs them: issue 18's protocol findings, over raw
sockets where a client library would hide what the server did.

One server for the module, with short deadlines and a small request limit so the cases stay quick.
nginx answers a header or body deadline by closing the connection without a response (RFC 9110
allows it) and records the 408 in its access log: the tests check both. No timings are asserted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline.lib.local_server import ECHO_MODULE, ROOT, FrontSettings, LocalServer, front_config
from tests.conftest import burst, serving

pytestmark = pytest.mark.slow

MAX_REQUESTS, MAX_SERVICE_REQUESTS = 8, 2
LIMITS = {"SERVING_WORKERS": "1", "FRONT_HEADER_TIMEOUT": "2", "FRONT_BODY_TIMEOUT": "2",
          "FRONT_MAX_REQUESTS": str(MAX_REQUESTS), "FRONT_MAX_SERVICE_REQUESTS": str(MAX_SERVICE_REQUESTS),
          "FRONT_MAX_BODY_BYTES": "2000000", "FRONT_REJECT_DELAY_MS": "200"}


def png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


PHOTO = png()


@pytest.fixture(scope="module")
def server(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with serving(tmp_path_factory.mktemp("front_home"), SERVING_MODEL=str(exported_model), **LIMITS) as running:
        yield running


def connect(server: LocalServer, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (lingering close included)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received


def responses_in(raw: bytes) -> list[bytes]:
    """The status lines of the responses in ``raw``."""
    return [line for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def front_error(raw: bytes, status: int) -> str:
    """The JSON error of a single raw response, after checking its status and headers."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ".encode()), raw[:300]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers[b"content-type"] == b"application/json" and headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"server"] == b"nginx", headers  # no version
    length = int(headers[b"content-length"])
    message = json.loads(body[:length])["error"]
    assert isinstance(message, str) and message
    return message


def access_log_status(server: LocalServer, marker: str) -> list[str]:
    """The statuses the front logged for requests whose line contains ``marker``."""
    for _ in range(50):  # nginx writes the line when it closes the request
        lines = [line for line in server.access_log().splitlines() if marker in line]
        if lines:
            return [line.split('" ', 1)[1].split()[0] for line in lines]
        time.sleep(0.1)
    return []


def predict_works(http: httpx.Client) -> None:
    response = http.post("/predict", files={"image": ("a.png", PHOTO)})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]


# ----------------------------------------------------------------------------- framing
SMUGGLED = b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.timeout(180)
def test_content_length_with_transfer_encoding_gets_one_400_and_no_second_answer(server: LocalServer) -> None:
    body = b"0\r\n\r\n" + SMUGGLED  # framed by TE, the GET is a second request; framed by CL, body
    head = (f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with connect(server) as sock:
        sock.sendall(head + body)
        raw = read_until_closed(sock)
    assert len(responses_in(raw)) == 1, raw
    assert "ambiguous framing" in front_error(raw, 400)


@pytest.mark.timeout(180)
def test_content_length_twice_gets_one_400_and_no_second_answer(server: LocalServer) -> None:
    head = f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head.encode() + SMUGGLED)
        raw = read_until_closed(sock)
    assert len(responses_in(raw)) == 1, raw
    assert "Content-Length twice" in front_error(raw, 400)


@pytest.mark.timeout(180)
def test_a_chunk_size_of_2_to_the_80_is_an_immediate_400(server: LocalServer) -> None:
    head = b"POST /predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head + f"{2 ** 80:x}\r\n".encode())  # then nothing: the answer may not wait for data
        raw = read_until_closed(sock)
    assert len(responses_in(raw)) == 1
    front_error(raw, 400)


@pytest.mark.timeout(180)
def test_requests_that_are_not_http_get_a_json_400(server: LocalServer) -> None:
    big = b"POST /predict HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"  # over the 16 KiB buffers
    for request in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", big):
        with connect(server) as sock:
            sock.sendall(request)
            raw = read_until_closed(sock)
        front_error(raw, 400)


# ----------------------------------------------------------------------------- body size
@pytest.mark.timeout(120)
def test_urllib_sending_12_mib_reads_the_413_and_its_message(server: LocalServer, http: httpx.Client) -> None:
    request = urllib.request.Request(f"{server.url}/predict", data=b"\0" * (12 * 1024 * 1024), method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # not ConnectionResetError: lingering close
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert refused.value.headers["X-Content-Type-Options"] == "nosniff"
    message = json.loads(refused.value.read())["error"]
    assert message == "body: over the limit of 2000000 bytes (FRONT_MAX_BODY_BYTES)"
    predict_works(http)


@pytest.mark.timeout(180)
def test_a_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\0" * 65536  # 2.6 MB in all, no Content-Length

    response = http.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and response.headers["x-content-type-options"] == "nosniff"
    assert "FRONT_MAX_BODY_BYTES" in response.json()["error"]


# ----------------------------------------------------------------------------- deadlines
def send_slowly(sock: socket.socket, data: bytes, pause: float) -> int:
    """Send ``data`` a byte at a time with ``pause`` between bytes; the bytes sent before the
    server closed the connection (all of them if it never did)."""
    sock.settimeout(pause)
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent:sent + 1])
            if sock.recv(4096) == b"":
                return sent + 1
        except TimeoutError:
            continue
        except OSError:  # reset: closed
            return sent
    return len(data)


@pytest.mark.timeout(120)
def test_slow_headers_are_cut_off_with_408(server: LocalServer) -> None:
    marker = f"slow-headers-{uuid.uuid4().hex}"
    request = f"POST /predict?{marker} HTTP/1.1\r\nHost: t\r\nX-Padding: {'a' * 300}\r\n\r\n".encode()
    with connect(server) as sock:
        line = request.index(b"\r\n") + 2  # the request line at once (it names the request in the log)
        sock.sendall(request[:line])
        sent = line + send_slowly(sock, request[line:], pause=0.25)  # 4 bytes a second: 80 s for all of it
        sock.settimeout(30)
        rest = read_until_closed(sock)
    assert sent < len(request) and rest == b""  # closed with the header block unfinished
    assert access_log_status(server, marker) == ["408"]


@pytest.mark.timeout(120)
def test_a_stalled_body_is_cut_off_with_408_and_the_service_never_sees_it(server: LocalServer) -> None:
    marker = f"slow-body-{uuid.uuid4().hex}"
    head = (f"POST /predict?{marker} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: 5000\r\n\r\n").encode()
    with connect(server) as sock:
        sock.sendall(head)
        sent = send_slowly(sock, b"--b\r\n", pause=0.25)  # a trickle, then the client stalls
        sock.settimeout(30)
        rest = read_until_closed(sock)  # the stall outlasts FRONT_BODY_TIMEOUT (2 s)
    assert sent == 5 and rest == b""
    assert access_log_status(server, marker) == ["408"]
    assert marker not in server.log()  # the request never reached the service


@pytest.mark.timeout(120)
def test_slow_uploaders_do_not_take_the_services_capacity(server: LocalServer, http: httpx.Client) -> None:
    """Bodies arrive at the front before the service sees the request: while MAX_REQUESTS - 1 clients
    (more than MAX_SERVICE_REQUESTS) trickle their uploads, quick requests are all served."""
    holders = []
    for _ in range(MAX_REQUESTS - 1):
        sock = connect(server)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n--b")
        holders.append(sock)
    try:
        statuses = [http.post("/predict", files={"image": ("a.png", PHOTO)}).status_code for _ in range(20)]
    finally:
        for sock in holders:
            sock.close()
    assert statuses == [200] * 20


# ----------------------------------------------------------------------------- overload
def hold_slots(server: LocalServer, count: int) -> list[socket.socket]:
    """``count`` requests in progress at the front: headers sent, body started and left unfinished."""
    holders = []
    for _ in range(count):
        sock = connect(server)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n--b")
        holders.append(sock)
    return holders


def wait_until_held(server: LocalServer, count: int) -> None:
    """Until the front counts ``count`` requests in progress (the next one is refused)."""
    for _ in range(100):
        with connect(server) as sock:
            sock.sendall(b"GET /ui/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            if read_until_closed(sock).startswith(b"HTTP/1.1 503"):
                return
        time.sleep(0.05)
    raise AssertionError(f"the front never counted {count} requests in progress")


@pytest.mark.timeout(120)
def test_when_full_the_503_and_retry_after_come_before_the_body(server: LocalServer, http: httpx.Client) -> None:
    holders = hold_slots(server, MAX_REQUESTS)
    try:
        wait_until_held(server, MAX_REQUESTS)
        with connect(server) as sock:  # headers only, a large body announced and never sent (no Expect)
            sent = time.monotonic()
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 1900000\r\n\r\n")  # under FRONT_MAX_BODY_BYTES
            raw = sock.recv(65536)
            waited = time.monotonic() - sent
        # FRONT_REJECT_DELAY_MS holds it back, so a client retrying at once cannot spin (a wait, not a speed)
        assert waited >= 0.2, waited
        assert b"\r\nRetry-After: 1\r\n" in raw.partition(b"\r\n\r\n")[0]
        assert "overloaded" in front_error(raw, 503)
        probe = http.get("/readyz")  # health probes stay answerable when full
        assert probe.status_code == 200
    finally:
        for sock in holders:
            sock.close()
    for _ in range(100):  # the slots free as the front notices the closed connections
        if http.post("/predict", files={"image": ("a.png", PHOTO)}).status_code == 200:
            break
        time.sleep(0.05)
    predict_works(http)


@pytest.mark.timeout(120)
def test_a_burst_far_over_the_limits_gets_200_or_503_with_retry_after(server: LocalServer) -> None:
    statuses, refusals_ok = burst(server.url, 6 * MAX_REQUESTS, 6, PHOTO)
    assert len(statuses) == 6 * 6 * MAX_REQUESTS and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 200 in statuses and 503 in statuses and all(refusals_ok)


# ----------------------------------------------------------------------------- headers
@pytest.mark.timeout(180)
def test_no_version_in_server_headers(http: httpx.Client) -> None:
    for response in (http.get("/livez"), http.get("/nope"), http.post("/predict", files={"image": ("a.png", PHOTO)})):
        assert response.headers["server"] == "nginx", response.headers  # not uvicorn, no version
    assert http.get("/nope").status_code == 404  # the service's own errors pass through unchanged


@pytest.mark.timeout(180)
def test_trace_which_nginx_refuses_itself_is_a_json_405_with_allow(http: httpx.Client) -> None:
    for path, allow in (("/predict", "POST"), ("/metadata?x=1", "GET, POST"), ("/readyz", "GET, HEAD")):
        response = http.request("TRACE", path)
        assert response.status_code == 405 and response.headers["allow"] == allow, (path, response.headers)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json() == {"error": f"method: TRACE is not allowed; allowed: {allow}"}


# ----------------------------------------------------------------------------- the launcher
def running(pids: list[int]) -> list[str]:
    """The command lines of those of ``pids`` still running (zombies are gone)."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(proc.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.timeout(180)
def test_sigint_to_the_launcher_stops_the_front_and_the_service(exported_model: Path, tmp_path: Path) -> None:
    server = LocalServer(tmp_path, SERVING_MODEL=str(exported_model), SERVING_WORKERS="1")
    try:
        server.wait_ready()
        tree = [server.process.pid] + [p.pid for p in psutil.Process(server.process.pid).children(recursive=True)]
        names = " ".join(" ".join(psutil.Process(pid).cmdline()) for pid in tree)
        assert "nginx: master process" in names and "bentoml serve" in names, names
        server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert server.process.wait(60) == 0
        for _ in range(100):  # the last of nginx's and BentoML's children exit just after their parents
            if not running(tree):
                break
            time.sleep(0.1)
        assert running(tree) == []
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_a_missing_nginx_is_one_line_naming_the_debian_package(tmp_path: Path) -> None:
    env = {**os.environ, "FRONT_NGINX": str(tmp_path / "nginx")}  # where no nginx is
    line = ("error: nginx not found: the HTTP front needs it; install the Debian package 'nginx' "
            "(sudo apt-get install -y nginx)")
    for check in ([], ["--check"]):  # `make serve` runs --check first, before importing the model
        done = subprocess.run([sys.executable, "-m", "pipeline.serve", "--port", "0", *check], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [line], done.stderr
    assert subprocess.run([sys.executable, "-m", "pipeline.serve", "--check"], cwd=ROOT, timeout=60).returncode == 0


def test_the_overload_reply_waits_only_when_asked_and_the_module_is_there(tmp_path: Path) -> None:
    settings = FrontSettings.from_env({"FRONT_REJECT_DELAY_MS": "0"})
    at_once = front_config(settings, "127.0.0.1", 3000, "127.0.0.1:3001", tmp_path)
    assert "load_module" not in at_once and "echo_sleep" not in at_once
    assert "error_page 503 /__front/503;" in at_once
    waiting = front_config(FrontSettings.from_env({}), "127.0.0.1", 3000, "127.0.0.1:3001", tmp_path)
    assert f"load_module {ECHO_MODULE};" in waiting and "echo_sleep 0.050; echo_exec $1;" in waiting
    assert "error_page 503 /__front/wait/__front/503;" in waiting
