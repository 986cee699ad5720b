"""``python -m pipeline.monitor``: the drift check on a logged window, and feedback into the dataset."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from pipeline import monitor
from pipeline.common.contract import CARD_FILE, CLASSIFIER_FILE, REFERENCE_FILE, ContractError, ModelCard, sha256_file
from pipeline.common.features import Reference, feature_records
from pipeline.common.feedback import FeedbackError, write_feedback
from pipeline.common.predlog import PredictionLog, model_identity, prediction_record
from pipeline.lib.reference import add_reference
from tests.conftest import ROOT, SERVING_CLASSES, pattern_image, tool_env, write_export


def patterns(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    return np.stack([pattern_image(int(label), rng)[None] for label in labels]), labels


@pytest.fixture(scope="module")
def deployable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving fixture's export (random LeNet-5, cat/dog/owl, 1×32×32) plus a reference on pattern images."""
    folder = write_export(tmp_path_factory.mktemp("export"))
    add_reference(folder, ModelCard.read(folder), patterns(600, seed=0), patterns(300, seed=1)[0])
    return folder


def write_log(folder: Path, deployable: Path, images: np.ndarray) -> None:
    """Answer ``images`` as the service will: classifier.onnx, feature records, the prediction log."""
    card, reference = ModelCard.read(deployable), Reference.load(deployable / REFERENCE_FILE)
    session = ort.InferenceSession(str(deployable / CLASSIFIER_FILE), providers=["CPUExecutionProvider"])
    probabilities, embedding = session.run(["probabilities", "embedding"], {"image": images})
    identity = model_identity(card.registered_model, card.version, sha256_file(deployable / CARD_FILE))
    log = PredictionLog(folder)
    for features in feature_records(probabilities, embedding, images, card.classes, reference):
        assert log.log(prediction_record(features, identity, "/predict"))
    log.close()
    assert log.written == len(images)


def card_only(folder: Path) -> Path:
    """A deployable folder holding just a card (cat/dog/owl): what the feedback import reads."""
    folder.mkdir(parents=True)
    card = ModelCard(architecture="lenet5", classes=SERVING_CLASSES, image_size=32, channels=1, mean=[0.5], std=[0.25],
                     registered_model="cnn-classifier", version="7")
    (folder / CARD_FILE).write_text(card.to_json())
    return folder


