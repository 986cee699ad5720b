"""The whole pipeline through the real ``dvc repro``, in a temporary copy of the project."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.common.contract import REFERENCE_FILE, ModelCard
from pipeline.common.features import Reference
from pipeline.lib.engine import predict_logits
from pipeline.lib.trained import load_trained
from tests.conftest import add_dataset, copy_project, sh, tool_env

TINY = {
    "preprocess": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25, "workers": 2},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.05, "threads": 2},
    "evaluate": {"saliency_per_class": 1},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("pipeline") / "repo", TINY)
    add_dataset(repo, classes=3, per_class=24, side=20)
    out = sh(repo, "dvc", "repro")
    for stage in ("preprocess", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    return repo


@pytest.mark.slow
def test_repro_writes_every_output_and_is_up_to_date(repo: Path):
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"top1", "top5", "top5_k", "loss", "samples"}  # per class: plots/, below
    per_class = json.loads((repo / "plots" / "eval" / "per_class.json").read_text())
    classes = json.loads((repo / "artifacts" / "preprocessed" / "manifest.json").read_text())["classes"]
    assert [row["class"] for row in per_class] == classes
    assert all({"precision", "recall", "support"} <= set(row) for row in per_class)
    assert sum(row["support"] for row in per_class) == metrics["samples"]
    assert metrics["top5_k"] == 3  # only 3 classes: top-5 is top-3, and says so
    assert metrics["top1"] > 0.9  # the tinted classes are easy
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["epochs"] == 3
    for figure in ("confusion_matrix.png", "confident_mistakes.png", "saliency.png"):
        assert (repo / "artifacts" / "eval" / figure).stat().st_size > 1000
    card = ModelCard.read(repo / "artifacts" / "export")
    card.verify_files(repo / "artifacts" / "export")  # the card names both files by sha256
    run_id = (repo / "artifacts" / "train" / "run_id").read_text().strip()
    assert (card.classes, card.image_size, card.channels, card.mlflow_run_id) == (["c0", "c1", "c2"], 32, 3, run_id)
    assert card.metrics == {"top1": metrics["top1"], "top5": metrics["top5"]} and card.version == "1"
    for name in ("classifier.onnx", "saliency.onnx"):
        model = onnx.load(repo / "artifacts" / "export" / name)
        onnx.checker.check_model(model)
        props = {p.key: p.value for p in model.metadata_props}
        assert ModelCard.from_onnx_props(props) == card.model_copy(update={"files": {}, "version": "",
                                                                           "ood_threshold": None})
    # the monitoring reference: listed by sha256 (verify_files checked it), its threshold in the card
    reference = Reference.load(repo / "artifacts" / "export" / REFERENCE_FILE)
    assert REFERENCE_FILE in card.files and card.ood_threshold == reference.ood_threshold
    counts = json.loads((repo / "artifacts" / "preprocessed" / "manifest.json").read_text())["counts"]
    assert len(reference.embedding) == (counts["val"] or counts["test"])  # the validation split, else the test split
    assert json.loads(sh(repo, "dvc", "status", "--json")) == {}
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "repro")
    assert "top1" in sh(repo, "dvc", "metrics", "show")
    sh(repo, "dvc", "plots", "show", "-o", str(repo / "dvc_plots"))
    assert (repo / "dvc_plots" / "index.html").exists()


@pytest.mark.slow
def test_mlflow_run_and_registered_version(repo: Path):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_id = (repo / "artifacts" / "train" / "run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"test_top1", "test_top5", "test_loss", "val_top1", "best_val_top1"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert "eval/confusion_matrix.png" in artifacts and "eval/saliency.png" in artifacts
    version = client.get_model_version_by_alias("cnn-classifier", "candidate")
    assert version.run_id == run_id
    assert version.tags["mlflow_run_id"] == run_id
    assert float(version.tags["test_top1"]) == pytest.approx(run.data.metrics["test_top1"])
    # a second export run makes a new version that takes the alias
    sh(repo, "dvc", "repro", "--force", "--single-item", "export", env=tool_env())
    newer = client.get_model_version_by_alias("cnn-classifier", "candidate")
    assert int(newer.version) == int(version.version) + 1


@pytest.mark.slow
def test_onnx_runtime_matches_pytorch_on_the_test_split(repo: Path):
    images = np.load(repo / "artifacts" / "preprocessed" / "test_images.npy")
    model, card = load_trained(repo / "artifacts" / "train" / "model.pt")
    session = ort.InferenceSession(str(repo / "artifacts" / "export" / "classifier.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx_logits, probabilities = session.run(["logits", "probabilities"], {"image": images})
    torch_logits = predict_logits(model, images, card.mean, card.std)
    tolerance = 1e-4
    assert np.abs(onnx_logits - torch_logits).max() <= tolerance
    # The same predicted class, except for an image whose two top logits lie within rounding of
    # each other: there either class is right, and which one wins depends on the CPU's kernels.
    top2 = np.sort(torch_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    np.testing.assert_array_equal(onnx_logits.argmax(1)[clear], torch_logits.argmax(1)[clear])
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(torch_logits), 1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_changing_a_param_reruns_its_stage(repo: Path):
    """Regression: with whole-section params DVC's run cache restored outputs of other values."""
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("image_size: 32", "image_size: 24", 1))
    try:
        out = sh(repo, "dvc", "repro", "preprocess")
        assert "Running stage 'preprocess'" in out
        manifest = json.loads((repo / "artifacts" / "preprocessed" / "manifest.json").read_text())
        assert manifest["image_size"] == 24
    finally:
        params.write_text(original)
        sh(repo, "dvc", "repro", "preprocess")  # back to the fixture's outputs (from the run cache)
    assert json.loads((repo / "artifacts" / "preprocessed" / "manifest.json").read_text())["image_size"] == 32


