"""The serving code without a server: imports, preprocessing parity, the service class called directly.

The model is the session's ``exported_model`` fixture (conftest), never ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.common import images
from pipeline.lib.config import PreprocessParams
from pipeline.preprocess import preprocess_folder
from serving import service, store
from serving.service import ImageRejected, PayloadTooLarge, Settings, load_image
from tests.conftest import write_export

ROOT = Path(__file__).resolve().parent.parent
SIZE, CHANNELS = 32, 1  # the exported_model fixture's input ...
CLASSES = ["cat", "dog", "owl"]  # ... and classes (conftest.SERVING_CLASSES)


def session(model_dir: Path, name: str = "classifier.onnx") -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / name), providers=["CPUExecutionProvider"])


def write_png(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path)  # mode from the shape
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six distinct images of assorted sizes and modes (the service's shared test inputs)."""
    root = tmp_path_factory.mktemp("photos")
    shapes = [(40, 30, "RGB"), (32, 32, "L"), (17, 50, "RGBA"), (64, 64, "RGB"), (9, 12, "L"), (100, 80, "RGB")]
    return [write_png(root / f"{i}.png", w, h, mode, seed=i) for i, (w, h, mode) in enumerate(shapes)]


@pytest.fixture(scope="module")
def run() -> Iterator:
    """One event loop for the module: the service's batcher binds to the loop it first runs on."""
    loop = asyncio.new_event_loop()  # asyncio.Runner is 3.11+
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def classifier(exported_model: Path):
    """``serving.service.Classifier`` instantiated in-process on the fixture model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SERVING_MODEL", str(exported_model))
        yield service.Classifier()


def expected_probabilities(model_dir: Path, paths: list[Path]) -> np.ndarray:
    batch = np.stack([images.preprocess(p, SIZE, CHANNELS) for p in paths])
    return session(model_dir).run(["probabilities"], {"image": batch})[0]


# ----------------------------------------------------------------------------- imports
def test_service_imports_no_torch_mlflow_dvc(tmp_path: Path, exported_model: Path, photos: list[Path]) -> None:
    code = f"""
import asyncio, sys
from pathlib import Path

def loaded():
    return sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'mlflow', 'dvc', 'onnxruntime'}})

