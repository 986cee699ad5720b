"""The drift statistics and the feature records on synthetic data with a known answer."""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pipeline.common.features import (
    LOGGED_DECIMALS,
    Reference,
    UploadFacts,
    feature_records,
    mahalanobis_scores,
    ood_features,
    upload_facts,
)
from pipeline.lib.drift import ALPHA, Window, as_logged, class_test, compare, ks_test, mmd_test
from pipeline.lib.reference import fit_ood

CLASSES = ["cat", "dog", "owl"]
DIMS = 16
CENTRES = np.eye(3, DIMS) * 4  # one cluster per class in the embedding


def population(rng: np.random.Generator, n: int, shift: float = 0.0, classes: np.ndarray | None = None) -> Window:
    """n draws of what the logs hold for a model on its own distribution; ``shift`` moves the inputs."""
    labels = rng.integers(0, 3, n) if classes is None else classes
    embedding = CENTRES[labels] + rng.normal(size=(n, DIMS)) + shift
    return Window(predicted=labels, confidence=rng.beta(8, 1, n), mean_intensity=rng.normal(0.3 + shift / 10, 0.05, n),
                  std_intensity=rng.normal(0.2, 0.03, n), embedding=embedding, ood_score=np.zeros(n))


@pytest.fixture(scope="module")
def reference() -> Reference:
    rng = np.random.default_rng(0)
    train = population(rng, 2000)
    means, precision = fit_ood(ood_features(train.embedding, train.mean_intensity, train.std_intensity),
                               train.predicted)
    val = population(rng, 400)
    scores = mahalanobis_scores(ood_features(val.embedding, val.mean_intensity, val.std_intensity), means, precision)
    return Reference(embedding=val.embedding, predicted=val.predicted, confidence=val.confidence,
                     mean_intensity=val.mean_intensity, std_intensity=val.std_intensity, ood_score=scores,
                     ood_means=means, ood_precision=precision, ood_threshold=float(np.percentile(scores, 99)))


def test_no_drift_on_windows_from_the_reference_distribution(reference: Reference) -> None:
    rng = np.random.default_rng(1)
    alarms = [any(s.drift for s in compare(reference, population(rng, 300), CLASSES, permutations=200, seed=i))
              for i in range(40)]
    # Bonferroni keeps the family-wise rate at <= 5 %: 2 expected in 40; 6 would be a broken correction.
    assert sum(alarms) <= 5


def test_every_signal_reports_at_the_corrected_level(reference: Reference) -> None:
    signals = compare(reference, population(np.random.default_rng(2), 300), CLASSES)
    assert [s.name for s in signals] == ["predicted_class", "confidence", "mean_intensity", "std_intensity",
                                         "ood_score", "embedding"]
    assert all(s.threshold == pytest.approx(ALPHA / len(signals)) for s in signals)
    assert all(s.drift == (s.p_value < s.threshold) for s in signals)


def test_a_shifted_input_is_detected_by_the_embedding_and_the_ood_score(reference: Reference) -> None:
    signals = {s.name: s for s in compare(reference, population(np.random.default_rng(3), 300, shift=1.0), CLASSES)}
    assert signals["embedding"].drift and signals["ood_score"].drift and signals["mean_intensity"].drift


def test_a_class_mix_change_is_detected_by_the_class_test(reference: Reference) -> None:
    rng = np.random.default_rng(4)
    skewed = population(rng, 300, classes=rng.choice(3, 300, p=[0.6, 0.2, 0.2]))
    signals = {s.name: s for s in compare(reference, skewed, CLASSES)}
    assert signals["predicted_class"].drift
    assert not signals["std_intensity"].drift  # untouched signals stay quiet


def test_class_test_ignores_classes_neither_side_predicts() -> None:
    statistic, p_value = class_test(np.array([0, 1] * 50), np.array([0, 1] * 40), classes=5)
    assert statistic == pytest.approx(0.0) and p_value == pytest.approx(1.0)


def test_mmd_p_value_is_small_for_different_and_large_for_equal_samples() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    assert mmd_test(a, b, permutations=200)[1] > 0.05
    assert mmd_test(a, b + 0.5, permutations=200)[1] < 0.01


def test_too_small_or_foreign_windows_are_refused(reference: Reference) -> None:
    with pytest.raises(ValueError, match="at least 30"):
        compare(reference, population(np.random.default_rng(6), 10), CLASSES)
    other = population(np.random.default_rng(6), 50)
    other = Window(**{**other.__dict__, "embedding": other.embedding[:, :8]})
    with pytest.raises(ValueError, match="another model"):
        compare(reference, other, CLASSES)


