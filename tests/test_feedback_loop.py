"""The feedback loop end to end: feedback on 5 images, ``monitor feedback``, ``dvc add data``, ``dvc repro``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common.contract import ModelCard
from pipeline.common.feedback import write_feedback
from tests.conftest import add_dataset, copy_project, sh

TINY = {
    "preprocess": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25, "workers": 2},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "threads": 2},
    "evaluate": {"saliency_per_class": 1},
}


def upload(seed: int) -> bytes:
    """A new 20×20 RGB PNG, as a person would upload it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_feedback_reaches_the_next_training_run(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo", TINY)
    add_dataset(repo, classes=3, per_class=24, side=20)
    sh(repo, "dvc", "repro")
    card = ModelCard.read(repo / "artifacts" / "export")
    review = repo / "artifacts" / "review"
    for i in range(5):  # what /feedback stores: the upload and the right label
        write_feedback(review, upload(i), card.classes[i % 3], card.classes, card.version, predicted=card.classes[0])

    out = sh(repo, "bin/python", "-m", "pipeline.monitor", "feedback", "--review", "artifacts/review", "--out", "data",
             "--model", "artifacts/export")
    assert "5 image(s) added to data" in out
    sh(repo, "dvc", "add", "data", "-q")
    rerun = sh(repo, "dvc", "repro")
    assert "Running stage 'preprocess'" in rerun and "Running stage 'train'" in rerun

    manifest = json.loads((repo / "artifacts" / "preprocessed" / "manifest.json").read_text())
    added = sorted(row["path"] for row in manifest["files"] if "/feedback-" in row["path"])
    assert len(added) == 5
    assert sorted(path.split("/")[0] for path in added) == sorted(card.classes[i % 3] for i in range(5))
    assert sum(manifest["counts"].values()) == 3 * 24 + 5
