"""Drift tests: a window of logged predictions against the deployable's reference (``reference.npz``).

One two-sample test per signal, all from SciPy:

- ``predicted_class``: chi-square test of homogeneity on the 2×K table of predicted-class counts;
- ``confidence``, ``mean_intensity``, ``std_intensity``, ``ood_score``: Kolmogorov–Smirnov (the
  first three with the reference rounded as the log rounds: :func:`as_logged`);
- ``embedding``: maximum mean discrepancy (Gaussian kernel, median-distance bandwidth) with a
  permutation p-value (``scipy.stats.permutation_test`` over the rows of one kernel matrix):
  multivariate, so it sees a shift that no single coordinate shows.

With several signals, each is tested at ``alpha / signals`` (Bonferroni): the chance that any
of them fires on a window from the reference distribution stays at most ``alpha``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from pipeline.common.features import LOGGED_DECIMALS, Reference

ALPHA = 0.05  # the whole check's false-alarm rate
PERMUTATIONS = 500  # MMD's p-value resolution is 1/501, below ALPHA / 6
MIN_WINDOW = 30
MMD_MAX_ROWS = 1000  # per side: the kernel matrix and each permutation grow with the square


@dataclass(frozen=True)
class Window:
    """The logged side, as arrays: one row per logged prediction."""

    predicted: np.ndarray
    confidence: np.ndarray
    mean_intensity: np.ndarray
    std_intensity: np.ndarray
    embedding: np.ndarray  # (N, E)
    ood_score: np.ndarray

    def __len__(self) -> int:
        return len(self.predicted)

    @classmethod
    def from_records(cls, records: list[dict]) -> Window:
        """From prediction-log records (:func:`pipeline.common.features.feature_records` fields)."""
        return cls(predicted=np.array([r["predicted"] for r in records], np.int64),
                   confidence=np.array([r["confidence"] for r in records], np.float64),
                   mean_intensity=np.array([r["mean_intensity"] for r in records], np.float64),
                   std_intensity=np.array([r["std_intensity"] for r in records], np.float64),
                   embedding=np.array([r["embedding"] for r in records], np.float64),
                   ood_score=np.array([r.get("ood_score", np.nan) for r in records], np.float64))


@dataclass(frozen=True)
class Signal:
    """One test's outcome; ``drift`` when ``p_value`` < ``threshold`` (the corrected level)."""

    name: str
    test: str
    statistic: float
    p_value: float
    threshold: float
    drift: bool
    reference_summary: str
    window_summary: str

    def as_dict(self) -> dict:
        return asdict(self)


