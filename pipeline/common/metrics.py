"""The numbers the stages hand on, typed: per-epoch statistics and the metrics and plots files.

``metrics/train.json``, ``metrics/eval.json``, ``plots/train.json`` and ``plots/eval/*.json`` are
tracked in git and read by DVC (``dvc metrics show``, ``dvc plots show``); their JSON shape is
defined here, and whoever writes or reads one (export reads ``metrics/eval.json``) goes through
these classes. Committed values keep :data:`METRIC_DECIMALS` decimals; MLflow keeps full precision.

stdlib and pydantic only, like :mod:`pipeline.common.contract`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field

from pipeline.common.contract import read_json
from pipeline.common.files import write_json

# Values written to committed files (metrics/, plots/) keep 4 decimals: float sums differ in the
# last bits between CPUs of the same kind (vector width, thread count), and at 6 decimals a
# fresh clone's run rewrote tracked metrics (val_loss 0.086513 -> 0.086514).
METRIC_DECIMALS = 4


def round_metric(value: float) -> float:
    return round(float(value), METRIC_DECIMALS)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def plain(self) -> dict:
        """JSON-ready, file names of fields (aliases), in field order."""
        return self.model_dump(mode="json", by_alias=True)


class _MetricsFile(_Record):
    """A ``metrics/*.json`` file: one JSON object."""

    _missing_hint: ClassVar[str] = ""  # what to run when the file is missing

    @classmethod
    def read(cls, path: str | Path) -> Self:
        return read_json(cls, Path(path), cls._missing_hint)

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.plain())


def write_rows(path: str | Path, rows: Sequence[_Record]) -> Path:
    """A plots file: a JSON list of rows, written atomically."""
    return write_json(path, [row.plain() for row in rows])


# ----------------------------------------------------------------------------- training
class EpochStats(_Record):
    """One training pass (``engine.train_one_epoch``)."""

    train_loss: float
    train_accuracy: float
    images_per_s: float
    data_wait: float  # share of the epoch spent waiting for the next batch
    epoch_seconds: float


class SplitScores(_Record):
    """A model scored on one split (``engine.evaluate``); top5 is top-k with k = min(5, classes)."""

    loss: float
    top1: float
    top5: float


class CurvePoint(_Record):
    """A row of ``plots/train.json``: the curves DVC draws (timings vary run to run: MLflow only)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float


class EpochRecord(EpochStats):
    """One epoch of a training run: its MLflow metrics and a row of the checkpoint's history."""

    epoch: int
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    cpu_threads: int | None = None  # the CPU threads the epoch ran with (what adaptive chose)

    @classmethod
    def of(cls, epoch: int, stats: EpochStats, val: SplitScores, lr: float, cpu_threads: int | None) -> EpochRecord:
        return cls(epoch=epoch, **stats.model_dump(), val_loss=val.loss, val_top1=val.top1, val_top5=val.top5,
                   lr=lr, cpu_threads=cpu_threads)

    def mlflow_metrics(self) -> dict[str, float]:
        """MLflow metrics at step ``epoch``: every number but the epoch (``cpu_threads`` on the CPU only)."""
        return {key: float(value) for key, value in self.model_dump(exclude={"epoch"}).items() if value is not None}

    def curve_point(self) -> CurvePoint:
        """The committed row: 4 decimals, and the learning rate (it spans decades) at 4 significant digits."""
        curves = [key for key in CurvePoint.model_fields if key not in ("epoch", "lr")]
        return CurvePoint(epoch=self.epoch, **{key: round_metric(getattr(self, key)) for key in curves},
                          lr=float(f"{self.lr:.4g}"))


class BestEpoch(_Record):
    """The epoch with the highest val top-1 (its weights are the trained model)."""

    epoch: int
    val_top1: float
    val_top5: float
    val_loss: float

    @classmethod
    def of(cls, record: EpochRecord) -> BestEpoch:
        return cls(epoch=record.epoch, val_top1=record.val_top1, val_top5=record.val_top5, val_loss=record.val_loss)

    def rounded(self) -> BestEpoch:
        return self.model_copy(update={key: round_metric(getattr(self, key)) for key in ("val_top1", "val_top5",
                                                                                         "val_loss")})


class FinalScores(_Record):
    """The last epoch's numbers in ``metrics/train.json``."""

    train_loss: float
    train_accuracy: float
    val_loss: float
    val_top1: float
    val_top5: float


class TrainMetrics(_MetricsFile):
    """``metrics/train.json``: only deterministic numbers, rounded, so the same params and data
    reproduce it byte for byte on another CPU too."""

    _missing_hint: ClassVar[str] = "run the train stage first (dvc repro train)"
    final: FinalScores
    best: BestEpoch
    epochs: int

    @classmethod
    def of(cls, history: Sequence[EpochRecord], best: BestEpoch) -> TrainMetrics:
        last = history[-1]
        final = FinalScores(**{key: round_metric(getattr(last, key)) for key in FinalScores.model_fields})
        return cls(final=final, best=best.rounded(), epochs=len(history))


# ----------------------------------------------------------------------------- test split
class EvalMetrics(_MetricsFile):
    """``metrics/eval.json``: the test split's summary; export copies top1/top5 into the model card."""

    _missing_hint: ClassVar[str] = "run the evaluate stage first (dvc repro evaluate)"
    top1: float
    top5: float
    top5_k: int = Field(ge=1)  # k of "top5": min(5, classes)
    loss: float
    samples: int = Field(ge=0)

    def card_metrics(self) -> dict[str, float]:
        """What the model card and the registered version carry (``compare`` ranks by top1)."""
        return {"top1": self.top1, "top5": self.top5}


class ClassScores(_Record):
    """A row of ``plots/eval/per_class.json``."""

    class_name: str = Field(alias="class")
    precision: float
    recall: float
    support: int


class Prediction(_Record):
    """A row of ``plots/eval/confusion.json``: one test image."""

    actual: str
    predicted: str


class EvalReport(EvalMetrics):
    """Everything evaluate computes on the test split, at full precision (the MLflow run's
    ``eval/metrics.json``)."""

    per_class: list[ClassScores]
    confusion: list[list[int]]  # rows actual, columns predicted, class order

    def summary(self) -> EvalMetrics:
        """The committed summary: per-class rows go to plots/ (``dvc exp show`` gets a column per
        metric, which with 3 per class would bury top-1/top-5)."""
        return EvalMetrics(top1=round_metric(self.top1), top5=round_metric(self.top5), top5_k=self.top5_k,
                           loss=round_metric(self.loss), samples=self.samples)
