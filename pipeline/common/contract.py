"""What crosses a boundary: the dataset manifest, the model card and a run's provenance, one typed
definition each (the metrics and plots files: :mod:`pipeline.common.metrics`).

Every producer and consumer goes through these classes: the preprocess stage writes a
:class:`Manifest`, train/evaluate/export read it; the train stage saves a :class:`ModelCard`
beside the weights, export completes it and writes it into both ONNX files (metadata props),
into ``model_card.json`` and into the MLflow model version; ``serving`` reads it back from the
deployable folder and labels BentoML store entries from it. The train stage tags its MLflow run
with a :class:`Provenance` and copies its commit and data version into the card. One name per
value: the input side is ``image_size`` everywhere, from params.yaml to the ONNX metadata.

stdlib and pydantic only (and :mod:`pipeline.common.errors`): it ships in the Bento.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.common.errors import UserError

M = TypeVar("M", bound=BaseModel)
SPLITS = ("train", "val", "test")
Split = Literal["train", "val", "test"]

# The deployable: one folder (and one MLflow model version) holding these three files.
CLASSIFIER_FILE = "classifier.onnx"
SALIENCY_FILE = "saliency.onnx"
CARD_FILE = "model_card.json"
# classifier.onnx's outputs, in order: logits (N, K), probabilities (N, K), embedding (N, E) for monitoring.
CLASSIFIER_OUTPUTS = ("logits", "probabilities", "embedding")
# Beside them: the monitoring reference (features of the validation split, the OOD model and threshold),
# written by the export stage and listed with its sha256 in the card (pipeline.common.features reads it).
REFERENCE_FILE = "reference.npz"
# Optional beside them: a few test-split images (uint8 ``images`` N×C×H×W, int ``labels``) for the UI.
EXAMPLES_FILE = "examples.npz"
MANIFEST_FILE = "manifest.json"


class ContractError(UserError):
    """A manifest or model card is missing, unreadable or does not match its definition."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileRow(_Frozen):
    """One source image that made it into the arrays."""

    path: str  # relative to the dataset folder, POSIX separators
    sha256: str
    class_name: str
    split: Split
    index: int  # row in ``<split>_images.npy``


class SkippedFile(_Frozen):
    path: str
    reason: str


SplitSource = Literal["folder", "hash"]  # data/<split>/ as given, or drawn by the stable hash split
ClassesSource = Literal["folders", "file", "param"]  # sorted folder names, data/classes.txt, preprocess.classes


class Manifest(_Frozen):
    """``manifest.json`` of the preprocess stage: what the arrays hold and where they came from."""

    classes: list[str]  # index order: class i is label i in the arrays
    classes_source: ClassesSource = "folders"
    channels: Literal[1, 3]
    image_size: int
    mean: list[float]  # per channel, 0–1 scale, train split
    std: list[float]
    counts: dict[Split, int]
    class_counts: dict[Split, list[int]]
    seed: int
    split_source: dict[Split, SplitSource] = Field(default_factory=lambda: dict.fromkeys(SPLITS, "hash"))
    files: list[FileRow] = Field(default_factory=list)
    skipped: list[SkippedFile] = Field(default_factory=list)

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        return read_json(cls, Path(folder) / MANIFEST_FILE, "run the preprocess stage first (dvc repro preprocess)")

    def to_json(self) -> str:
        return self.model_dump_json(indent=1) + "\n"


# The card minus ``files`` and ``version`` goes into the ONNX files: a file cannot carry its own
# hash, and the version is assigned after the files are written.
_NOT_IN_ONNX = frozenset({"files", "version", "ood_threshold"})


class Provenance(_Frozen):
    """Where a training run's inputs came from (read by :mod:`pipeline.lib.provenance`)."""

    git_commit: str = ""
    git_dirty: bool = False  # tracked files differ from the commit (DVC's own writes aside)
    data_md5: str = ""  # the md5 data.dvc records
    dvc_exp_name: str = ""  # set under `dvc exp run`
    dvc_exp_baseline_rev: str = ""

    def tags(self) -> dict[str, str]:
        """MLflow run tags (strings); the experiment's only under ``dvc exp run``."""
        tags = {"git_commit": self.git_commit, "git_dirty": str(self.git_dirty).lower(), "data_md5": self.data_md5}
        if self.dvc_exp_name:
            tags |= {"dvc_exp_name": self.dvc_exp_name, "dvc_exp_baseline_rev": self.dvc_exp_baseline_rev}
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Provenance:
        """Back from a run's tags (other tags ignored)."""
        raw = {key: value for key, value in tags.items() if key in cls.model_fields}
        return validate(cls, raw | {"git_dirty": raw.get("git_dirty") == "true"}, "MLflow run tags")