import serving.service
print(loaded())  # onnxruntime is imported when the service starts (__init__), not before
service = serving.service.Classifier()
asyncio.run(service.predict(image=Path({str(photos[0])!r})))
asyncio.run(service.saliency(image=Path({str(photos[0])!r})))
print(loaded())
"""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true",
           "SERVING_MODEL": str(exported_model)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "['onnxruntime']"], out.stdout + out.stderr


# ----------------------------------------------------------------------------- preprocessing parity
def test_serving_pixels_and_logits_equal_the_preprocess_stage(
    tmp_path: Path, exported_model: Path, make_image_folder
) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, side=12)
    write_png(data / "c0" / "wide_alpha.png", 40, 17, "RGBA", seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    photo = Image.fromarray(np.random.default_rng(6).integers(0, 256, (30, 60, 3), dtype=np.uint8))
    photo.save(data / "c1" / "rotated.jpg", "JPEG", exif=exif, quality=90)
    params = PreprocessParams(image_size=SIZE, channels=CHANNELS, val_fraction=0.0, test_fraction=0.0, workers=1)
    manifest = preprocess_folder(data, tmp_path / "out", params, seed=0).model_dump()
    staged = np.load(tmp_path / "out" / "train_images.npy")
    assert len(manifest["files"]) == 8 and not manifest["skipped"]

    rows = sorted(manifest["files"], key=lambda row: row["index"])
    served = np.stack([load_image(data / row["path"], "image", SIZE, CHANNELS) for row in rows])
    direct = np.stack([images.preprocess(data / row["path"], SIZE, CHANNELS) for row in rows])
    np.testing.assert_array_equal(served, staged[[row["index"] for row in rows]])
    np.testing.assert_array_equal(direct, served)

    classifier = session(exported_model)
    logits_staged = classifier.run(["logits"], {"image": staged})[0]
    logits_served = classifier.run(["logits"], {"image": served})[0]
    np.testing.assert_array_equal(logits_served, logits_staged[[row["index"] for row in rows]])


# ----------------------------------------------------------------------------- bad images
@pytest.mark.parametrize("name", ["truncated.png", "truncated.jpg", "empty.png", "notes.txt",
                                  "zero_width.png", "zero_width.wmf"])
def test_load_image_refuses_bad_files(tmp_path: Path, bad_files, name: str) -> None:
    data, reason = bad_files[name]
    if name.endswith(".wmf"):
        reason = "not_an_image"  # WMF is outside the service's format allowlist
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageRejected) as caught:
        load_image(path, "image", SIZE, CHANNELS)
    assert f"image: {reason}:" in str(caught.value)
    assert caught.value.error_code == service.REASON_STATUS[reason]
    assert 400 <= caught.value.error_code < 500


def test_load_image_limits(tmp_path: Path, fake_png) -> None:
    settings = Settings(max_bytes=10_000, max_pixels=1_000_000, min_side=8)
    for width, height in [(1, 50), (50, 1), (7, 7)]:
        with pytest.raises(ImageRejected, match="too_small") as caught:
            load_image(write_png(tmp_path / f"{width}x{height}.png", width, height), "image", SIZE, 1, settings)
        assert caught.value.error_code == 422
    assert load_image(write_png(tmp_path / "8x8.png", 8, 8), "image", SIZE, 1, settings).shape == (1, SIZE, SIZE)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(fake_png(2000, 2000))  # 4 MP claimed in a 60-byte file
    with pytest.raises(ImageRejected, match="too_many_pixels") as caught:
        load_image(bomb, "image", SIZE, 1, settings)
    assert caught.value.error_code == 413

    with pytest.raises(PayloadTooLarge):
        load_image(write_png(tmp_path / "big.png", 80, 80), "image", SIZE, 1, settings)


# ----------------------------------------------------------------------------- the service, called directly
def test_predict_top_k_matches_onnxruntime(classifier, run, exported_model: Path, photos: list[Path]) -> None:
    expected = expected_probabilities(exported_model, photos[:1])[0]
    result = run(classifier.predict(image=photos[0], k=2))
    assert (result.model, result.version) == ("cnn-classifier", "7")
    assert [p.index for p in result.predictions] == list(np.argsort(-expected)[:2])
    assert [p.label for p in result.predictions] == [CLASSES[i] for i in np.argsort(-expected)[:2]]
    np.testing.assert_allclose([p.probability for p in result.predictions], np.sort(expected)[::-1][:2],
                               rtol=1e-5)
    assert len(run(classifier.predict(image=photos[0], k=50)).predictions) == 3  # capped at the classes


def test_batched_predictions_go_back_to_their_requests(
    classifier, run, exported_model: Path, photos: list[Path]
) -> None:
    paths = photos * 6  # concurrent requests: the batcher stacks them, each must get its own answer
    expected = expected_probabilities(exported_model, paths)

    async def all_at_once():
        return await asyncio.gather(*(classifier.predict(image=p, k=3) for p in paths))

    for _ in range(3):  # BentoML's dispatcher sends its first requests alone while it calibrates
        results = run(all_at_once())
    for result, want in zip(results, expected, strict=True):
        got = np.zeros(3)
        got[[p.index for p in result.predictions]] = [p.probability for p in result.predictions]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_predict_batch(classifier, run, exported_model: Path, photos: list[Path]) -> None:
    expected = expected_probabilities(exported_model, photos)
    result = run(classifier.predict_batch(images=photos, k=1))
    assert [r[0].index for r in result.predictions] == list(expected.argmax(1))
    with pytest.raises(ImageRejected, match=r"images\[1\]: too_small"):
        run(classifier.predict_batch(images=[photos[0], write_png(photos[0].parent / "thin.png", 1, 30)]))


def test_saliency_png_and_json(classifier, run, exported_model: Path, photos: list[Path]) -> None:
    image = images.preprocess(photos[3], SIZE, CHANNELS)
    logits, gradient, guided, gradcam = session(exported_model, "saliency.onnx").run(
        None, {"image": image[None], "target": np.array([1], dtype=np.int64)})
    predicted = int(logits[0].argmax())

    png = run(classifier.saliency(image=photos[3], target="dog", method="guided_gradcam"))
    assert png.media_type == "image/png" and png.headers["x-target"] == "dog"
    assert png.headers["x-prediction"] == CLASSES[predicted]
    decoded = Image.open(io.BytesIO(png.body))
    assert (decoded.size, decoded.mode) == ((64, 64), "RGB")  # the 64×64 upload's own size, not the model's

    body = json.loads(run(classifier.saliency(image=photos[3], target=1, method="guided_gradcam",
                                              format="json")).body)
    heat = np.array(body["map"])
    want, scale = service.reduce_map(guided[0] * gradcam[0][None])
    assert heat.shape == (SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1
    np.testing.assert_allclose(heat, want, atol=1e-4)
    np.testing.assert_allclose(body["scale"], scale, rtol=1e-5)
    assert body["target"]["label"] == "dog" and body["prediction"]["index"] == predicted

    for method in ("gradient", "guided", "gradcam"):
        body = json.loads(run(classifier.saliency(image=photos[3], method=method, format="json")).body)
        assert body["target"] == body["prediction"]  # default target: the predicted class
        assert np.array(body["map"]).shape == (SIZE, SIZE)


@pytest.mark.parametrize("target", [3, -1, "emu", True])
def test_saliency_refuses_unknown_targets(classifier, run, photos: list[Path], target) -> None:
    from bentoml.exceptions import InvalidArgument

    with pytest.raises(InvalidArgument, match="target"):
        run(classifier.saliency(image=photos[0], target=target))


def test_metadata(classifier, exported_model: Path) -> None:
    info = classifier.metadata()
    assert info.classes == CLASSES and (info.image_size, info.channels) == (SIZE, CHANNELS)
    assert (info.model, info.version, info.architecture) == ("cnn-classifier", "7", "lenet5")
    assert info.mlflow_run_id == "fixture-run" and info.metrics == {"top1": 0.5, "top5": 1.0}
    assert info.source == exported_model.name and info.provider == "CPUExecutionProvider"  # no absolute path


# ----------------------------------------------------------------------------- helpers
def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_MAX_BYTES", "1234")
    monkeypatch.setenv("SERVING_BATCHING", "0")
    settings = Settings.from_env()
    assert (settings.max_bytes, settings.batching, settings.min_side) == (1234, False, 8)
    monkeypatch.setenv("SERVING_TIMEOUT", "7")  # the README's names, not the field names
    assert Settings.from_env().timeout_s == 7
    monkeypatch.setenv("SERVING_MIN_SIDE", "two")
    with pytest.raises(ValueError, match="SERVING_MIN_SIDE"):
        Settings.from_env()


def test_resolve_model_dir(exported_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.resolve_model_dir(str(exported_model)) == exported_model
    monkeypatch.setenv("SERVING_MODEL", str(exported_model))
    assert store.resolve_model_dir() == exported_model and store.store_tag() is None
    partial = tmp_path / "partial"
    shutil.copytree(exported_model, partial)
    (partial / "saliency.onnx").unlink()
    with pytest.raises(store.ModelNotFound, match="saliency.onnx: missing"):
        store.resolve_model_dir(str(partial))
    mixed = tmp_path / "mixed"  # a saliency graph from another export: refused, never paired
    shutil.copytree(exported_model, mixed)
    write_export(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "saliency.onnx", mixed / "saliency.onnx")
    with pytest.raises(store.ModelNotFound, match="saliency.onnx: content does not match the sha256"):
        store.resolve_model_dir(str(mixed))
    with pytest.raises(store.ModelNotFound, match="model_card.json: not found"):
        store.resolve_model_dir(str(tmp_path))
    with pytest.raises(store.ModelNotFound, match="no such folder"):
        store.resolve_model_dir(str(tmp_path / "nope"))
    assert store.store_tag("cnn-classifier:abc") == "cnn-classifier:abc"
    monkeypatch.delenv("SERVING_MODEL")
    assert store.store_tag() == store.DEFAULT_SPEC


CHAMPION_SCRIPT = """
import json, shutil, sys
from pathlib import Path
from serving import store
export, work = Path(sys.argv[1]), Path(sys.argv[2])
try:
    store.resolve_model_dir("champion")
