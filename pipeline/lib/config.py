"""Typed pipeline parameters: the only reader of ``params.yaml``.

Every stage calls :func:`load_params` once and gets frozen pydantic models. Unknown keys and
values of the wrong type fail here with one line naming the field, instead of deep inside a
stage. Strict types: ``true`` is not a number and ``"3"`` is not an integer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.common.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = ROOT / "params.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BaseParams(_Section):
    seed: int = 0


class PreprocessParams(_Section):
    image_size: int = Field(224, ge=8)  # the model input side in pixels
    channels: Literal[1, 3, "auto"] = "auto"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    on_error: Literal["skip", "fail"] = "skip"
    max_pixels: int = Field(50_000_000, ge=1)
    workers: int = Field(0, ge=0)  # 0 = all usable cores
    classes: list[str] = []  # label order; [] = data/classes.txt if present, else sorted folder names

    @field_validator("classes", mode="before")
    @classmethod
    def _none_is_no_order(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _leaves_training_data(self) -> PreprocessParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


class TrainParams(_Section):
    model: str = "lenet5"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: bool = False
    device: str = "auto"
    compile: bool = False
    init_weights: str = ""
    # CPU threads: 0 = every CPU this process may use, "adaptive" = re-measured each epoch
    threads: int | Literal["adaptive"] = 0

    @field_validator("init_weights", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("threads", mode="before")
    @classmethod
    def _thread_count(cls, value: Any) -> Any:
        # one message naming both forms, instead of one pydantic error per union member
        if value == "adaptive" or (type(value) is int and value >= 0):
            return value
        raise ValueError("expected a whole number >= 0 (0 = every usable CPU) or 'adaptive'")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"{value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
        return value


class EvaluateParams(_Section):
    batch_size: int = Field(256, ge=1)
    saliency_per_class: int = Field(2, ge=0)


class ExportParams(_Section):
    opset: int = Field(18, ge=17)
    registered_model: str = Field("cnn-classifier", min_length=1)


class MlflowParams(_Section):
    experiment: str = Field("cnn-mlops", min_length=1)


class Params(_Section):
    base: BaseParams = BaseParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    mlflow: MlflowParams = MlflowParams()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.05, ...}``: the form MLflow and DVC show params in."""
        return {f"{section}.{key}": value for section, values in self.model_dump().items()
                for key, value in values.items()}


class ParamsError(UserError, ValueError):
    """A params.yaml value is missing, unknown or of the wrong type."""


def describe(err: ValidationError) -> str:
    """pydantic's first error as one line: ``train.lr: Input should be greater than 0``."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    value = "" if first["type"] == "missing" else f" (got {first['input']!r})"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}{value}"


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``.

    Args:
        path: the YAML file; defaults to the repository's ``params.yaml``.
    Returns:
        The frozen :class:`Params`; missing sections and keys take their defaults.
    Raises:
        ParamsError: naming the file and the field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{path}: {describe(err)}") from None
