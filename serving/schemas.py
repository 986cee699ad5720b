"""The APIs' field types and answer shapes (pydantic), shared by the typed APIs, the form parser and the docs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pipeline.common.contract import ModelCard

TopK = Annotated[StrictInt, Field(ge=1, le=1000)]
Method = Literal["gradient", "guided", "gradcam", "guided_gradcam"]
Format = Literal["png", "json"]
Target = StrictInt | str | None  # a class index or name; None: the predicted class


class PredictFields(BaseModel):
    """The text fields of ``POST /predict`` and ``POST /predict_batch`` (the files come apart)."""

    model_config = ConfigDict(extra="forbid")
    k: TopK = 5


class SaliencyFields(BaseModel):
    """The text fields of ``POST /saliency``."""

    model_config = ConfigDict(extra="forbid")
    target: Target = None
    method: Method = "guided"
    format: Format = "png"


class NoFields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prediction(BaseModel):
    index: int
    label: str
    probability: float


class Predictions(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class BatchPredictions(BaseModel):
    model: str
    version: str
    predictions: list[list[Prediction]]


class SaliencyMap(BaseModel):
    method: str
    target: Prediction  # the class the map explains
    prediction: Prediction  # the top-1 class
    scale: float  # the map was divided by this (its largest |value|) to lie in [0, 1]
    map: list[list[float]]  # H×W, the model's input size


class Metadata(BaseModel):
    model: str
    version: str
    architecture: str
    classes: list[str]
    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    mlflow_run_id: str
    git_commit: str
    data_md5: str
    metrics: dict[str, float]
    files: dict[str, str]  # sha256 of classifier.onnx and saliency.onnx, as the model card records them
    source: str
    provider: str
    settings: dict[str, int | bool]

    @classmethod
    def of(cls, card: ModelCard, source: str, provider: str, settings: dict[str, int | bool]) -> Metadata:
        """What ``GET /metadata`` says about the model ``card`` describes, served from ``source``."""
        return cls(model=card.registered_model or card.architecture, version=card.version,
                   architecture=card.architecture, classes=card.classes, image_size=card.image_size,
                   channels=card.channels, mean=card.mean, std=card.std, mlflow_run_id=card.mlflow_run_id,
                   git_commit=card.git_commit, data_md5=card.data_md5, metrics=card.metrics, files=card.files,
                   source=source, provider=provider, settings=settings)
