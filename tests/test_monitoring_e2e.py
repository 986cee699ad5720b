"""Monitoring acceptance against a real server (``LocalServer``): drift verdicts on logged traffic, the
endpoints' OOD fields, metrics and /feedback over HTTP, a worker's ``kill -9`` under load, the log's disk bound.

The model is the session's ``monitored_model`` (conftest: the serving fixture LeNet-5 with a
``reference.npz`` fitted on pattern images); the traffic is fresh pattern images from the same
generator (in distribution) and the same images inverted (shifted).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline.common.features import feature_records, load_reference
from pipeline.common.predlog import PredictionLog, model_identity, prediction_record, read_records
from pipeline.lib.local_server import LocalServer
from tests.conftest import SERVING_CLASSES, pattern_split, tool_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def wait_for_records(log_dir: Path, count: int, timeout_s: float = 60) -> list[dict]:
    """The log's records once it holds ``count`` (the workers write in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(log_dir).records if log_dir.is_dir() else []
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def predict_all(url: str, blobs: list[bytes], clients: int = 8) -> list[dict]:
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda blob: http.post("/predict", files={"image": ("x.png", blob)}), blobs))
    assert [a.status_code for a in answers] == [200] * len(blobs), answers[0].text
    return [a.json() for a in answers]


def run_monitor(log_dir: Path, model: Path, out: Path, tracking: Path) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, "-m", "pipeline.monitor", "--log", str(log_dir), "--model", str(model),
                           "--last", "300", "--out", str(out), "--fail-on-drift"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tracking}"))
    print(done.stdout)  # the table: statistics and p-values, for the record
    return done, json.loads((out / "drift.json").read_text())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the /metrics page (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module server's home, log/, review/ and monitor/."""
    return tmp_path_factory.mktemp("monitoring_server")


@pytest.fixture(scope="module")
def server(monitored_model: Path, root: Path) -> Iterator[LocalServer]:
    running = LocalServer(root, SERVING_MODEL=str(monitored_model), SERVING_WORKERS="2",
                          SERVING_LOG_DIR=str(root / "log"), SERVING_REVIEW_DIR=str(root / "review"),
                          SERVING_DRIFT_REPORT=str(root / "monitor" / "drift.json"))
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.log()


@pytest.mark.timeout(300)
def test_drift_verdicts_on_served_traffic(server: LocalServer, root: Path, monitored_model: Path, tmp_path: Path
                                          ) -> None:
    log_dir, reference = root / "log", load_reference(monitored_model)
    same, _ = pattern_split(100, seed=3)  # 300 new images from the training images' generator
    answers = predict_all(server.url, [png(image[0]) for image in same])
    assert len(wait_for_records(log_dir, 300)) == 300
    quiet, verdict = run_monitor(log_dir, monitored_model, root / "monitor", tmp_path / "mlflow.db")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert verdict["drift"] is False and verdict["window"]["records"] == 300
    assert "no drift: model version 7, last 300 predictions" in quiet.stdout
    # the answers' flags: few in distribution (the threshold is the validation split's 99th percentile)
    assert sum(a["ood"] for a in answers) <= 15 and all(a["ood_score"] >= 0 for a in answers)

    shifted = predict_all(server.url, [png(255 - image[0]) for image in same])
    assert len(wait_for_records(log_dir, 600)) == 600
    loud, verdict = run_monitor(log_dir, monitored_model, root / "monitor", tmp_path / "mlflow.db")
    assert loud.returncode == 3, loud.stderr[-2000:]  # --fail-on-drift
    assert verdict["drift"] is True and verdict["signals"]["mean_intensity"]["drift"] is True
    assert sum(a["ood"] for a in shifted) > 150 and min(a["ood_score"] for a in shifted) > 0
    assert all(a["ood"] == (a["ood_score"] > reference.ood_threshold) for a in answers + shifted)
    # The panel reads the verdict the monitor just wrote.
    panel = httpx.get(f"{server.url}/monitoring").json()
    assert panel["drift"]["checked"] and panel["drift"]["drift"] is True
    assert "mean_intensity" in panel["drift"]["signals"]

    page = httpx.get(f"{server.url}/metrics").text
    counted = {name: metric(page, "classifier_predictions_total", **{"class": name}) for name in SERVING_CLASSES}
    answered = [a["predictions"][0]["label"] for a in answers + shifted]
    assert counted == {name: answered.count(name) for name in SERVING_CLASSES}  # both workers, every class
    assert metric(page, "classifier_prediction_confidence_count") == 600
    assert metric(page, "classifier_ood_total") == sum(a["ood"] for a in answers + shifted)
    assert "# TYPE classifier_prediction_log_dropped_total counter" in page
    assert metric(page, "classifier_prediction_log_dropped_total") == 0
    labelled = {line.split('"')[1] for line in page.splitlines() if line.startswith("classifier_predictions_total{")}
    assert labelled == set(SERVING_CLASSES)  # label values: the model's classes, nothing else


@pytest.mark.timeout(120)
def test_answers_declare_ood_and_feedback_over_http(server: LocalServer, root: Path) -> None:
    image = png(pattern_split(1, seed=8)[0][1, 0])
    with httpx.Client(base_url=server.url, timeout=30) as http:
        batch = http.post("/predict_batch", files=[("images", ("a.png", image)), ("images", ("b.png", image))]).json()
        assert batch["ood"] == [False, False] and batch["ood_score"][0] == batch["ood_score"][1]
        explained = http.post("/saliency", files={"image": ("a.png", image)}, data={"format": "json"}).json()
        assert explained["ood"] is False and explained["ood_score"] == pytest.approx(batch["ood_score"][0], rel=1e-4)
        picture = http.post("/saliency", files={"image": ("a.png", image)})
        assert picture.headers["x-ood"] == "false" and float(picture.headers["x-ood-score"]) >= 0

        stored = http.post("/feedback", files={"image": ("a.png", image)}, data={"label": "dog"})
        assert stored.status_code == 200, stored.text
        item = json.loads((root / "review" / f"{stored.json()['stored']}.json").read_text())
        assert item["label"] == "dog" and item["model_version"] == "7"
        refusals = {
            "label": http.post("/feedback", files={"image": ("a.png", image)}, data={"label": "eagle"}),
            "missing": http.post("/feedback", files={"image": ("a.png", image)}),
            "text": http.post("/feedback", files={"image": ("a.txt", b"not an image")}, data={"label": "dog"}),
            "broken": http.post("/feedback", files={"image": ("a.png", image[:60])}, data={"label": "dog"}),
            "get": http.get("/feedback"),
        }
    statuses = {name: answer.status_code for name, answer in refusals.items()}
    assert statuses == {"label": 400, "missing": 400, "text": 415, "broken": 422, "get": 405}
    assert refusals["label"].json()["error"].startswith("label: 'eagle' is not a class of this model")
    assert refusals["missing"].json()["error"].startswith("label")
    assert len(list((root / "review").glob("*.json"))) == 1  # refusals store nothing


def worker_pids(log_dir: Path) -> set[int]:
    """The live worker processes that write the log (each names its files with its pid)."""
    pids = {int(path.name.split("-")[1]) for path in log_dir.glob("*.jsonl")}
    return {pid for pid in pids if psutil.pid_exists(pid)}


@pytest.mark.timeout(300)
def test_kill_9_of_a_worker_under_load_keeps_every_earlier_record(monitored_model: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    server = LocalServer(tmp_path, SERVING_MODEL=str(monitored_model), SERVING_WORKERS="2",
                         SERVING_LOG_DIR=str(log_dir))
    blobs = [png(image[0]) for image in pattern_split(20, seed=4)[0]]
    answered = {"before": 0, "after": 0}
    phase = ["before"]
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            i = 0
            while not stop.is_set():
                try:
                    if http.post("/predict", files={"image": ("x.png", blobs[i % len(blobs)])}).status_code == 200:
                        answered[phase[0]] += 1
                except httpx.HTTPError:  # the killed worker's connection
                    pass
                i += 1

    try:
        server.wait_ready()
        predict_all(server.url, blobs * 5, clients=4)  # 300 answers, both workers
        settled = wait_for_records(log_dir, 300)
        assert len(settled) == 300
        snapshot = {path: path.read_bytes() for path in log_dir.glob("*.jsonl")}
        victims = worker_pids(log_dir)
        assert len(victims) >= 1
        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        while answered["before"] < 200:  # under load: answers are flowing when the kill lands
            time.sleep(0.01)
        victim = min(victims)
        os.kill(victim, signal.SIGKILL)
        phase[0] = "after"
        while answered["after"] < 200:  # the other worker (or a restarted one) keeps answering
            time.sleep(0.01)
        stop.set()
        for client in clients:
            client.join()
    finally:
        stop.set()
        server.stop()

    found = read_records(log_dir)
    total = 300 + answered["before"] + answered["after"]
    print(f"kill -9 of worker {victim}: {total} answers, {len(found.records)} records readable, "
          f"{found.skipped} torn line(s) skipped, {len(snapshot)} files before the kill")
    for path, before in snapshot.items():  # every record written before the kill is there, byte for byte
        assert path.read_bytes().startswith(before), path
    assert found.skipped <= 1  # at most the victim's last line, torn by the kill
    assert len(found.records) >= 300 + answered["after"]
    assert total - len(found.records) <= 10_000  # lost: at most what was queued in the victim (its queue size)
    for path in log_dir.glob("*.jsonl"):  # only a file of the victim may end without a newline
        assert path.read_bytes().endswith(b"\n") or f"-{victim}-" in path.name, path


@pytest.mark.timeout(300)
def test_disk_use_stays_under_the_bound_after_100000_predictions(monitored_model: Path, tmp_path: Path) -> None:
    """The service's writer, driven directly with the service's own records (a small bound keeps it fast)."""
    bound, file_bytes = 4 * 2**20, 512 * 2**10
    reference = load_reference(monitored_model)
    images, _ = pattern_split(4, seed=6)
    probabilities = np.full((len(images), 3), 1 / 3)
    records = feature_records(probabilities, reference.embedding[: len(images)], images, SERVING_CLASSES, reference)
    identity = model_identity("cnn-classifier", "7", "0" * 64)
    log = PredictionLog(tmp_path / "log", max_bytes=bound, file_bytes=file_bytes)
    largest = 0
    for i in range(100_000):
        record = prediction_record(records[i % len(records)], identity, "/predict")
        while not log.log(record):  # the service would drop it; here every record must reach the disk
            time.sleep(0.001)
        if i % 5_000 == 0:
            largest = max(largest, sum(p.stat().st_size for p in (tmp_path / "log").glob("*.jsonl")))
    log.close(timeout=120)
    used = sum(p.stat().st_size for p in (tmp_path / "log").glob("*.jsonl"))
    line = len(json.dumps(prediction_record(records[0], identity, "/predict"), separators=(",", ":"))) + 1
    print(f"100,000 records of ~{line} bytes ({100_000 * line / 2**20:.0f} MiB written): {used} bytes on disk, "
          f"largest seen {largest}, bound {bound}")
    assert log.written == 100_000
    assert max(used, largest) <= bound
    assert used >= bound - 2 * file_bytes  # the newest records are kept, up to the bound
    assert read_records(tmp_path / "log").skipped == 0
