"""The web UI in a real browser: Debian's Chromium driven by Playwright against a real ``bentoml serve``.

The page must show the ONNX model's own top-1 for an upload, render every saliency map over the
upload at its own resolution, answer bad files with the service's 4xx message, load the bundled
examples, and never make a request off this machine. Screenshots land in the test's tmp_path.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from pipeline.common import colormap, images
from pipeline.common.features import feature_records, load_reference
from pipeline.export import write_examples
from pipeline.lib.local_server import LocalServer
from tests.conftest import SERVING_CLASSES, pattern_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SIZE, CHANNELS = 32, 1  # the exported_model fixture's input
METHODS = ("gradient", "guided", "gradcam", "guided_gradcam")
# Known to work as root in a container; the profile is a fresh temporary one (Playwright's own).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: install Debian's package (apt-get install -y chromium), as .ci/run does")
    return path


@pytest.fixture(scope="module")
def ui_model(monitored_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving fixture model (with its monitoring reference) plus ``examples.npz`` written by the export
    stage's function."""
    folder = tmp_path_factory.mktemp("ui_model") / "export"
    shutil.copytree(monitored_model, folder)
    rng = np.random.default_rng(5)
    labels = np.array([0, 1, 2, 1])
    write_examples(folder, np.stack([pattern_image(int(k), rng)[None] for k in labels]), labels)
    return folder


@pytest.fixture(scope="module")
def monitoring_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's review folder (``review/``) and drift verdict (``drift.json``)."""
    return tmp_path_factory.mktemp("ui_monitoring")


@pytest.fixture(scope="module")
def server(ui_model: Path, monitoring_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    running = LocalServer(tmp_path_factory.mktemp("bentoml_home"), SERVING_MODEL=str(ui_model),
                          SERVING_REVIEW_DIR=str(monitoring_dir / "review"),
                          SERVING_DRIFT_REPORT=str(monitoring_dir / "drift.json"))
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.log()


def onnx_top1(model_dir: Path, blob: bytes) -> str:
    """The class ``classifier.onnx`` predicts for an image file, preprocessed as the pipeline does."""
    session = ort.InferenceSession(str(model_dir / "classifier.onnx"), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"image": images.preprocess(blob, SIZE, CHANNELS)[None]})[0]
    return SERVING_CLASSES[int(probabilities[0].argmax())]


