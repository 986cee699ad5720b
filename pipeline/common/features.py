"""What monitoring records about one answered image, and how unlike the training data it is.

The service turns each answer into a feature record (:func:`feature_records`): top-k classes,
input statistics, facts about the upload and the embedding ``classifier.onnx`` emits beside the
probabilities. The export stage computes the same quantities on the validation split and stores
them as ``reference.npz`` (:class:`Reference`), so ``python -m pipeline.monitor`` compares like
with like, and every answer can carry an out-of-distribution score against the same reference.

The OOD score is the Mahalanobis distance of the embedding, with the input's mean and standard
deviation appended (:func:`ood_features`), to the nearest class mean under one shared (shrunk)
covariance of the training split's (Lee et al., 2018, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples"): K×E×E multiply-adds per image, no extra graph, and unlike the
softmax confidence it does not saturate on inputs far from every class. The two input
statistics catch what the network maps onto familiar features (an inverted digit). Its threshold
is a percentile of the validation split's scores, stored in the card.

numpy and Pillow only: it ships in the Bento.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.common.contract import REFERENCE_FILE
from pipeline.common.files import write_atomic

TOP_K = 3  # classes per logged answer
EMBEDDING_DECIMALS = 5  # logged precision: enough for distances, ~8 characters a value
LOGGED_DECIMALS = 6  # logged precision of probabilities and input statistics (drift.as_logged rounds alike)
OOD_SCORE_DECIMALS = 4
OOD_PERCENTILE = 99.0  # of the validation split's scores: the flag's threshold (~1 % false flags)


@dataclass(frozen=True)
class UploadFacts:
    """What the upload was, read from its header (no decode): size in bytes, Pillow's format name, pixels."""

    bytes: int
    format: str = ""  # "" when Pillow cannot tell
    width: int = 0
    height: int = 0


def upload_facts(blob: bytes) -> UploadFacts:
    """:class:`UploadFacts` of an uploaded file; never raises (an unreadable file has format "")."""
    try:
        with Image.open(io.BytesIO(blob)) as img:  # lazy: reads the header only
            return UploadFacts(len(blob), img.format or "", *img.size)
    except Exception:  # noqa: BLE001 - facts are best effort; the decoder reports bad images
        return UploadFacts(len(blob))


def pixel_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each image's model input on a 0–1 scale.

    Args:
        pixels: uint8 (N, C, H, W), as ``classifier.onnx`` takes them.

    Returns:
        (mean (N,), std (N,)) as float64.
    """
    flat = pixels.reshape(len(pixels), -1)
    if flat.dtype != np.uint8:
        flat = flat.astype(np.float64) / 255
        return flat.mean(axis=1), flat.std(axis=1)
    # From integer sums (one pass each, no float copy of every pixel: 6x faster at 224 px, on every
    # answer). Both sums and count * sum of squares stay below 2**53 for model inputs up to ~8 MP,
    # so the variance's numerator is exact in float64.
    count = flat.shape[1]
    total = flat.sum(axis=1, dtype=np.uint64).astype(np.float64)
    squares = flat.astype(np.uint16)
    np.multiply(squares, squares, out=squares)  # 255**2 fits in 16 bits
    spread = count * squares.sum(axis=1, dtype=np.uint64).astype(np.float64) - total**2
    return total / (count * 255), np.sqrt(np.maximum(spread, 0)) / (count * 255)


def ood_features(embedding: np.ndarray, mean_intensity: np.ndarray, std_intensity: np.ndarray) -> np.ndarray:
    """What the OOD model sees of each image: the embedding (N, E) with mean and std intensity appended, (N, E+2)."""
    return np.column_stack([np.asarray(embedding, np.float64), mean_intensity, std_intensity])


def mahalanobis_scores(embedding: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``embedding`` (N, D) to the nearest of ``means``
    (K, D) under ``precision`` (D, D), the inverse shared covariance; returns (N,)."""
    diffs = np.asarray(embedding, np.float64)[:, None, :] - means[None]  # (N, K, E)
    return np.einsum("nke,ef,nkf->nk", diffs, precision, diffs).min(axis=1)