class ModelCard(_Frozen):
    """What travels with a model, from the train stage to the service.

    The train stage knows the architecture and the data; export adds the test metrics and the
    file hashes; the registry adds ``version``. Every field has one name wherever it is written.
    """

    architecture: str  # a key of models.MODELS
    classes: list[str]  # index order
    image_size: int
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    git_commit: str = ""
    data_md5: str = ""  # the md5 data.dvc records
    mlflow_run_id: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)  # test top1/top5
    registered_model: str = ""
    version: str = ""  # MLflow model version; empty until registered
    files: dict[str, str] = Field(default_factory=dict)  # file name → sha256 of the deployable's ONNX files
    # An answer's out-of-distribution score above this is flagged (the validation split's 99th percentile,
    # set by export from reference.npz, after the ONNX files are written); None: no reference.
    ood_threshold: float | None = None

    # ---------------------------------------------------------------- ONNX metadata props
    def onnx_props(self) -> dict[str, str]:
        """Metadata props for both ONNX files: strings as they are, everything else as JSON."""
        return {key: value if isinstance(value, str) else json.dumps(value)
                for key, value in self.model_dump().items() if key not in _NOT_IN_ONNX}

    @classmethod
    def from_onnx_props(cls, props: dict[str, str]) -> ModelCard:
        fields = cls.model_fields
        raw = {key: value if fields[key].annotation in (str, "str") else json.loads(value)
               for key, value in props.items() if key in fields and key not in _NOT_IN_ONNX}
        return validate(cls, raw, "ONNX metadata")

    # ---------------------------------------------------------------- MLflow and BentoML
    def version_tags(self) -> dict[str, str]:
        """Tags of the MLflow model version: the run and the test metrics (``compare`` ranks by them)."""
        return {"mlflow_run_id": self.mlflow_run_id, "architecture": self.architecture,
                **{f"test_{key}": str(value) for key, value in self.metrics.items()}}

    def store_labels(self, alias: str = "") -> dict[str, str]:
        """BentoML store labels: short strings that ``bentoml models list`` can filter on."""
        return {"architecture": self.architecture, "registered_model": self.registered_model,
                "mlflow_version": self.version, "mlflow_run_id": self.mlflow_run_id, "alias": alias,
                **{key: f"{value:.4f}" for key, value in self.metrics.items()}}

    # ---------------------------------------------------------------- the deployable folder
    @classmethod
    def read(cls, folder: str | Path) -> ModelCard:
        return read_json(cls, Path(folder) / CARD_FILE, "run the export stage first (dvc repro export)")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def verify_files(self, folder: str | Path) -> None:
        """Both ONNX files present and the ones the card was written for (never a mixed pair)."""
        folder = Path(folder)
        for name in (CLASSIFIER_FILE, SALIENCY_FILE):
            path = folder / name
            if not path.is_file():
                raise ContractError(f"{path}: missing (a deployable holds {CLASSIFIER_FILE}, {SALIENCY_FILE} "
                                    f"and {CARD_FILE})")
            expected = self.files.get(name)
            if not expected:
                raise ContractError(f"{folder / CARD_FILE}: no sha256 for {name}")
            if sha256_file(path) != expected:
                raise ContractError(f"{path}: content does not match the sha256 in {CARD_FILE} "
                                    "(the files come from different exports)")
        if REFERENCE_FILE in self.files:  # cards from before monitoring have none
            path = folder / REFERENCE_FILE
            if not path.is_file() or sha256_file(path) != self.files[REFERENCE_FILE]:
                raise ContractError(f"{path}: missing or not the file {CARD_FILE} lists (sha256 differs)")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def validate(cls: type[M], raw: object, where: str) -> M:
    """``raw`` as a ``cls``, or a :class:`ContractError` naming ``where`` and the first bad field."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise ContractError(f"{where}: {field}: {first['msg']}") from None


def read_json(cls: type[M], path: Path, hint: str) -> M:
    """The JSON file ``path`` as a ``cls``; a :class:`ContractError` naming the file (and ``hint``,
    what to run, when it is missing) otherwise."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ContractError(f"{path}: not found; {hint}") from None
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ContractError(f"{path}: not valid JSON ({err})") from None
    return validate(cls, raw, str(path))
