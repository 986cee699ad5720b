"""The monitoring reference the export stage stores beside the model (``reference.npz``).

It is computed by running the exported ``classifier.onnx`` itself (ONNX Runtime, CPU), so the
reference and the served answers come from the same graph: the OOD model (class means and a
shared Ledoit–Wolf-shrunk covariance of the training split's embeddings) and the features of the
validation split, the data the drift tests compare traffic with. Validation, not training, data:
a network is more confident and more tightly clustered on images it was trained on, so traffic
like the test split would look "shifted" against the training split.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.common.contract import CARD_FILE, CLASSIFIER_FILE, REFERENCE_FILE, ModelCard, sha256_file
from pipeline.common.features import OOD_PERCENTILE, Reference, ood_features, pixel_stats
from pipeline.lib.onnx_checks import cpu_session

log = logging.getLogger(__name__)
MAX_ROWS = 5000  # per split: bounds the export's cost and the file (~3 MB at 128 dims) on large datasets
BATCH = 64


def classifier_outputs(path: str | Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), embedding (N, E)) of ``classifier.onnx`` on uint8 images (N, C, H, W)."""
    session = cpu_session(path)
    parts = [session.run(["probabilities", "embedding"], {"image": np.ascontiguousarray(images[i:i + BATCH])})
             for i in range(0, len(images), BATCH)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])


def _sample(count: int, limit: int, seed: int) -> np.ndarray:
    """Row indices: all of them, or a seeded sorted sample of ``limit``."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def fit_ood(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means of the classes present (K', D) and the precision (D, D) of the shared within-class
    covariance, shrunk (Ledoit–Wolf) so that it inverts even with fewer images than dimensions.
    """
    from sklearn.covariance import LedoitWolf

    features = features.astype(np.float64)
    present, index = np.unique(labels, return_inverse=True)
    means = np.stack([features[index == i].mean(axis=0) for i in range(len(present))])
    return means, LedoitWolf().fit(features - means[index]).precision_


def build_reference(classifier_path: str | Path, train: tuple[np.ndarray, np.ndarray], val_images: np.ndarray,
                    seed: int = 0) -> Reference:
    """Fit the OOD model on ``train`` (images, labels) and describe ``val_images`` for the drift tests.

    Args:
        classifier_path: the exported ``classifier.onnx``.
        train: training-split uint8 images (N, C, H, W) and their labels (N,).
        val_images: validation-split uint8 images; at least one.
        seed: for the row sample of splits over :data:`MAX_ROWS`.
    """
    if len(val_images) == 0:
        raise ValueError("the validation split is empty: the monitoring reference needs images "
                         "(raise preprocess.val_fraction)")
    train_images, train_labels = train
    rows = _sample(len(train_images), MAX_ROWS, seed)
    sample = train_images[rows]
    _, train_embedding = classifier_outputs(classifier_path, sample)
    means, precision = fit_ood(ood_features(train_embedding, *pixel_stats(sample)), np.asarray(train_labels)[rows])

    val_images = val_images[_sample(len(val_images), MAX_ROWS, seed + 1)]
    probabilities, embedding = classifier_outputs(classifier_path, val_images)
    mean_intensity, std_intensity = pixel_stats(val_images)
    reference = Reference(
        embedding=embedding.astype(np.float32), predicted=probabilities.argmax(1).astype(np.int64),
        confidence=probabilities.max(1).astype(np.float32), mean_intensity=mean_intensity,
        std_intensity=std_intensity, ood_score=np.zeros(len(val_images)), ood_means=means, ood_precision=precision,
        ood_threshold=0.0)
    scores = reference.ood_scores(embedding, mean_intensity, std_intensity)  # the service's own computation
    return replace(reference, ood_score=scores, ood_threshold=float(np.percentile(scores, OOD_PERCENTILE)))


def add_reference(folder: Path, card: ModelCard, train: tuple[np.ndarray, np.ndarray],
                  val_images: np.ndarray) -> ModelCard:
    """Write ``folder/reference.npz`` (:func:`build_reference` on ``folder/classifier.onnx``), list its
    sha256 and the OOD threshold in the card and rewrite ``folder/model_card.json``; returns the card."""
    reference = build_reference(folder / CLASSIFIER_FILE, train, val_images)
    reference.save(folder / REFERENCE_FILE)
    card = card.model_copy(update={"files": {**card.files, REFERENCE_FILE: sha256_file(folder / REFERENCE_FILE)},
                                   "ood_threshold": reference.ood_threshold})
    (folder / CARD_FILE).write_text(card.to_json())
    log.info("monitoring reference: %d validation images, embedding %d dims, OOD threshold %.3g (p%g)",
             len(reference.embedding), reference.embedding.shape[1], reference.ood_threshold, OOD_PERCENTILE)
    return card
