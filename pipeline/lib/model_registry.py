"""The MLflow model registry holds deployables: one model version = both ONNX files + the card.

The version is logged with MLflow's ONNX flavor (``classifier.onnx`` is the flavor's model, so
``mlflow.pyfunc.load_model`` and MLflow's serving tools work on it), and ``saliency.onnx`` and
``model_card.json`` (and ``reference.npz``, the monitoring reference) ride in the same version as the
flavor's ``extra_files``. Nothing can pair a
classifier with a saliency graph from another run: :func:`download` rebuilds the export folder
from one version and checks both files against the sha256 the card records.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.common.contract import (
    CARD_FILE,
    CLASSIFIER_FILE,
    CLASSIFIER_OUTPUTS,
    EXAMPLES_FILE,
    REFERENCE_FILE,
    SALIENCY_FILE,
    ContractError,
    ModelCard,
)
from pipeline.common.errors import UserError
from pipeline.common.files import replace_dir
from pipeline.lib import tracking
from pipeline.lib.onnx_checks import cpu_session

log = logging.getLogger(__name__)
ARTIFACT_NAME = "deployable"  # the logged model's name inside the run


def register(folder: Path, card: ModelCard, example: np.ndarray, experiment: str) -> str:
    """Log the export folder as one model version of ``card.registered_model``, alias ``candidate``.

    Returns:
        The new version number.
    """
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    session = cpu_session(folder / CLASSIFIER_FILE)
    outputs = dict(zip(CLASSIFIER_OUTPUTS, session.run(list(CLASSIFIER_OUTPUTS), {"image": example}), strict=True))
    signature = infer_signature({"image": example}, outputs)
    with tracking.run(experiment, run_id=card.mlflow_run_id):
        info = tracking.with_retry(lambda: mlflow.onnx.log_model(
            onnx.load(str(folder / CLASSIFIER_FILE)), name=ARTIFACT_NAME, signature=signature,
            input_example={"image": example}, registered_model_name=card.registered_model,
            save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
            extra_files=[str(folder / name) for name in (SALIENCY_FILE, CARD_FILE, EXAMPLES_FILE, REFERENCE_FILE)
                         if (folder / name).exists()]))
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    tracking.with_retry(lambda: client.set_registered_model_alias(card.registered_model, "candidate", version))
    for key, value in card.version_tags().items():
        tracking.with_retry(lambda key=key, value=value: client.set_model_version_tag(
            card.registered_model, version, key, value))
    return version


def download(model_name: str, version: str, out: Path) -> ModelCard:
    """Write model version ``version`` as an export folder (``classifier.onnx``, ``saliency.onnx``,
    ``model_card.json`` with ``version`` filled in) at ``out``, replacing it atomically."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}", dst_path=tmp))
        flavor = Model.load(model_dir / "MLmodel").flavors["onnx"]
        extra = {Path(entry["path"]).name: model_dir / entry["path"] for entry in flavor.get("extra_files", [])}
        if CARD_FILE not in extra or SALIENCY_FILE not in extra:
            raise UserError(f"model {model_name!r} version {version} holds no {SALIENCY_FILE} and {CARD_FILE}: "
                            "it was registered by an older export stage; run the export stage again")
        card = ModelCard.read(extra[CARD_FILE].parent)
        card = card.model_copy(update={"version": str(version)})
        with replace_dir(out) as staging:
            shutil.copyfile(model_dir / flavor["data"], staging / CLASSIFIER_FILE)
            shutil.copyfile(extra[SALIENCY_FILE], staging / SALIENCY_FILE)
            for optional in (EXAMPLES_FILE, REFERENCE_FILE):  # the UI's test images; the monitoring reference
                if optional in extra:
                    shutil.copyfile(extra[optional], staging / optional)
            try:
                card.verify_files(staging)
            except ContractError as err:
                raise UserError(f"model {model_name!r} version {version}: {err}") from None
            (staging / CARD_FILE).write_text(card.to_json())
    return card