def run_monitor(*args: str, tracking: Path) -> subprocess.CompletedProcess:
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tracking}")
    return subprocess.run([sys.executable, "-m", "pipeline.monitor", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_drift_check_on_logged_traffic(tmp_path: Path, deployable: Path) -> None:
    same, _ = patterns(300, seed=2)
    write_log(tmp_path / "same", deployable, same)
    write_log(tmp_path / "inverted", deployable, 255 - same)
    store = tmp_path / "mlflow.db"

    quiet = run_monitor("--log", str(tmp_path / "same"), "--model", str(deployable), "--last", "300",
                        "--out", str(tmp_path / "out-same"), "--fail-on-drift", tracking=store)
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads((tmp_path / "out-same" / "drift.json").read_text())["drift"] is False
    assert "no drift: model version 7, last 300 predictions" in quiet.stdout
    assert "embedding" in quiet.stdout and "MMD" in quiet.stdout

    loud = run_monitor("--log", str(tmp_path / "inverted"), "--model", str(deployable), "--last", "300",
                       "--out", str(tmp_path / "out-inverted"), "--fail-on-drift", tracking=store)
    assert loud.returncode == monitor.DRIFT_EXIT, loud.stderr
    document = json.loads((tmp_path / "out-inverted" / "drift.json").read_text())
    assert document["drift"] is True and document["signals"]["mean_intensity"]["drift"] is True
    assert document["window"]["records"] == 300 and document["model"]["version"] == "7"
    assert "DRIFT: model version 7" in loud.stdout
    page = (tmp_path / "out-inverted" / "report.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # opens offline, fetches nothing
    assert page.count("data:image/png;base64,") == 6

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=["cnn-mlops-monitoring"], output_format="list")
    assert sorted(run.data.tags["drift"] for run in runs) == ["false", "true"]
    assert {run.data.tags["model_version"] for run in runs} == {"7"}


def test_drift_check_refuses_a_deployable_without_reference(tmp_path: Path, capsys) -> None:
    folder = card_only(tmp_path / "export")
    assert monitor.main(["--log", str(tmp_path), "--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert f"{folder / REFERENCE_FILE}: no monitoring reference" in capsys.readouterr().err


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_feedback_writer_checks_label_and_image(tmp_path: Path) -> None:
    item = write_feedback(tmp_path, png(1), "dog", SERVING_CLASSES, "7", predicted="cat")
    stored = json.loads(item.read_text())
    assert stored["label"] == "dog" and stored["model_version"] == "7" and stored["predicted"] == "cat"
    assert (tmp_path / stored["image"]).read_bytes() == png(1) and stored["image"].endswith(".png")
    with pytest.raises(FeedbackError, match="label 'horse' is not a class of this model"):
        write_feedback(tmp_path, png(2), "horse", SERVING_CLASSES, "7")
    with pytest.raises(FeedbackError, match="not an image"):
        write_feedback(tmp_path, b"hello", "dog", SERVING_CLASSES, "7")
    assert len(list(tmp_path.glob("*.json"))) == 1  # refused feedback leaves nothing behind


def test_feedback_into_the_dataset(tmp_path: Path, capsys) -> None:
    model = card_only(tmp_path / "export")
    data = tmp_path / "data"
    for name in SERVING_CLASSES:
        (data / name).mkdir(parents=True)
        (data / name / "existing.png").write_bytes(png(200))
    review = tmp_path / "review"
    for value in range(5):
        write_feedback(review, png(value), SERVING_CLASSES[value % 3], SERVING_CLASSES, "7")
    args = ["feedback", "--review", str(review), "--out", str(data), "--model", str(model)]

    assert monitor.main(args) == 0
    assert "5 image(s) added" in capsys.readouterr().out
    added = sorted(data.glob("*/feedback-*.png"))
    assert len(added) == 5 and sorted({p.parent.name for p in added}) == SERVING_CLASSES
    assert {p.read_bytes() for p in added} == {png(v) for v in range(5)}
    assert all((data / name / "existing.png").read_bytes() == png(200) for name in SERVING_CLASSES)

    assert monitor.main(args) == 0  # again: nothing new, nothing overwritten
    out = capsys.readouterr().out
    assert "0 image(s) added to" in out and "5 already there" in out
    assert len(sorted(data.glob("*/feedback-*.png"))) == 5

    item = json.loads((review / f"{hashlib.sha256(png(0)).hexdigest()}.json").read_text())
    (review / f"{item['sha256']}.json").write_text(json.dumps({**item, "label": "horse"}))
    assert monitor.main(args) == 1
    err = capsys.readouterr().err
    assert "label 'horse' is not a class of the model (one of: cat, dog, owl)" in err and item["sha256"] in err


def test_feedback_goes_to_train_in_a_pre_split_dataset(tmp_path: Path) -> None:
    model = card_only(tmp_path / "export")
    data = tmp_path / "data"
    (data / "train" / "cat").mkdir(parents=True)
    (data / "train" / "cat" / "a.png").write_bytes(png(9))
    write_feedback(tmp_path / "review", png(3), "owl", SERVING_CLASSES, "7")
    assert monitor.main(["feedback", "--review", str(tmp_path / "review"), "--out", str(data),
                         "--model", str(model)]) == 0
    assert [p.parent.name for p in (data / "train").glob("*/feedback-*.png")] == ["owl"]


def test_reference_is_checked_against_the_card(tmp_path: Path) -> None:
    files = {CLASSIFIER_FILE: b"graph", "saliency.onnx": b"maps", REFERENCE_FILE: b"reference"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    card = ModelCard.read(card_only(tmp_path / "card")).model_copy(
        update={"files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}})
    card.verify_files(tmp_path)
    (tmp_path / REFERENCE_FILE).write_bytes(b"another reference")
    with pytest.raises(ContractError, match="reference.npz: missing or not the file model_card.json lists"):
        card.verify_files(tmp_path)
    (tmp_path / REFERENCE_FILE).unlink()
    with pytest.raises(ContractError, match="reference.npz: missing"):
        card.verify_files(tmp_path)


@pytest.mark.slow
def test_export_reference_lists_its_hash_and_threshold(deployable: Path) -> None:
    card = ModelCard.read(deployable)
    assert card.files[REFERENCE_FILE] == sha256_file(deployable / REFERENCE_FILE)
    reference = Reference.load(deployable / REFERENCE_FILE)
    assert card.ood_threshold == reference.ood_threshold == pytest.approx(np.percentile(reference.ood_score, 99))
    assert reference.embedding.shape == (300, 84)  # the validation images, LeNet-5's penultimate width
    card.verify_files(deployable)
