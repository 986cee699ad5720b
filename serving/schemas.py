"""The APIs' field types and answer shapes (pydantic), shared by the typed APIs, the form parser and the docs."""

from __future__ import annotations

from typing import Annotated, Literal

from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from pipeline.common.contract import ModelCard

TopK = Annotated[StrictInt, Field(ge=1, le=1000)]
Method = Literal["gradient", "guided", "gradcam", "guided_gradcam"]
Format = Literal["png", "json"]
Target = StrictInt | str | None  # a class index or name; None: the predicted class


def target_index(target: Target, classes: list[str]) -> int:
    """The class index to explain (−1 = the predicted one); 400 naming the valid choices."""
    if target is None:
        return -1
    if isinstance(target, int) and not isinstance(target, bool):
        if 0 <= target < len(classes):
            return target
        raise InvalidArgument(f"target: {target} is out of range: 0..{len(classes) - 1}")
    if target in classes:
        return classes.index(target)
    raise InvalidArgument(f"target: {target!r} is not a class index or name; classes: {classes}")


def _class_name(value: object) -> object:
    """A class name sent bare as a number (``label=7``, read as JSON by the form parser) is the name "7"."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


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


class FeedbackFields(BaseModel):
    """The text field of ``POST /feedback`` (the image comes apart)."""

    model_config = ConfigDict(extra="forbid")
    label: Annotated[str, BeforeValidator(_class_name), Field(min_length=1)]


class NoFields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prediction(BaseModel):
    index: int
    label: str
    probability: float


OOD_SCORE = "how unlike the training data the image is (squared Mahalanobis distance of its embedding); " \
            "null for a model exported without reference.npz"
OOD_FLAG = "the OOD score is above the model card's ood_threshold: the prediction may be meaningless"


class Predictions(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]
    ood_score: float | None = Field(description=OOD_SCORE)
    ood: bool | None = Field(description=OOD_FLAG)


class BatchPredictions(BaseModel):
    model: str
    version: str
    predictions: list[list[Prediction]]
    ood_score: list[float | None] = Field(description=f"per image: {OOD_SCORE}")
    ood: list[bool | None] = Field(description=f"per image: {OOD_FLAG}")


class FeedbackStored(BaseModel):
    stored: str  # sha256 of the image: its name in the review folder
    label: str


class SaliencyMap(BaseModel):
    method: str
    target: Prediction  # the class the map explains
    prediction: Prediction  # the top-1 class
    scale: float  # the map was divided by this (its largest |value|) to lie in [0, 1]
    map: list[list[float]]  # H×W, the model's input size
    ood_score: float | None = Field(description=OOD_SCORE)
    ood: bool | None = Field(description=OOD_FLAG)


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