def photo(width: int, height: int, seed: int) -> bytes:
    """A colour picture with structure (a gradient and a bright disc) that is not square."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2) < (height / 4) ** 2
    noise = np.random.default_rng(seed).integers(0, 40, (height, width))
    pixels = np.stack([x * 255 // width, y * 255 // height, noise * 3], axis=-1) + 120 * disc[..., None]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_done(page, top1: str, target: str) -> None:
    """Until the page shows ``top1`` as its prediction and all four maps, explaining ``target``, have loaded."""
    page.wait_for_function(
        """([top1, target]) => document.body.dataset.state === 'done'
             && document.getElementById('top1').textContent === top1
             && [...document.querySelectorAll('.map .overlay')].every(
                  (img) => img.complete && img.naturalWidth > 0 && img.dataset.target === target)""",
        arg=[top1, target], timeout=60_000)


def test_the_page_predicts_explains_and_stays_local(server: LocalServer, ui_model: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    upload = tmp_path / "photo.png"
    upload.write_bytes(photo(160, 120, seed=3))
    expected = onnx_top1(ui_model, upload.read_bytes())
    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))

        page.goto(server.url + "/")  # the root leads to the UI
        assert page.url == server.url + "/ui/"
        page.wait_for_selector("body[data-state=ready]", timeout=30_000)
        card = {field: page.text_content(f"dd[data-field='{field}']") for field in
                ("model", "version", "test top-1", "test top-3", "MLflow run", "data md5", "classes")}
        assert card == {"model": "cnn-classifier", "version": "7", "test top-1": "0.5000", "test top-3": "1.0000",
                        "MLflow run": "fixture-run", "data md5": "fixture", "classes": "3: cat, dog, owl"}
        # A 3-class model: top-3, never "top-5", in the heading and the introduction.
        assert (page.text_content("#top-k"), page.text_content("#top-k-sub")) == ("Top-3", "top-3")
        assert "top-5" not in page.text_content("body").lower()
        assert_no_broken_maps(page)  # before the first answer: placeholders, no alt text
        # At 1400 px the three panels fill the top row: its right edge is the wide panel's below it.
        boxes = {name: page.locator(f"#{name}").bounding_box() for name in ("input", "prediction", "card", "saliency")}
        assert boxes["input"]["y"] == boxes["prediction"]["y"] == boxes["card"]["y"]
        right = {name: box["x"] + box["width"] for name, box in boxes.items()}
        assert abs(right["card"] - right["saliency"]) < 2
        page.screenshot(path=tmp_path / "0-ready-1400px.png", full_page=True)
        assert page.locator("#examples button").all_text_contents() == ["cat", "dog", "owl"]
        legend = Image.open(io.BytesIO(server_bytes(page, "colormap.png"))).convert("RGB")
        np.testing.assert_array_equal(np.asarray(legend)[0], colormap.colorize(np.linspace(0, 1, 256)))

        # An upload: the model's own answer, and every map drawn over the upload's 120×120 centre square.
        page.set_input_files("#file", str(upload))
        wait_done(page, expected, expected)
        bars = page.locator("#bars li")
        assert bars.count() == 3 and page.get_attribute("#bars li:first-child", "data-label") == expected
        sizes = page.eval_on_selector_all(".map .overlay", "imgs => imgs.map((i) => [i.naturalWidth, i.naturalHeight])")
        assert sizes == [[120, 120]] * len(METHODS)
        page.screenshot(path=tmp_path / "1-upload.png", full_page=True)

        # Another class to explain, and the map faded half-way over the image.
        other = next(name for name in SERVING_CLASSES if name != expected)
        page.select_option("#target", str(SERVING_CLASSES.index(other)))
        wait_done(page, expected, other)
        page.fill("#opacity", "0.5")
        page.dispatch_event("#opacity", "input")
        assert page.eval_on_selector_all(".map .overlay", "imgs => imgs.map((i) => i.style.opacity)") == ["0.5"] * 4
        page.screenshot(path=tmp_path / "2-target-and-opacity.png", full_page=True)
        page.select_option("#target", "")

        # A bundled test image: the served model's prediction for it, at its stored 32×32.
        example = server_bytes(page, "examples/2.png")
        page.click("#examples button >> nth=2")
        wait_done(page, onnx_top1(ui_model, example), onnx_top1(ui_model, example))
        assert page.text_content("#preview-name") == "example: a test image of class owl"
        page.screenshot(path=tmp_path / "3-example.png", full_page=True)

        # Not an image: the service's 4xx message, shown as it came.
        notes = tmp_path / "notes.txt"
        notes.write_text("not an image")
        page.set_input_files("#file", str(notes))
        page.wait_for_selector("body[data-state=error]", timeout=30_000)
        status = page.text_content("#status")
        assert status.startswith("That file is not a picture this service can read"), status
        assert "not_an_image" not in status and "POST" not in status  # said as a person would ...
        assert "not_an_image" in page.get_attribute("#status", "title")  # ... the service's words in the tooltip
        assert page.text_content("#top1") == "–"
        assert page.eval_on_selector_all(".map img", "imgs => imgs.filter((i) => i.src).length") == 0  # no stale maps
        assert_no_broken_maps(page)
        page.screenshot(path=tmp_path / "4-bad-file.png", full_page=True)
        browser.close()

    assert requests, "no request was recorded: the check below would be vacuous"
    origin = urlsplit(server.url).netloc
    off_machine = [url for url in requests if urlsplit(url.removeprefix("blob:")).netloc != origin
                   and not url.startswith("data:")]
    assert off_machine == [], off_machine
    assert any(url.endswith("/saliency") for url in requests) and any(url.endswith("/metadata") for url in requests)
    # The one console error allowed: the browser's own line for the 415 answer to the text file.
    unexpected = [p for p in problems if "status of 415" not in p]
    assert unexpected == [], unexpected  # a Content-Security-Policy violation would show here
    print(f"screenshots: {sorted(str(p) for p in tmp_path.glob('*.png'))}")


def assert_no_broken_maps(page) -> None:
    """Every map box without a picture shows its placeholder, and no image shows its alt text."""
    shown = page.eval_on_selector_all(
        ".map img", "imgs => imgs.filter((i) => !i.src && getComputedStyle(i).display !== 'none').length")
    assert shown == 0
    assert page.locator(".map .placeholder").count() == len(METHODS)
    assert all(page.locator(".map .placeholder").nth(i).is_visible() for i in range(len(METHODS)))


def server_bytes(page, path: str) -> bytes:
    """A file of the page's origin fetched through the browser (so it is recorded with the rest)."""
    return bytes(page.evaluate(f"async () => [...new Uint8Array(await (await fetch('{path}')).arrayBuffer())]"))