def class_test(reference: np.ndarray, window: np.ndarray, classes: int) -> tuple[float, float]:
    """Chi-square homogeneity test of two predicted-class samples; classes neither predicts are left out."""
    table = np.stack([np.bincount(reference, minlength=classes), np.bincount(window, minlength=classes)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:  # one class in both: nothing differs
        return 0.0, 1.0
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def ks_test(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    result = stats.ks_2samp(reference, window)
    return float(result.statistic), float(result.pvalue)


def mmd_test(reference: np.ndarray, window: np.ndarray, permutations: int = PERMUTATIONS,
             seed: int = 0) -> tuple[float, float]:
    """MMD² (biased estimate) between two samples of rows, and its permutation p-value.

    The Gaussian kernel's bandwidth is the median pairwise distance of the pooled sample (the
    usual heuristic). The kernel matrix is computed once; each permutation only re-indexes it.
    """
    pooled = np.concatenate([reference, window]).astype(np.float64)
    squared = np.sum(pooled**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None] - 2 * pooled @ pooled.T, 0)
    upper = distances[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = np.exp(-distances / bandwidth)  # exp(-d² / median(d²))

    def mmd2(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        # x, y: row indices (..., n) and (..., m), a batch of permutations at once. With weights
        # v = 1/n on x's rows and -1/m on y's, MMD² = vᵀKv.
        x, y = np.atleast_2d(x), np.atleast_2d(y)
        weights = np.zeros((len(x), len(pooled)))
        np.put_along_axis(weights, x, 1 / x.shape[-1], axis=-1)
        np.put_along_axis(weights, y, -1 / y.shape[-1], axis=-1)
        return np.einsum("bi,bi->b", weights @ kernel, weights)

    rows = np.arange(len(pooled))
    result = stats.permutation_test((rows[:len(reference)], rows[len(reference):]), mmd2, vectorized=True,
                                    n_resamples=permutations, alternative="greater", rng=np.random.default_rng(seed))
    return float(np.squeeze(result.statistic)), float(np.squeeze(result.pvalue))


def as_logged(values: np.ndarray) -> np.ndarray:
    """``values`` at the precision the prediction log keeps (:data:`LOGGED_DECIMALS`).

    The reference holds unrounded float32 confidences, the log rounded ones: a model whose
    confidences saturate has many at 0.9999997 in the reference and at exactly 1.0 in the log, a
    KS "shift" that is only rounding. Both sides at the same precision compare like with like.
    """
    return np.round(np.asarray(values, np.float64), LOGGED_DECIMALS)


def _summary(values: np.ndarray) -> str:
    return f"median {np.median(values):.3g} (p5 {np.percentile(values, 5):.3g}, p95 {np.percentile(values, 95):.3g})"


def _class_summary(predicted: np.ndarray, classes: list[str]) -> str:
    counts = np.bincount(predicted, minlength=len(classes)) / max(len(predicted), 1)
    top = np.argsort(-counts, kind="stable")[:3]
    return ", ".join(f"{classes[c]} {counts[c]:.0%}" for c in top)


def compare(reference: Reference, window: Window, classes: list[str], alpha: float = ALPHA,
            permutations: int = PERMUTATIONS, seed: int = 0) -> list[Signal]:
    """Every signal of ``window`` against ``reference``, each at the Bonferroni level ``alpha / signals``."""
    if len(window) < MIN_WINDOW:
        raise ValueError(f"{len(window)} logged predictions: need at least {MIN_WINDOW} for the drift tests")
    if window.embedding.shape[1] != reference.embedding.shape[1]:
        raise ValueError(f"the log's embeddings have {window.embedding.shape[1]} dims, the reference's "
                         f"{reference.embedding.shape[1]}: the records come from another model")
    tests: list[tuple[str, str, tuple[float, float], str, str]] = [
        ("predicted_class", "chi-square", class_test(reference.predicted, window.predicted, len(classes)),
         _class_summary(reference.predicted, classes), _class_summary(window.predicted, classes)),
    ]
    for name in ("confidence", "mean_intensity", "std_intensity"):
        ref, cur = as_logged(getattr(reference, name)), as_logged(getattr(window, name))
        tests.append((name, "Kolmogorov-Smirnov", ks_test(ref, cur), _summary(ref), _summary(cur)))
    # recomputed, not read from the log: the records may predate this reference
    scores = reference.ood_scores(window.embedding, window.mean_intensity, window.std_intensity)
    tests.append(("ood_score", "Kolmogorov-Smirnov", ks_test(reference.ood_score, scores),
                  _summary(reference.ood_score), f"{_summary(scores)}; "
                  f"{np.mean(scores > reference.ood_threshold):.0%} flagged"))
    rng = np.random.default_rng(seed)
    ref_rows = rng.permutation(len(reference.embedding))[:MMD_MAX_ROWS]
    cur_rows = rng.permutation(len(window))[:MMD_MAX_ROWS]
    tests.append(("embedding", "MMD (permutation)",
                  mmd_test(reference.embedding[ref_rows], window.embedding[cur_rows], permutations, seed),
                  f"{len(reference.embedding)} images, {reference.embedding.shape[1]} dims",
                  f"{len(window)} predictions"))
    level = alpha / len(tests)
    return [Signal(name, test, statistic, p_value, level, p_value < level, ref_text, cur_text)
            for name, test, (statistic, p_value), ref_text, cur_text in tests]
