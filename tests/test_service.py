"""The serving code without a server: imports, preprocessing parity, the service class called directly.

The model is the session's ``exported_model`` fixture (conftest), never ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from serving import forms, render, service, store, uploads
from serving.errors import ErrorBodies, ImageRejected, PayloadTooLarge
from serving.routes import ApiRoutes
from serving.schemas import PredictFields
from serving.settings import Settings
from tests.conftest import write_export

ROOT = Path(__file__).resolve().parent.parent
SIZE, CHANNELS = 32, 1  # the exported_model fixture's input ...
CLASSES = ["cat", "dog", "owl"]  # ... and classes (conftest.SERVING_CLASSES)


DEFAULTS = Settings()


def load_image(path: Path, what: str, size: int, channels: int, settings: Settings = DEFAULTS) -> np.ndarray:
    """An upload's path as the service takes it: size, header and scan checks, then the decode."""
    data = uploads.read_file(path, what, settings)
    uploads.inspect_upload(data, what, settings)
    return uploads.decode_upload(data, what, size, channels, settings)


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
    assert caught.value.error_code == uploads.REASON_STATUS[reason]
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

    classifier.batcher.sizes = []
    results = run(all_at_once())
    for result, want in zip(results, expected, strict=True):
        got = np.zeros(3)
        got[[p.index for p in result.predictions]] = [p.probability for p in result.predictions]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # 36 requests at once: they queue while the first batch runs, so batches of more than one formed
    assert sum(classifier.batcher.sizes) == len(paths) and max(classifier.batcher.sizes) > 1, classifier.batcher.sizes


def test_predict_batch(classifier, run, exported_model: Path, photos: list[Path]) -> None:
    expected = expected_probabilities(exported_model, photos)
    result = run(classifier.predict_batch(images=photos, k=1))
    assert [r[0].index for r in result.predictions] == list(expected.argmax(1))
    with pytest.raises(ImageRejected, match=r"images\[1\]: too_small"):
        run(classifier.predict_batch(images=[photos[0], write_png(photos[0].parent / "thin.png", 1, 30)]))


