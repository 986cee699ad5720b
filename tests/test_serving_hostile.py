"""Issue 10's thirteen findings, each reproduced against a real ``bentoml serve`` behind its HTTP
front (``python -m pipeline.serve``, as ``make serve`` runs it), over HTTP.

One server for the module (small limits so the cases stay quick); finding 11 starts its own,
broken, servers. Timings belong to bench/serve.py: the deadlines here only bound hangs.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.lib.local_server import LocalServer
from tests.conftest import burst, serving, write_export

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "owl"]  # conftest.SERVING_CLASSES
LIMITS = {  # the module server's settings
    "SERVING_WORKERS": "1", "SERVING_MAX_BYTES": "2000000", "SERVING_MAX_PIXELS": "4000000",
    "SERVING_MAX_BATCH_PIXELS": "4000000", "SERVING_MAX_CONCURRENCY": "8",
}
MOVED = "moved to the front: tests/test_front.py"


def png(width: int = 40, height: int = 30, seed: int = 0, trailer: bytes = b"") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue() + trailer  # Pillow ignores bytes after IEND


PHOTO = png()


@pytest.fixture(scope="module")
def tmpdir_of_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server_tmp")


@pytest.fixture(scope="module")
def server(exported_model: Path, tmp_path_factory: pytest.TempPathFactory, tmpdir_of_server: Path
           ) -> Iterator[LocalServer]:
    with serving(tmp_path_factory.mktemp("hostile_home"), SERVING_MODEL=str(exported_model),
                          TMPDIR=str(tmpdir_of_server), **LIMITS) as running:
        yield running


def error_of(response: httpx.Response, status: int) -> str:
    """The JSON error message, after checking the status and the body's shape."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return body["error"]


def predict_works(http: httpx.Client) -> None:
    response = http.post("/predict", files={"image": ("a.png", PHOTO)})
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] != []


# ----------------------------------------------------------------------------- 1. unknown fields
@pytest.mark.timeout(60)
def test_f01_a_file_under_a_field_the_endpoint_lacks_is_400(http: httpx.Client) -> None:
    assert error_of(http.post("/predict", files={"file": ("a.png", PHOTO)}), 400).startswith("'file': unknown field")
    message = error_of(http.post("/predict", files={"image": ("a.png", PHOTO), "k": ("k.png", PHOTO)}), 400)
    assert message.startswith("k: expected a text value")
    message = error_of(http.post("/predict_batch", files={"images": ("a.png", PHOTO), "image": ("b.png", PHOTO)}), 400)
    assert message.startswith("'image': unknown field")
    predict_works(http)


