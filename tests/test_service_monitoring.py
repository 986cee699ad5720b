"""The service's monitoring without a server: OOD fields, the prediction log, class metrics, the panel, feedback.

The service class is instantiated in-process on the fixture model with a monitoring reference
(``monitored_model``) and without one (``exported_model``); the HTTP side is in test_monitoring_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common.features import load_reference
from pipeline.common.feedback import read_feedback
from pipeline.common.predlog import read_records
from serving import monitoring, service
from serving.errors import FieldError, ImageRejected, PayloadTooLarge
from serving.settings import MonitoringPaths, Settings
from tests.conftest import pattern_split

ROOT = Path(__file__).resolve().parent.parent


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run() -> Iterator:
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> MonitoringPaths:
    root = tmp_path_factory.mktemp("monitoring")
    return MonitoringPaths(root / "log", root / "review", root / "monitor" / "drift.json")


@pytest.fixture(scope="module")
def monitored(monitored_model: Path, paths: MonitoringPaths):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SERVING_MODEL", str(monitored_model))
        for variable, value in (("SERVING_LOG_DIR", paths.log_dir), ("SERVING_REVIEW_DIR", paths.review_dir),
                                ("SERVING_DRIFT_REPORT", paths.drift_report)):
            patch.setenv(variable, str(value))
        yield service.Classifier()


def wait_written(classifier, count: int) -> None:
    """Until the worker's log thread has written ``count`` records (it writes in the background)."""
    for _ in range(500):
        if classifier.monitor.log.written >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{classifier.monitor.log.written} of {count} records written")


def test_paths_resolve_against_the_project_root_not_the_cwd(tmp_path: Path) -> None:
    defaults = MonitoringPaths.from_env({})
    assert defaults.log_dir == ROOT / "artifacts" / "predictions"
    assert defaults.review_dir == ROOT / "artifacts" / "review"
    assert defaults.drift_report == ROOT / "artifacts" / "monitor" / "drift.json"
    chosen = MonitoringPaths.from_env({"SERVING_LOG_DIR": "logs/p", "SERVING_REVIEW_DIR": str(tmp_path)}, root=tmp_path)
    assert chosen.log_dir == tmp_path / "logs" / "p" and chosen.review_dir == tmp_path


def test_serving_log_switch_reads_words_and_numbers() -> None:
    assert Settings.from_env({"SERVING_LOG": "off"}, cpus=2).log is False
    assert Settings.from_env({"SERVING_LOG": "0"}, cpus=2).log is False
    assert Settings.from_env({"SERVING_LOG": "ON"}, cpus=2).log is True
    assert Settings.from_env({}, cpus=2).log is True
    with pytest.raises(ValueError, match="SERVING_LOG='maybe'"):
        Settings.from_env({"SERVING_LOG": "maybe"}, cpus=2)


def test_every_answer_carries_the_ood_score_and_is_logged(monitored, monitored_model: Path, paths: MonitoringPaths,
                                                          run) -> None:
    reference = load_reference(monitored_model)
    images, _ = pattern_split(2, 9)
    inverted = 255 - images[0, 0]
    before = monitored.monitor.log.written
    answer = run(monitored.classify(png(images[0, 0]), k=2))
    shifted = run(monitored.classify(png(inverted), k=2))
    batch = run(monitored.classify_all([png(images[1, 0]), png(inverted)], k=1))
    explained = run(monitored.explain(png(inverted), format="json"))
    picture = run(monitored.explain(png(inverted)))
    saliency = json.loads(explained.body)

    # the same score the reference computes from the same model, input and embedding
    assert answer.ood_score is not None and answer.ood is (answer.ood_score > reference.ood_threshold)
    assert answer.ood is False  # a pattern image like the training split's
    assert shifted.ood is True and shifted.ood_score > reference.ood_threshold
    assert batch.ood == [False, True] and batch.ood_score[1] == pytest.approx(shifted.ood_score, rel=1e-4)
    assert saliency["ood"] is True and saliency["ood_score"] == pytest.approx(shifted.ood_score, rel=1e-4)
    assert picture.headers["X-OOD"] == "true" and float(picture.headers["X-OOD-Score"]) > reference.ood_threshold

    wait_written(monitored, before + 6)
    records = read_records(paths.log_dir).records[-6:]
    assert [r["endpoint"] for r in records] == ["/predict", "/predict", "/predict_batch", "/predict_batch",
                                                "/saliency", "/saliency"]
    assert [r["ood"] for r in records] == [False, True, False, True, True, True]
    first = records[0]
    assert first["model"]["name"] == "cnn-classifier" and first["model"]["version"] == "7"
    assert len(first["model"]["card_sha256"]) == 64 and len(first["embedding"]) == reference.embedding.shape[1]
    assert first["upload"]["format"] == "PNG" and first["upload"]["width"] == 32
    assert first["top_k"][0]["class"] == answer.predictions[0].label
    # never the image: no field holds anything near the upload's size
    assert max(len(json.dumps(value)) for value in first.values()) < 32 * 32


