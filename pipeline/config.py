"""Typed pipeline parameters: the only reader of ``params.yaml``.

Every stage calls :func:`load_params` once and gets a frozen dataclass. Unknown keys and
values of the wrong type fail here, naming the field, instead of deep inside a stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"


@dataclass(frozen=True)
class BaseParams:
    seed: int = 0


@dataclass(frozen=True)
class PreprocessParams:
    size: int = 224
    channels: Literal[1, 3, "auto"] = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    on_error: Literal["skip", "fail"] = "skip"
    max_pixels: int = 50_000_000
    workers: int = 0  # 0 = all cores


@dataclass(frozen=True)
class TrainParams:
    model: str = "lenet5"
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: bool = False
    device: str = "auto"
    compile: bool = False
    init_weights: str = ""
    threads: int = 0  # 0 = all cores


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    saliency_per_class: int = 2


@dataclass(frozen=True)
class ExportParams:
    opset: int = 18
    registered_model: str = "cnn-classifier"


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "cnn-mlops"


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.05, ...}``: the form MLflow and DVC show params in."""
        return {
            f"{section.name}.{key}": value
            for section in dataclasses.fields(self)
            for key, value in dataclasses.asdict(getattr(self, section.name)).items()
        }


class ParamsError(ValueError):
    """A params.yaml value is missing, unknown or of the wrong type."""


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed or isinstance(value, bool):
            raise ParamsError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {where}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {where}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}.{name}" if where else name)
        else:
            values[name] = _check_value(f"{where}.{name}" if where else name, value, hint)
    return cls(**values)


def _validate(params: Params) -> None:
    pre = params.preprocess
    if pre.size < 8:
        raise ParamsError(f"preprocess.size: {pre.size} is too small (at least 8)")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(pre, name) < 1.0:
            raise ParamsError(f"preprocess.{name}: must be in [0, 1), got {getattr(pre, name)}")
    if pre.val_fraction + pre.test_fraction >= 0.9:
        raise ParamsError("preprocess.val_fraction + test_fraction must leave at least 10% for training")
    train = params.train
    if train.epochs < 1 or train.batch_size < 1:
        raise ParamsError("train.epochs and train.batch_size must be at least 1")
    if train.lr <= 0:
        raise ParamsError(f"train.lr: must be positive, got {train.lr}")
    if not 0.0 <= train.label_smoothing < 1.0:
        raise ParamsError(f"train.label_smoothing: must be in [0, 1), got {train.label_smoothing}")
    if train.device not in ("auto", "cpu", "cuda") and not train.device.startswith("cuda:"):
        raise ParamsError(f"train.device: {train.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``.

    Args:
        path: the YAML file; defaults to the repository's ``params.yaml``.
    Returns:
        The frozen :class:`Params`; missing sections and keys take their defaults.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    try:
        params = _build(Params, raw, "")
        _validate(params)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    return params