except store.ModelNotFound as err:
    print("before:", err)
first = store.import_export(export, alias="champion")
again = store.import_export(export, alias="champion")  # the same deployable: reused, not copied
plain = store.import_export(export)  # newer, but not the champion
assert again == first != plain, (first, again, plain)
print("champion:", first, "plain:", plain, "resolved:", store.resolve_model_dir("champion"))
"""


def test_serving_model_champion_resolves_the_aliased_import(exported_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run([sys.executable, "-c", CHAMPION_SCRIPT, str(exported_model), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before: SERVING_MODEL='champion': no model in the store carries the MLflow alias" in done.stdout
    line = done.stdout.splitlines()[-1].split()
    champion_tag, resolved = line[1], Path(line[5])
    assert resolved.parts[-1] == champion_tag.split(":")[1]  # the store folder of the aliased import


# ----------------------------------------------------------------------------- the ASGI guard
def test_request_guard_limits_bodies_and_shapes_errors(run) -> None:
    from serving.guard import RequestGuard

    async def endpoint(request):
        body = await request.body()
        status = int(request.query_params["status"])
        if status == 200:
            return JSONResponse({"bytes": len(body)})
        return JSONResponse([{"error": "why"}], status_code=status)

    inner = Starlette(routes=[Route("/x", endpoint, methods=["POST"])])
    app = RequestGuard(inner, Settings(max_bytes=100, workers=1), api_paths=["/x"])

    async def post(status: int, content, path: str = "/x") -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, params={"status": status}, content=content)

    assert run(post(200, b"x" * 100)).json() == {"bytes": 100}  # 2xx bodies pass as they are
    too_big = run(post(200, b"x" * 101))
    assert too_big.status_code == 413 and "over the limit of 100" in too_big.json()["error"]

    async def chunks():  # no Content-Length: counted as it arrives
        yield b"x" * 60
        yield b"x" * 60

    assert run(post(200, chunks())).status_code == 413
    bad = run(post(400, b""))
    assert bad.status_code == 400 and bad.json() == {"error": "why"}
    assert int(bad.headers["content-length"]) == len(bad.content)
    busy = run(post(503, b""))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "overloaded" in busy.json()["error"]
    missing = run(post(200, b"", path="/nowhere"))
    assert missing.status_code == 404 and missing.json() == {"error": "path: no such endpoint: POST /nowhere"}