def _vega_encodings(spec: dict) -> dict:
    """The x/y/color encodings of a rendered Vega-Lite spec (faceted ones keep them under ``spec``)."""
    return (spec.get("spec") or spec)["encoding"]


@pytest.mark.slow
def test_dvc_plots_one_titled_chart_per_quantity(repo: Path):
    done = subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=tool_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert not shown.get("errors"), shown.get("errors")
    charts = {name: renders[0] for name, renders in shown["data"].items()}
    vega = {name: chart["content"] for name, chart in charts.items() if chart["type"] == "vega"}
    # One chart per quantity: nothing per raw file (that gave a stray learning-rate-against-"step" chart).
    assert set(vega) == {"loss", "accuracy", "confusion", "recall", "precision"}
    assert {name for name, chart in charts.items() if chart["type"] == "image"} == {
        "artifacts/train/training_curves.png", "artifacts/eval/confusion_matrix.png"}
    for name, spec in vega.items():
        encoding = _vega_encodings(spec)
        assert spec["title"]["text"], name
        assert encoding["x"]["title"] and encoding["y"]["title"] not in ("", "y", "step"), (name, encoding)
    for name, curves, axis in (("loss", {"train_loss", "val_loss"}, "loss"),
                               ("accuracy", {"train_accuracy", "val_top1", "val_top5"}, "accuracy")):
        encoding = vega[name]["encoding"]
        assert (encoding["x"]["field"], encoding["x"]["title"], encoding["y"]["title"]) == ("epoch", "epoch", axis)
        assert encoding["color"] == {"field": "field", "type": "nominal", "title": "curve"}  # colour + legend
        assert {row["field"] for row in vega[name]["data"]["values"]} == curves  # no lr among them
    # Like artifacts/eval/confusion_matrix.png: actual classes down the rows, predicted across.
    confusion = _vega_encodings(vega["confusion"])
    assert (confusion["x"]["field"], confusion["y"]["field"]) == ("predicted", "actual")
    assert (confusion["x"]["title"], confusion["y"]["title"]) == ("predicted", "actual")
    assert {row["class"] for row in vega["recall"]["data"]["values"]} == {"c0", "c1", "c2"}