# ----------------------------------------------------------------------------- 2. text where a file belongs
class Listener:
    """A TCP port that records whether anyone connected to it (the URL a client names)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/cat.png"
        self.connections = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.timeout(60)
def test_f02_text_where_a_file_belongs_is_400_and_never_fetched(http: httpx.Client) -> None:
    listener = Listener()
    try:
        cases = [
            ("/predict", {"files": {"image": (None, listener.url)}}, "image"),  # curl -F image=URL
            ("/predict", {"files": {"image": (None, "abc")}}, "image"),  # curl -F image=abc
            ("/predict", {"data": {"image": listener.url}}, "image"),  # curl -d image=URL
            ("/predict_batch", {"files": {"images": (None, listener.url)}}, "images"),  # -F images=URL
            ("/saliency", {"data": {"image": "/etc/passwd"}}, "image"),  # a server path
        ]
        for path, kwargs, field in cases:
            message = error_of(http.post(path, **kwargs), 400)
            assert message.startswith(f"{field}: expected a file upload"), message
        assert error_of(http.post("/predict", json={"image": listener.url}), 400).startswith("image: missing")
        time.sleep(0.5)
        assert listener.connections == 0  # no outbound request, ever
    finally:
        listener.close()


# ----------------------------------------------------------------------------- 3. oversized values
@pytest.mark.timeout(60)
def test_f03_oversized_field_values_are_400_naming_the_field(http: httpx.Client) -> None:
    digits = "9" * 5000
    upload = {"image": ("a.png", PHOTO)}
    assert error_of(http.post("/predict", files=upload, data={"k": digits}), 400).startswith("k: 5000 characters")
    for value in (digits, "[" * 100_000, "{" * 100_000):
        message = error_of(http.post("/saliency", files=upload, data={"target": value}), 400)
        assert message.startswith(f"target: {len(value)} characters"), message
    assert error_of(http.post("/predict", files=upload, data={"k": "[" * 100}), 400).startswith("k: ")
    predict_works(http)


# ----------------------------------------------------------------------------- 4. filenames
@pytest.mark.timeout(60)
def test_f04_long_and_odd_filenames_are_ignored(http: httpx.Client) -> None:
    names = ["a" * 300 + ".png", "é" * 200 + ".png", "../../../etc/passwd", "name with spaces;.png", ".", "a/b\\c"]
    for name in names:
        response = http.post("/predict", files={"image": (name, PHOTO)})
        assert response.status_code == 200, (name, response.text)
    # filename="" makes the part a text field to the form parser: refused by name, not decoded
    message = error_of(http.post("/predict", files={"image": ("", PHOTO)}), 400)
    assert message.startswith("image: expected a file upload")
    batch = http.post("/predict_batch", files=[("images", ("x" * 1000, PHOTO)), ("images", ("y" * 255, PHOTO))])
    assert batch.status_code == 200 and len(batch.json()["predictions"]) == 2


# ----------------------------------------------------------------------------- 5. decoder errors
@pytest.mark.timeout(180)
def test_f05_malformed_and_mutated_files_get_4xx(http: httpx.Client) -> None:
    from test_decode_fuzz import SEEDS, mutate, outside_allowlist

    statuses: dict[int, int] = {}
    for name, data in outside_allowlist().items():
        response = http.post("/predict", files={"image": (f"x.{name}", data)})
        if response.status_code != 200:
            error_of(response, response.status_code)
        assert response.status_code in ((200, 422) if name.startswith("float_tiff") else (400, 415)), name
    rng = np.random.default_rng(10)
    for i in range(300):  # 50 per seed over HTTP; the in-process fuzz test runs thousands
        seed = sorted(SEEDS)[i % len(SEEDS)]
        response = http.post("/predict", files={"image": (f"m.{seed}", mutate(SEEDS[seed], rng))})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            assert error_of(response, response.status_code).startswith("image: ")
    assert set(statuses) <= {200, 400, 413, 415, 422}, statuses
    predict_works(http)


# ----------------------------------------------------------------------------- 6. booleans
@pytest.mark.timeout(60)
def test_f06_booleans_are_not_class_indices(http: httpx.Client) -> None:
    upload = {"image": ("a.png", PHOTO)}
    for value in ("true", "false"):
        assert error_of(http.post("/saliency", files=upload, data={"target": value}), 400).startswith("target: ")
        assert error_of(http.post("/predict", files=upload, data={"k": value}), 400).startswith("k: ")
    ok = http.post("/saliency", files=upload, data={"target": "1", "format": "json"})
    assert ok.status_code == 200 and ok.json()["target"]["label"] == "dog"
    ok = http.post("/saliency", files=upload, data={"target": '"owl"', "format": "json"})  # BentoML's client
    assert ok.status_code == 200 and ok.json()["target"]["label"] == "owl"


# ----------------------------------------------------------------------------- 7. one heavy request
@pytest.mark.timeout(120)
def test_f07_a_batch_is_bounded_by_total_decoded_pixels(http: httpx.Client) -> None:
    flat = io.BytesIO()
    Image.new("L", (1500, 1500), 7).save(flat, "PNG")
    big = flat.getvalue()  # 2.25 MP each in a few KB, as in the issue; the server allows 4 MP per request
    files = [("images", ("a.png", big)), ("images", ("b.png", big))]
    message = error_of(http.post("/predict_batch", files=files), 413)
    assert message.startswith("images: 4500000 decoded pixels in all") and "SERVING_MAX_BATCH_PIXELS" in message
    # Within the budget it is served, and a small request beside it is served too (the
    # decode pool takes turns; bench/serve.py measures what it costs the others).
    results: dict[str, int] = {}

    def heavy() -> None:
        results["heavy"] = http.post("/predict_batch", files=files[:1] * 1).status_code

    thread = threading.Thread(target=heavy)
    thread.start()
    predict_works(http)
    thread.join(60)
    assert results == {"heavy": 200}


# ----------------------------------------------------------------------------- 8, 9. slow clients, overload
# The protocol-level findings (slow headers and bodies, requests that are not HTTP, overload
# refused before the body is read) belong to the HTTP front now: tests/test_front.py.


@pytest.mark.timeout(120)
def test_f09_a_burst_over_the_concurrency_limit_gets_200_or_503_with_retry_after(server: LocalServer) -> None:
    """A burst far over SERVING_MAX_CONCURRENCY (8): every answer is a 200 or the documented 503."""
    statuses, headers_ok = burst(server.url, 48, 6, PHOTO)
    assert len(statuses) == 48 * 6 and set(statuses) <= {200, 503}, sorted(set(statuses))
    assert all(headers_ok) and 200 in statuses
    print("burst of 48 x 6:", {status: statuses.count(status) for status in sorted(set(statuses))})


# ----------------------------------------------------------------------------- 10. /metrics
@pytest.mark.timeout(120)
def test_f10_metrics_do_not_grow_with_unknown_paths(http: httpx.Client) -> None:
    http.get("/nope-warmup")
    before = len(http.get("/metrics").content)
    rng = np.random.default_rng(0)
    for i in range(300):
        path = "/" + "".join(rng.choice(list("abcdefghij"), 200)) + f"/{i}"
        assert error_of(http.request("GET" if i % 2 else "POST", path), 404).startswith("path: no such endpoint")
    metrics = http.get("/metrics").text
    assert len(metrics) - before < 5000, len(metrics) - before  # 300 paths × ~20 series each before the fix
    assert 'endpoint="/unknown"' in metrics and "abcdefghij"[:3] * 3 not in metrics
    assert not re.search(r'endpoint="/[a-j]{50,}', metrics)


# ----------------------------------------------------------------------------- 12. the schema
@pytest.mark.timeout(60)
def test_f12_docs_json_declares_what_the_service_does(http: httpx.Client) -> None:
    spec = http.get("/docs.json").json()
    paths = spec["paths"]
    assert spec["components"]["schemas"]["Error"]["properties"] == {"error": {
        "type": "string", "description": "what is wrong, starting with the field's name"}}
    for path in ("/predict", "/predict_batch", "/saliency"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "413", "415", "422", "503"}, path
        assert "Retry-After" in responses["503"]["headers"]
        assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
                   for status, r in responses.items() if status != "200")
    assert set(paths["/saliency"]["post"]["responses"]["200"]["content"]) == {"image/png", "application/json"}
    form = paths["/saliency"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["target"]["anyOf"] == [{"type": "integer", "minimum": 0, "maximum": 2},
                                       {"type": "string", "enum": CLASSES}]
    batch = paths["/predict_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert batch["properties"]["images"]["maxItems"] == 64 and batch["additionalProperties"] is False
    assert "get" in paths["/metadata"] and "post" in paths["/metadata"]


@pytest.mark.timeout(300)
def test_f12_schemathesis_all_checks_pass(server: LocalServer, tmp_path: Path) -> None:
    """schemathesis (README: the command for `make serve`) with every check, bounded examples."""
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/docs.json",
               "--checks", "all", "--max-examples", "25", "--seed", "10", "--workers", "1",
               "--request-timeout", "30", "--report-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    summary = done.stdout[-4000:]
    assert done.returncode == 0, summary
    assert re.search(r"\d+ generated, \d+ passed", summary), summary


# ----------------------------------------------------------------------------- 13. leaks
@pytest.mark.timeout(60)
def test_f13_metadata_has_no_absolute_path(http: httpx.Client, exported_model: Path) -> None:
    text = http.get("/metadata").text
    assert str(exported_model) not in text and str(exported_model.parent) not in text
    assert json.loads(text)["source"] == exported_model.name


@pytest.mark.timeout(60)
def test_f13_the_docs_page_loads_nothing_from_elsewhere(http: httpx.Client) -> None:
    assert http.get("/").headers["location"] == "/ui/"  # the root leads to the web UI (its own test)
    page = http.get("/docs")
    assert page.status_code == 200 and "googletagmanager" not in page.text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text), page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r"""(?:src|href)="\./([^"]+)""", page.text):
        response = http.get(f"/{asset}")
        assert response.status_code == 200, asset
        assert "googletagmanager" not in response.text.lower()


@pytest.mark.timeout(60)
def test_f13_telemetry_is_off(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK")}
    code = ("import serving.service\nfrom bentoml._internal.utils.analytics import usage_stats as u\n"
            "print(u.do_not_track())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "BENTOML_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1:] == ["True"], done.stderr[-2000:]
    makefile = (ROOT / "Makefile").read_text()
    for switch in ("BENTOML_DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        assert re.search(rf"^export {switch}\b", makefile, re.M), switch


@pytest.mark.timeout(180)
def test_f13_upload_files_do_not_outlive_a_killed_worker(server: LocalServer, tmpdir_of_server: Path) -> None:
    import psutil

    marker = b"upload-marker-7d1f"
    body = png(400, 400, seed=9, trailer=marker * 1000)
    stop = threading.Event()

    def keep_uploading() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                try:
                    client.post("/predict", files={"image": ("m.png", body)})
                except httpx.HTTPError:
                    time.sleep(0.1)

    workers_before = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)
                      if "_bentoml_impl.worker" in " ".join(p.cmdline())}
    assert workers_before
    threads = [threading.Thread(target=keep_uploading) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    for pid in workers_before:
        os.kill(pid, 9)  # mid-request: four clients are uploading all the time
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(30)
    server.wait_ready()  # the supervisor restarted the worker
    workers_after = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)
                     if "_bentoml_impl.worker" in " ".join(p.cmdline())}
    assert workers_after and not workers_after & workers_before
    leftovers = [p for p in tmpdir_of_server.rglob("*") if p.is_file() and marker in p.read_bytes()]
    assert leftovers == []


# ----------------------------------------------------------------------------- 11. broken models
def broken_models(exported_model: Path, root: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    truncated, no_saliency = root / "truncated", root / "no_saliency"
    shutil.copytree(exported_model, truncated)
    data = (truncated / "classifier.onnx").read_bytes()
    (truncated / "classifier.onnx").write_bytes(data[: len(data) // 3])
    shutil.copytree(exported_model, no_saliency)
    (no_saliency / "saliency.onnx").unlink()
    mixed = root / "mixed"  # a saliency graph from another export: never served with this classifier
    shutil.copytree(exported_model, mixed)
    write_export(root / "other", seed=1)
    shutil.copy(root / "other" / "saliency.onnx", mixed / "saliency.onnx")
    return {
        "missing folder": (root / "nowhere", "no such folder"),
        "truncated classifier.onnx": (truncated, str(truncated / "classifier.onnx")),
        "no saliency.onnx": (no_saliency, "saliency.onnx: missing"),
        "saliency.onnx of another export": (mixed, "saliency.onnx: content does not match the sha256"),
    }


@pytest.mark.timeout(240)
def test_f11_a_model_that_cannot_load_stops_the_server(exported_model: Path, tmp_path: Path) -> None:
    timings = {}
    for name, (folder, expected) in broken_models(exported_model, tmp_path).items():
        home = tmp_path / f"home_{len(timings)}"
        home.mkdir()
        start = time.monotonic()
        server = LocalServer(home, SERVING_MODEL=str(folder), SERVING_WORKERS="1")
        try:
            code = server.process.wait(60)  # bounds a hang; it exits in seconds (printed below)
        except subprocess.TimeoutExpired:
            server.stop()
            pytest.fail(f"{name}: still running after 60 s:\n{server.log()}")
        timings[name] = time.monotonic() - start
        errors = [line for line in server.log().splitlines() if line.startswith("error: cannot serve the model")]
        assert code != 0 and len(errors) == 1 and expected in errors[0], (name, code, server.log())
        assert "Traceback" not in server.log(), server.log()
    print("exit after:", {name: f"{seconds:.1f} s" for name, seconds in timings.items()})


# ----------------------------------------------------------------------------- issue 18: the service's own findings
def progressive_bomb(side: int = 5000, repeats: int = 3000) -> bytes:
    """The issue's 224 KB bomb: a flat progressive 5000x5000 JPEG whose last scan is repeated 3,000 times."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")  # the last SOS marker: its scan runs to the EOI marker
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