def offline_ood(model_dir: Path, blob: bytes) -> bool:
    """Whether the service must flag ``blob`` out-of-distribution: the same features, computed here."""
    pixels = images.preprocess(blob, SIZE, CHANNELS)[None]
    session = ort.InferenceSession(str(model_dir / "classifier.onnx"), providers=["CPUExecutionProvider"])
    probabilities, embedding = session.run(["probabilities", "embedding"], {"image": pixels})
    [record] = feature_records(probabilities, embedding, pixels, SERVING_CLASSES, load_reference(model_dir))
    return record["ood"]


def test_the_page_warns_out_of_distribution_takes_feedback_and_shows_monitoring(
        server: LocalServer, ui_model: Path, monitoring_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    upload = tmp_path / "photo.png"
    upload.write_bytes(photo(160, 120, seed=3))
    assert offline_ood(ui_model, upload.read_bytes()) is True  # a colour photo, unlike the striped training images
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(server.url + "/ui/")
        page.wait_for_selector("body[data-state=ready]", timeout=30_000)
        assert page.text_content("#drift-verdict") == "no drift check yet"
        reference = {name: page.text_content(f"#class-table tr[data-class='{name}'] td:nth-child(3)")
                     for name in SERVING_CLASSES}
        panel = httpx.get(f"{server.url}/monitoring").json()
        total = sum(panel["reference"].values())
        assert reference == {name: f"{n} ({100 * n / total:.1f}%)" for name, n in panel["reference"].items()}
        assert not page.is_visible("#ood-warning") and not page.is_visible("#feedback")

        # Out of distribution: the plain warning, and the feedback control beside the answer.
        expected = onnx_top1(ui_model, upload.read_bytes())
        page.set_input_files("#file", str(upload))
        wait_done(page, expected, expected)
        assert page.is_visible("#ood-warning")
        assert " ".join(page.text_content("#ood-warning").split()) == (
            "This image looks unlike the training data; the prediction may be meaningless.")
        page.screenshot(path=tmp_path / "5-ood-warning.png", full_page=True)

        # Wrong? It is: owl. The image and the label land in the review folder.
        page.select_option("#feedback-label", "owl")
        page.click("#feedback-send")
        # A function, not an expression string: the page's CSP (script-src 'self') forbids eval.
        page.wait_for_function("() => document.getElementById('feedback-status').textContent.startsWith('Thank you')",
                               timeout=30_000)
        assert page.text_content("#feedback-status") == "Thank you: stored as owl for review."
        [item] = [json.loads(p.read_text()) for p in (monitoring_dir / "review").glob("*.json")]
        assert item["label"] == "owl"
        assert (monitoring_dir / "review" / item["image"]).read_bytes() == upload.read_bytes()

        # A bundled test image like the training split's: no warning.
        example = server_bytes(page, "examples/0.png")
        assert offline_ood(ui_model, example) is False
        page.click("#examples button >> nth=0")
        # The photo's answer is 'done' too (and may name the same class): wait for the example's own answer.
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done: example')",
                               timeout=60_000)
        wait_done(page, onnx_top1(ui_model, example), onnx_top1(ui_model, example))
        assert not page.is_visible("#ood-warning")
        # The traffic column counts what this server answered (both workers), by predicted class.
        page.wait_for_function(
            "() => [...document.querySelectorAll('#class-table td:nth-child(2)')].some((td) => td.textContent !== '0')",
            timeout=30_000)
        traffic = httpx.get(f"{server.url}/monitoring").json()["traffic"]
        assert set(traffic) == set(SERVING_CLASSES) and traffic[expected] >= 1

        # The last drift check, as `python -m pipeline.monitor` writes it.
        (monitoring_dir / "drift.json").write_text(json.dumps({
            "drift": True, "model": {"version": "7"}, "window": {"records": 300},
            "signals": {"mean_intensity": {"drift": True}, "embedding": {"drift": True},
                        "confidence": {"drift": False}}}))
        page.reload()
        page.wait_for_selector("body[data-state=ready]", timeout=30_000)
        verdict = page.text_content("#drift-verdict")
        assert verdict.startswith("Drift (") and verdict.endswith(
            "model version 7, last 300 predictions differ from the reference in embedding, mean_intensity."), verdict
        page.screenshot(path=tmp_path / "6-monitoring.png", full_page=True)
        browser.close()
    assert problems == [], problems