def test_reference_round_trip(tmp_path, reference: Reference) -> None:
    loaded = Reference.load(reference.save(tmp_path / "reference.npz"))
    np.testing.assert_array_equal(loaded.embedding, reference.embedding)
    np.testing.assert_array_equal(loaded.ood_precision, reference.ood_precision)
    # the same arrays give the same bytes (the card records the file's sha256)
    assert reference.save(tmp_path / "again.npz").read_bytes() == (tmp_path / "reference.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "reference.npz") as archive:  # no clock in the file, whenever it is saved
        assert {member.date_time for member in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert loaded.ood_threshold == reference.ood_threshold
    np.savez(tmp_path / "partial.npz", embedding=reference.embedding)
    with pytest.raises(ValueError, match="partial.npz: not a monitoring reference"):
        Reference.load(tmp_path / "partial.npz")


def test_feature_records_from_one_answer(reference: Reference) -> None:
    probabilities = np.array([[0.1, 0.7, 0.2], [0.05, 0.05, 0.9]])
    embedding = np.stack([CENTRES[1], CENTRES[2] + 40])  # the second is far from every class
    pixels = np.full((2, 1, 4, 4), 255, np.uint8)
    pixels[0].flat[::2], pixels[0].flat[1::2] = 26, 128  # mean 0.302, std 0.2: like the reference
    records = feature_records(probabilities, embedding, pixels, CLASSES, reference,
                              [UploadFacts(123, "PNG", 4, 4), None], top_k=2)
    first, second = records
    assert first["top_k"] == [{"class": "dog", "probability": 0.7}, {"class": "owl", "probability": 0.2}]
    assert (first["predicted"], first["confidence"]) == (1, 0.7)
    assert (first["mean_intensity"], first["std_intensity"]) == (round(77 / 255, 6), 0.2)
    assert second["mean_intensity"] == 1.0 and second["std_intensity"] == 0.0
    assert first["upload"] == {"bytes": 123, "format": "PNG", "width": 4, "height": 4} and second["upload"] is None
    assert first["ood"] is False and second["ood"] is True
    assert second["ood_score"] > reference.ood_threshold > first["ood_score"]
    assert len(first["embedding"]) == DIMS
    assert "ood" not in feature_records(probabilities, embedding, pixels, CLASSES, None)[0]


def test_upload_facts_read_the_header_and_never_raise() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "JPEG")
    assert upload_facts(buffer.getvalue()) == UploadFacts(len(buffer.getvalue()), "JPEG", 40, 30)
    assert upload_facts(b"not an image") == UploadFacts(12)


def test_mahalanobis_scores_use_the_nearest_class() -> None:
    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    scores = mahalanobis_scores(np.array([[1.0, 0.0], [9.0, 0.0], [5.0, 3.0]]), means, np.eye(2))
    np.testing.assert_allclose(scores, [1.0, 1.0, 34.0])


def test_saturated_confidences_rounded_by_the_log_are_no_drift(reference: Reference) -> None:
    # A confident model: many top probabilities within 1e-6 of 1. The reference keeps them as float32,
    # the log rounds them to 6 decimals (feature_records), so 0.9999997 is 1.0 in the window.
    rng = np.random.default_rng(7)

    def saturated(n: int) -> np.ndarray:
        return (1 - 10 ** -rng.uniform(5, 8, n)).astype(np.float32)

    ref = replace(reference, confidence=saturated(len(reference.predicted)))
    window = population(rng, 300)
    window = replace(window, confidence=np.array([round(float(c), LOGGED_DECIMALS) for c in saturated(300)]))
    assert ks_test(ref.confidence, window.confidence)[1] < 1e-6  # unrounded against rounded: a false "shift"
    signals = {s.name: s for s in compare(ref, window, CLASSES)}
    assert not signals["confidence"].drift and signals["confidence"].p_value > 0.05


def test_the_drift_tests_round_as_the_log_does(reference: Reference) -> None:
    # as_logged must keep exactly what feature_records keeps, or the two sides differ by rounding alone
    values = np.random.default_rng(8).random((3, 3)).astype(np.float32)
    probabilities = values / values.sum(axis=1, keepdims=True)
    pixels = np.random.default_rng(9).integers(0, 256, (3, 1, 5, 7), dtype=np.uint8)
    records = feature_records(probabilities, np.zeros((3, DIMS)), pixels, CLASSES, reference)
    window = Window.from_records(records)
    for name in ("confidence", "mean_intensity", "std_intensity"):
        logged = getattr(window, name)
        np.testing.assert_array_equal(as_logged(logged), logged)  # already at the log's precision
    np.testing.assert_array_equal(window.confidence, as_logged(probabilities.max(axis=1)))