@pytest.fixture(scope="module")
def default_server(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """The default limits (25 MP per image), two workers."""
    with serving(tmp_path_factory.mktemp("default_home"), SERVING_MODEL=str(exported_model),
                          SERVING_WORKERS="2") as running:
        yield running


@pytest.mark.timeout(120)
def test_f14_progressive_jpeg_bombs_are_refused_and_others_are_served(default_server: LocalServer) -> None:
    bomb = progressive_bomb()
    answers: dict[str, tuple[int, str, float]] = {}
    normal: list[int] = []
    done = threading.Event()

    def send_bomb(name: str) -> None:
        start = time.monotonic()
        with httpx.Client(base_url=default_server.url, timeout=120) as client:
            response = client.post("/predict", files={"image": ("bomb.jpg", bomb)})
        answers[name] = (response.status_code, response.json()["error"], time.monotonic() - start)

    def normal_client() -> None:
        with httpx.Client(base_url=default_server.url, timeout=120) as client:
            while not done.is_set() or len(normal) < 5:
                normal.append(client.post("/predict", files={"image": ("a.png", PHOTO)}).status_code)

    threads = [threading.Thread(target=send_bomb, args=(name,)) for name in ("a", "b")]
    other = threading.Thread(target=normal_client)
    other.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    done.set()
    other.join(60)
    assert len(bomb) < 250_000 and sorted(answers) == ["a", "b"]
    for status, message, _ in answers.values():
        assert status == 422 and message.startswith("image: too_many_scans: a 5000x5000 JPEG"), message
    assert set(normal) == {200} and len(normal) >= 5
    print(f"bomb of {len(bomb)} bytes, two at once:", {k: f"{v[0]} in {v[2]:.2f} s" for k, v in answers.items()},
          f"beside them: {len(normal)} x 200")


def in_progress(url: str, endpoint: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf'^classifier_requests_in_progress{{endpoint="{endpoint}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(300)
def test_f15_the_in_progress_gauge_returns_to_zero_after_a_worker_is_killed(
        exported_model: Path, tmp_path: Path) -> None:
    import psutil

    # No scan budget: the bomb decodes for tens of seconds, a request that is surely in progress.
    server = LocalServer(tmp_path, SERVING_MODEL=str(exported_model), SERVING_WORKERS="2",
                         SERVING_MAX_SCAN_PIXELS=str(10**15), SERVING_TIMEOUT="600")
    try:
        server.wait_ready()
        workers = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                   if "_bentoml_impl.worker" in " ".join(p.cmdline())]
        assert len(workers) == 2
        outcome: list[str] = []

        def slow() -> None:
            try:
                response = httpx.post(f"{server.url}/predict", files={"image": ("bomb.jpg", progressive_bomb())},
                                      timeout=280)
                outcome.append(str(response.status_code))
            except httpx.HTTPError as err:
                outcome.append(type(err).__name__)

        thread = threading.Thread(target=slow)
        thread.start()
        for _ in range(600):  # bounded: until the request is counted
            if in_progress(server.url, "/predict") == 1:
                break
            time.sleep(0.1)
        assert in_progress(server.url, "/predict") == 1
        before = {p.pid: sum(p.cpu_times()[:2]) for p in workers}
        time.sleep(1.0)
        busy = max(workers, key=lambda p: sum(p.cpu_times()[:2]) - before[p.pid])  # the one decoding
        os.kill(busy.pid, 9)
        thread.join(60)
        assert outcome and outcome[0] != "200", outcome  # the client lost its answer with the worker
        readings = []
        for _ in range(300):  # bounded: until the dead worker's gauge is dropped
            readings.append(in_progress(server.url, "/predict"))
            if readings[-1] == 0:
                break
            time.sleep(0.2)
        assert readings[-1] == 0, readings[-10:]
        print(f"killed worker {busy.pid}; /predict in progress: 1 before, {readings[-1]:g} after "
              f"{len(readings)} reading(s) of /metrics")
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_f16_media_types_are_case_insensitive_and_every_answer_is_nosniff(http: httpx.Client) -> None:
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + PHOTO + b"\r\n--b--\r\n")
    upper = http.post("/predict", content=body, headers={"Content-Type": "MULTIPART/FORM-DATA; boundary=b"})
    assert upper.status_code == 200, upper.text
    answers = [upper, http.get("/docs"), http.get("/docs.json"), http.get("/nope"), http.get("/predict"),
               http.post("/predict", files={"image": ("a.txt", b"hello")}), http.get("/metadata"),
               http.get("/livez"), http.get("/ui/")]
    assert [r.status_code for r in answers] == [200, 200, 200, 404, 405, 415, 200, 200, 200]
    assert all(r.headers.get("x-content-type-options") == "nosniff" for r in answers), \
        [(r.url.path, r.headers.get("x-content-type-options")) for r in answers]