def test_onnxruntime_sees_at_most_max_batch_size_images(classifier, exported_model: Path, photos: list[Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """More images than SERVING_MAX_BATCH_SIZE (a /predict_batch) run in chunks: onnxruntime's arena,
    filled to one maximum batch at start-up, never grows; the rows are those of one call."""
    batch = np.stack([images.preprocess(p, SIZE, CHANNELS) for p in photos])
    whole = classifier._run(batch)
    monkeypatch.setattr(service, "SETTINGS", dataclasses.replace(service.SETTINGS, max_batch_size=4))
    real, sizes = classifier.session, []

    class Counting:
        def run(self, names, feeds):
            sizes.append(len(feeds["image"]))
            return real.run(names, feeds)

    monkeypatch.setattr(classifier, "session", Counting())
    chunked = classifier._run(batch)
    assert sizes == [4, 2]
    # the same arithmetic per image; float32 kernels may block a different batch size differently
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=256 * np.finfo(np.float32).eps * np.abs(whole).max())


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
    want, scale = render.reduce_map(guided[0] * gradcam[0][None])
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


# ----------------------------------------------------------------------------- JPEG scan budget
def progressive_bomb(side: int = 5000, repeats: int = 3000) -> bytes:
    """The issue's bomb: a flat progressive JPEG whose last scan is repeated (224 KB for 5000 px, 3,000 repeats)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")  # the last SOS marker: its scan runs to the EOI marker
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def test_jpeg_scans_are_counted_and_a_progressive_bomb_is_refused_before_decoding() -> None:
    plain = progressive_bomb(64, 0)
    base = uploads.jpeg_scans(plain, 1000)
    assert base >= 2  # progressive: several scans
    assert uploads.jpeg_scans(progressive_bomb(64, 7), 1000) == base + 7
    assert uploads.jpeg_scans(progressive_bomb(64, 500), 20) == 21  # stops counting past the limit
    baseline = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(baseline, "JPEG")
    assert uploads.jpeg_scans(baseline.getvalue(), 1000) == 1
    settings = Settings(max_bytes=10**7, max_pixels=25_000_000)
    bomb = progressive_bomb()
    with pytest.raises(ImageRejected, match="image: too_many_scans: a 5000x5000 JPEG of more than 16 scans") as caught:
        uploads.inspect_upload(bomb, "image", settings)
    assert caught.value.error_code == 422 and "SERVING_MAX_SCAN_PIXELS" in str(caught.value)
    facts = uploads.inspect_upload(progressive_bomb(1000, 100), "image", settings)
    assert (facts.width, facts.height) == (1000, 1000)  # 1 MP: in budget


# ----------------------------------------------------------------------------- the HTTP layer, in-process
def test_api_routes_admit_within_bounds_and_every_error_is_json_with_nosniff(run, caplog) -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def handler(path: str, request, settings: Settings):
        parsed = await forms.parse(request, forms.Form({"image": False}, PredictFields), settings)
        if parsed.values.k == 7:  # hold the one slot until released
            entered.set()
            await release.wait()
        return JSONResponse({"bytes": len(parsed.files["image"]), "k": parsed.values.k})

    async def other(request):
        return JSONResponse([{"error": "why"}], status_code=400)

    async def boom(request):
        raise RuntimeError("a bug")

    inner = Starlette(routes=[Route("/other", other, methods=["POST"]), Route("/boom", boom)])
    settings = Settings(max_bytes=300, max_concurrency=1, workers=1)
    app = ErrorBodies(ApiRoutes(inner, settings, handler=handler))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            upload = {"image": ("a.png", b"x" * 10)}
            ok = await client.post("/predict", files=upload, data={"k": "3"})
            upper = await client.post("/predict", content=b"--b\r\nContent-Disposition: form-data; name=\"image\"; "
                                       b"filename=\"a\"\r\n\r\nxyz\r\n--b--\r\n",
                                       headers={"content-type": "MULTIPART/FORM-DATA; boundary=b"})
            held = asyncio.create_task(client.post("/predict", files=upload, data={"k": "7"}))
            await entered.wait()
            shed = await client.post("/predict", files=upload)
            release.set()
            return (ok, upper, (await held), shed, await client.post("/predict", files={"image": ("a", b"x" * 400)}),
                    await client.post("/predict", files={"file": ("a", b"x")}), await client.get("/predict"),
                    await client.post("/other"), await client.get("/nowhere"), await client.get("/boom"))

    with caplog.at_level("INFO", logger="serving.routes"):
        ok, upper, held, shed, big, unknown, wrong_method, other_error, missing, bug = run(scenario())
    assert ok.json() == {"bytes": 10, "k": 3} and held.json() == {"bytes": 10, "k": 7}
    assert upper.status_code == 200 and upper.json()["bytes"] == 3  # media types are case-insensitive
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1" and "overloaded" in shed.json()["error"]
    shed_lines = [r for r in caplog.records if "503" in r.getMessage()]
    assert [(r.levelname, r.exc_info) for r in shed_lines] == [("WARNING", None)]  # one line, no traceback
    assert big.status_code == 413 and "over the limit of 300" in big.json()["error"]
    assert unknown.status_code == 400 and unknown.json()["error"].startswith("'file': unknown field")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert other_error.json() == {"error": "why"}  # BentoML's [{"error": ...}] list unwrapped
    assert int(other_error.headers["content-length"]) == len(other_error.content)
    assert missing.status_code == 404 and missing.json() == {"error": "path: no such endpoint: GET /nowhere"}
    assert bug.status_code == 500 and isinstance(bug.json()["error"], str)  # a bug: still JSON
    for response in (ok, shed, big, unknown, wrong_method, other_error, missing, bug):
        assert response.headers["x-content-type-options"] == "nosniff"