@dataclass(frozen=True)
class Reference:
    """``reference.npz``: the validation split as the model saw it, plus the OOD model.

    Per reference image (N rows): ``embedding`` (N, E), ``predicted`` class, ``confidence`` (top
    probability), ``mean_intensity`` and ``std_intensity`` (:func:`pixel_stats`), ``ood_score``.
    The OOD model, on :func:`ood_features` (D = E + 2): class means ``ood_means`` (K, D) and the
    shared precision ``ood_precision`` (D, D), fitted on the training split; ``ood_threshold``
    (:data:`OOD_PERCENTILE` of the validation scores).
    """

    embedding: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    mean_intensity: np.ndarray
    std_intensity: np.ndarray
    ood_score: np.ndarray
    ood_means: np.ndarray
    ood_precision: np.ndarray
    ood_threshold: float

    def ood_scores(self, embedding: np.ndarray, mean_intensity: np.ndarray, std_intensity: np.ndarray) -> np.ndarray:
        """OOD scores of N images from their embeddings (N, E) and :func:`pixel_stats`: higher is less
        like the training data."""
        return mahalanobis_scores(ood_features(embedding, mean_intensity, std_intensity), self.ood_means,
                                  self.ood_precision)

    def flag(self, score: float) -> tuple[float, bool]:
        """An answer's OOD score as logged and answered (rounded), and whether it is over the threshold."""
        return round(float(score), OOD_SCORE_DECIMALS), bool(score > self.ood_threshold)

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` that :func:`numpy.load` reads, byte-identical for identical arrays:
        ``numpy.savez`` stamps each member with the current time, which would change the sha256
        the card records on every export."""
        arrays = {key: np.asarray(value) for key, value in asdict(self).items()}

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for key, value in arrays.items():
                    member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    member.compress_type = zipfile.ZIP_DEFLATED
                    with archive.open(member, "w", force_zip64=True) as handle:
                        np.lib.format.write_array(handle, value, allow_pickle=False)
        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read ``reference.npz``; ValueError naming the file and the missing array if incomplete."""
        with np.load(path, allow_pickle=False) as data:
            missing = [f.name for f in fields(cls) if f.name not in data.files]
            if missing:
                raise ValueError(f"{path}: not a monitoring reference (no {', '.join(missing)})")
            values = {f.name: data[f.name] for f in fields(cls)}
        values["ood_threshold"] = float(values["ood_threshold"])
        return cls(**values)


def load_reference(folder: str | Path) -> Reference | None:
    """The deployable's ``reference.npz``, or None for a model exported before monitoring (no OOD score).

    Raises:
        ValueError: the file is there but incomplete.
    """
    path = Path(folder) / REFERENCE_FILE
    return Reference.load(path) if path.is_file() else None


@dataclass(frozen=True)
class AnswerStats:
    """What an answer needs of its input for monitoring, computed once per batch: :func:`pixel_stats`
    and the OOD score (None without a reference), each (N,)."""

    mean_intensity: np.ndarray
    std_intensity: np.ndarray
    ood_score: np.ndarray | None

    @classmethod
    def of(cls, pixels: np.ndarray, embedding: np.ndarray, reference: Reference | None) -> AnswerStats:
        means, stds = pixel_stats(pixels)
        scores = reference.ood_scores(embedding, means, stds) if reference is not None else None
        return cls(means, stds, scores)


def feature_records(
    probabilities: np.ndarray,
    embedding: np.ndarray,
    pixels: np.ndarray | None,
    classes: Sequence[str],
    reference: Reference | None,
    uploads: Sequence[UploadFacts | None] | None = None,
    top_k: int = TOP_K,
    stats: AnswerStats | None = None,
) -> list[dict]:
    """One feature record per answered image: what the prediction log stores and the monitor reads.

    Args:
        probabilities: ``classifier.onnx``'s probabilities (N, K).
        embedding: its embedding output (N, E).
        pixels: the uint8 model input (N, C, H, W) the answer came from; None when ``stats`` are given.
        classes: class names in label order (the card's).
        reference: the deployable's :class:`Reference`; None leaves out the OOD score and flag.
        uploads: :func:`upload_facts` per image (None where there was no upload, e.g. an example).
        top_k: classes to keep per record.
        stats: :class:`AnswerStats` already computed for these images (the service computes them
            with the answer; the prediction log builds the records later, without the pixels).

    Returns:
        Dicts of plain JSON types: ``top_k`` ([{"class", "probability"}]), ``predicted`` (index),
        ``confidence``, ``mean_intensity``, ``std_intensity``, ``upload``, ``embedding`` (list),
        and with a reference ``ood_score`` and ``ood`` (score above the card's threshold).
    """
    probabilities = np.asarray(probabilities, np.float64)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    stats = stats if stats is not None else AnswerStats.of(pixels, embedding, reference)
    means, stds, scores = stats.mean_intensity, stats.std_intensity, stats.ood_score
    rounded = np.round(np.asarray(embedding, np.float64), EMBEDDING_DECIMALS)
    records = []
    for row, top in enumerate(order):
        facts = uploads[row] if uploads is not None else None
        record = {
            "top_k": [{"class": classes[c], "probability": round(float(probabilities[row, c]), LOGGED_DECIMALS)}
                      for c in top],
            "predicted": int(top[0]),
            "confidence": round(float(probabilities[row, top[0]]), LOGGED_DECIMALS),
            "mean_intensity": round(float(means[row]), LOGGED_DECIMALS),
            "std_intensity": round(float(stds[row]), LOGGED_DECIMALS),
            "upload": dict(vars(facts)) if facts is not None else None,  # asdict: 4x slower
            "embedding": rounded[row].tolist(),
        }
        if scores is not None:
            record["ood_score"], record["ood"] = reference.flag(scores[row])
        records.append(record)
    return records
