"""The real thing: ``bentoml serve serving.service:Classifier`` behind its HTTP front (``python -m
pipeline.serve``, as ``make serve`` runs them) in a subprocess, driven over HTTP.

One server per module on the ``exported_model`` fixture (a folder); a second one serves the
same model by tag after ``python -m serving.store import-export``, and ``bentoml build``
packs it. BENTOML_HOME is a temporary folder throughout.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from pipeline.common import images
from pipeline.lib.codebase import import_closure
from pipeline.lib.local_server import LocalServer
from tests.conftest import serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIZE, CHANNELS = 32, 1  # the exported_model fixture's input ...
CLASSES = ["cat", "dog", "owl"]  # ... and classes (conftest.SERVING_CLASSES)
MAX_BYTES = 1_000_000  # the server's SERVING_MAX_BYTES, small to keep the upload short


@pytest.fixture(scope="module")
def server(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with serving(tmp_path_factory.mktemp("bentoml_home"), SERVING_MODEL=str(exported_model),
                          SERVING_MAX_BYTES=str(MAX_BYTES), FRONT_MAX_BODY_BYTES=str(MAX_BYTES)) as running:
        yield running


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(buffer, "PNG")  # mode from the shape
    return buffer.getvalue()


PHOTOS = [png(40, 30, seed=1), png(32, 32, "L", seed=2), png(64, 48, seed=3), png(90, 90, seed=4)]


def expected_probabilities(model_dir: Path, blobs: list[bytes]) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "classifier.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([images.preprocess(blob, SIZE, CHANNELS) for blob in blobs])
    return session.run(["probabilities"], {"image": batch})[0]


def predict_works(http: httpx.Client) -> None:
    response = http.post("/predict", files={"image": ("photo.png", PHOTOS[0], "image/png")})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3


# ----------------------------------------------------------------------------- endpoints
def test_predict_matches_onnxruntime(http: httpx.Client, exported_model: Path) -> None:
    expected = expected_probabilities(exported_model, PHOTOS)
    for blob, want in zip(PHOTOS, expected, strict=True):
        body = http.post("/predict", files={"image": ("photo.png", blob)}, data={"k": "2"}).json()
        assert (body["model"], body["version"]) == ("cnn-classifier", "7")
        top = body["predictions"]
        assert [p["index"] for p in top] == list(np.argsort(-want)[:2])
        assert top[0]["label"] == CLASSES[int(want.argmax())]
        assert top[0]["probability"] == pytest.approx(float(want.max()), rel=1e-4)


def test_predict_batch(http: httpx.Client, exported_model: Path) -> None:
    files = [("images", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(PHOTOS)]
    body = http.post("/predict_batch", files=files, data={"k": "1"}).json()
    expected = expected_probabilities(exported_model, PHOTOS)
    assert [p[0]["index"] for p in body["predictions"]] == list(expected.argmax(1))


def test_saliency_png(http: httpx.Client, exported_model: Path) -> None:
    for method in ("gradient", "guided", "gradcam", "guided_gradcam"):
        response = http.post("/saliency", files={"image": ("photo.png", PHOTOS[2])}, data={"method": method})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        decoded = Image.open(io.BytesIO(response.content))
        assert (decoded.format, decoded.size, decoded.mode) == ("PNG", (48, 48), "RGB")  # 64×48 upload's square
        predicted = CLASSES[int(expected_probabilities(exported_model, PHOTOS[2:3])[0].argmax())]
        assert response.headers["x-prediction"] == response.headers["x-target"] == predicted


def test_saliency_json(http: httpx.Client) -> None:
    for target in ("owl", "2"):  # a class name, and an index (the form value "2" is JSON for 2)
        response = http.post("/saliency", files={"image": ("photo.png", PHOTOS[3])},
                             data={"target": target, "method": "gradcam", "format": "json"})
        body = response.json()
        heat = np.array(body["map"])
        assert body["target"]["label"] == "owl" and body["method"] == "gradcam"
        assert heat.shape == (SIZE, SIZE) and 0 <= heat.min() and heat.max() <= 1


def test_metadata(http: httpx.Client, exported_model: Path) -> None:
    body = http.get("/metadata").json()
    assert body["classes"] == CLASSES and (body["image_size"], body["channels"]) == (SIZE, CHANNELS)
    assert (body["model"], body["version"], body["architecture"]) == ("cnn-classifier", "7", "lenet5")
    assert body["mlflow_run_id"] == "fixture-run" and body["metrics"] == {"top1": 0.5, "top5": 1.0}
    assert body["source"] == exported_model.name and body["settings"]["max_bytes"] == MAX_BYTES  # no absolute path
    assert http.post("/metadata").json() == body  # the same as a BentoML API, for BentoML clients


def test_bentoml_client(server: LocalServer, exported_model: Path, tmp_path: Path) -> None:
    import bentoml

    photo = tmp_path / "photo.png"
    photo.write_bytes(PHOTOS[1])
    want = int(expected_probabilities(exported_model, PHOTOS[1:2])[0].argmax())
    with bentoml.SyncHTTPClient(server.url) as client:
        assert client.predict(image=photo, k=1)["predictions"][0]["index"] == want
        assert Image.open(client.saliency(image=photo, method="gradcam")).size == (SIZE, SIZE)  # a Path
        assert client.metadata()["classes"] == CLASSES
        with pytest.raises(bentoml.exceptions.BentoMLException) as caught:
            client.predict(image=Path(__file__))
        assert caught.value.error_code == 415


def test_readyz_and_prometheus_metrics(http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200 and http.get("/livez").status_code == 200
    predict_works(http)
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE classifier_requests_total counter" in metrics.text  # serving.metrics: bounded labels
    assert 'endpoint="/predict"' in metrics.text and "classifier_batch_size_count" in metrics.text


# ----------------------------------------------------------------------------- bad input
def chunked_upload(size: int) -> Iterator[bytes]:
    """A multipart body with no Content-Length (httpx sends a generator chunked): one file part of ``size`` bytes."""
    yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    for _ in range(size // 65536):
        yield b"\0" * 65536


def _cases(bad_files: dict, fake_png) -> dict[str, tuple[str, dict, int]]:
    """name → (endpoint, httpx.post keyword arguments, expected status)."""

    def upload(blob: bytes, name: str = "upload.png", **data: str) -> dict:
        return {"files": {"image": (name, blob)}, "data": data}

    photo = PHOTOS[0]
    return {
        "empty body": ("/predict", {}, 400),
        "empty multipart body": ("/predict", {"headers": {"content-type": "multipart/form-data"}}, 400),
        "garbage multipart body": ("/predict", {"content": b"garbage",
                                                "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
        "raw image, not multipart": ("/predict", {"content": photo, "headers": {"content-type": "image/png"}}, 400),
        "missing image field": ("/predict", {"files": {"k": (None, "3")}}, 400),
        "empty file": ("/predict", upload(b""), 400),
        "not an image": ("/predict", upload(b"just some text\n", "notes.txt"), 415),
        "unsupported format (svg)": ("/predict", upload(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "a.svg"), 415),
        "truncated png": ("/predict", upload(bad_files["truncated.png"][0]), 422),
        "truncated jpeg": ("/predict", upload(bad_files["truncated.jpg"][0], "a.jpg"), 422),
        "0x0 png": ("/predict", upload(fake_png(0, 0)), 415),  # Pillow will not even open it
        "wmf (outside the format allowlist)": ("/predict", upload(bad_files["zero_width.wmf"][0], "a.wmf"), 415),
        "1xN image": ("/predict", upload(png(1, 40)), 422),
        "decompression bomb": ("/predict", upload(fake_png(6000, 6000)), 413),
        "body over the byte limit": ("/predict", upload(b"\0" * (MAX_BYTES + 1)), 413),
        "chunked body over the limit": ("/predict", {"content": chunked_upload(20 * 65536), "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 413),
        "k = 0": ("/predict", upload(photo, k="0"), 400),
        "one bad file in a batch": ("/predict_batch", {"files": [("images", ("a.png", photo)),
                                                                 ("images", ("b.png", b"text"))]}, 415),
        "unknown method": ("/saliency", upload(photo, method="lime"), 400),
        "unknown format": ("/saliency", upload(photo, format="gif"), 400),
        "target out of range": ("/saliency", upload(photo, target="3"), 400),
        "negative target": ("/saliency", upload(photo, target="-1"), 400),
        "unknown class name": ("/saliency", upload(photo, target="emu"), 400),
    }


def test_bad_input_gets_4xx_json_and_the_server_keeps_serving(http: httpx.Client, bad_files, fake_png) -> None:
    failures = []
    for name, (endpoint, kwargs, status) in _cases(bad_files, fake_png).items():
        response = http.post(endpoint, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != status or not isinstance(body, dict) or not isinstance(body.get("error"), str):
            failures.append(f"{name}: {response.status_code} (want {status}) {response.text[:200]}")
        predict_works(http)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- model store and bento
@pytest.fixture(scope="module")
def store_home(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BENTOML_HOME whose store holds the fixture model as ``cnn-classifier:e2e``."""
    home = tmp_path_factory.mktemp("store_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "serving.store", "import-export", str(exported_model),
                          "--tag-version", "e2e"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "cnn-classifier:e2e", out.stderr
    return home


def test_serve_from_the_model_store(store_home: Path) -> None:
    server = LocalServer(store_home, SERVING_MODEL="")  # unset: the default, cnn-classifier:latest
    server.wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = http.get("/metadata").json()
            assert (body["source"], body["version"], body["classes"]) == ("cnn-classifier:e2e", "7", CLASSES)
            predict_works(http)
    finally:
        assert server.stop() == 0, server.log()


def test_bentoml_build(store_home: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(store_home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("SERVING_MODEL", None)
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "--version", "e2e", str(ROOT)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    bento = store_home / "bentos" / "cnn-mlops" / "e2e"
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"] for m in info["models"]] == ["cnn-classifier:e2e"]
    sources = sorted(str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*.py"))
    # the service's modules, and pipeline.common shipped whole (bentofile.yaml): nothing from training
    common = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipeline" / "common").glob("*.py"))
    assert sources == sorted(set(import_closure("serving.service")) | set(common))
    static = sorted(p.name for p in (bento / "src" / "serving" / "static").iterdir())
    assert static == ["app.js", "index.html", "style.css"]  # the web UI travels with it
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements
    assert not {"torch", "mlflow", "dvc"} & {line.split("=")[0].split(">")[0] for line in requirements.split()}