def test_class_metrics_count_each_answer_under_its_class(monitored, run) -> None:
    before = monitoring.traffic_counts(monitored.classes)
    images, _ = pattern_split(1, 4)
    answers = [run(monitored.classify(png(image[0]), k=1)).predictions[0].label for image in images]
    after = monitoring.traffic_counts(monitored.classes)
    assert set(after) == set(monitored.classes)  # bounded: the model's classes, nothing else
    assert {c: after[c] - before[c] for c in after} == {c: answers.count(c) for c in monitored.classes}


def test_panel_shows_traffic_reference_and_the_last_drift_verdict(monitored, paths: MonitoringPaths) -> None:
    panel = monitored.monitor.panel()
    assert panel["drift"] == {"checked": False, "message": "no drift check yet"}
    assert sum(panel["reference"].values()) == 300 and set(panel["reference"]) == set(monitored.classes)
    paths.drift_report.parent.mkdir(parents=True, exist_ok=True)
    signals = {"confidence": {"drift": True}, "embedding": {"drift": False}}
    paths.drift_report.write_text(json.dumps({"drift": True, "model": {"version": "7"}, "window": {"records": 300},
                                              "signals": signals}))
    verdict = monitored.monitor.panel()["drift"]
    assert verdict["checked"] and verdict["drift"] is True and verdict["signals"] == ["confidence"]
    paths.drift_report.write_text("{not json")
    assert "unreadable" in monitored.monitor.panel()["drift"]["message"]


def test_feedback_stores_the_upload_and_refuses_what_it_cannot(monitored, paths: MonitoringPaths, run) -> None:
    pool = ThreadPoolExecutor(1)
    image = png(pattern_split(1, 3)[0][2, 0])
    stored = run(monitoring.store_feedback(monitored.monitor, image, "owl", service.SETTINGS, pool))
    item = read_feedback(paths.review_dir / f"{stored.stored}.json")
    assert item["label"] == "owl" and item["model_version"] == "7"
    assert (paths.review_dir / item["image"]).read_bytes() == image
    with pytest.raises(FieldError, match=r"^label: 'eagle' is not a class of this model \(one of: cat, dog, owl\)"):
        run(monitoring.store_feedback(monitored.monitor, image, "eagle", service.SETTINGS, pool))
    with pytest.raises(ImageRejected, match="^image: not_an_image") as refused:
        run(monitoring.store_feedback(monitored.monitor, b"hello, not an image", "owl", service.SETTINGS, pool))
    assert refused.value.error_code == 415
    with pytest.raises(PayloadTooLarge):
        run(monitoring.store_feedback(monitored.monitor, image + bytes(service.SETTINGS.max_bytes), "owl",
                                      service.SETTINGS, pool))
    assert len(list(paths.review_dir.glob("*.json"))) == 1


SERVE_WITHOUT_REFERENCE = """
import asyncio, io, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import serving.service
service = serving.service.Classifier()
answer = asyncio.run(service.predict(image=Path(sys.argv[1])))
print("ood:", answer.ood, answer.ood_score, "panel:", service.monitor.panel()["reference"])
"""


def test_a_model_without_reference_serves_with_monitoring_off(exported_model: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(png(pattern_split(1, 5)[0][0, 0]))
    env = {**os.environ, "SERVING_MODEL": str(exported_model), "SERVING_LOG_DIR": str(tmp_path / "log"),
           "SERVING_REVIEW_DIR": str(tmp_path / "review")}
    done = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_REFERENCE, str(image)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ood: None None panel: None" in done.stdout
    assert "has no reference.npz (exported before monitoring): answers carry no OOD score" in done.stdout + done.stderr


def test_logging_off_writes_nothing(monitored_model: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(png(pattern_split(1, 5)[0][0, 0]))
    env = {**os.environ, "SERVING_MODEL": str(monitored_model), "SERVING_LOG": "off",
           "SERVING_LOG_DIR": str(tmp_path / "log")}
    done = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_REFERENCE, str(image)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ood: False" in done.stdout and not (tmp_path / "log").exists()


def test_store_import_carries_the_reference(monitored_model: Path, tmp_path: Path) -> None:
    script = ("import sys; from pathlib import Path; from serving import store; "
              "tag = store.import_export(sys.argv[1]); print(store.resolve_model_dir(tag))")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run([sys.executable, "-c", script, str(monitored_model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    stored = Path(done.stdout.split()[-1])
    assert (stored / "reference.npz").read_bytes() == (monitored_model / "reference.npz").read_bytes()
    assert load_reference(stored).ood_threshold == load_reference(monitored_model).ood_threshold
