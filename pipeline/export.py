"""Export stage: ``classifier.onnx``, ``saliency.onnx``, ``reference.npz`` and ``model_card.json``, checked
and registered.

    python -m pipeline.export --model artifacts/train/model.pt --out artifacts/export

Both graphs take uint8 N×C×H×W and normalise inside, and both carry the model card as ONNX
metadata. Before anything is registered, ONNX Runtime must reproduce PyTorch's predictions on
the test split and ``saliency.onnx`` must give finite maps for degenerate inputs (black, white,
noise, every target). The registered model version is the whole folder (see
:mod:`pipeline.lib.model_registry`). ``reference.npz`` is the monitoring reference
(:mod:`pipeline.lib.reference`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.graphs import ClassifierGraph, fold_adaptive_pool
from models.saliency import SaliencyGraph
from pipeline.common.contract import (
    CARD_FILE,
    CLASSIFIER_FILE,
    CLASSIFIER_OUTPUTS,
    EXAMPLES_FILE,
    SALIENCY_FILE,
    ContractError,
    ModelCard,
    sha256_file,
)
from pipeline.common.cpus import torch_threads
from pipeline.common.errors import run_command, setup_logging
from pipeline.common.files import replace_dir
from pipeline.common.metrics import EvalMetrics
from pipeline.lib import model_registry as registry
from pipeline.lib import tracking
from pipeline.lib.config import load_params
from pipeline.lib.engine import predict_logits
from pipeline.lib.loader import load_split
from pipeline.lib.onnx_checks import ExportCheckFailed, check_parity, check_saliency_finite
from pipeline.lib.onnx_export import export_onnx
from pipeline.lib.reference import add_reference
from pipeline.lib.trained import load_trained

log = logging.getLogger(__name__)


def export_files(model: torch.nn.Module, card: ModelCard, folder: Path, opset: int = 18) -> ModelCard:
    """Write both graphs with the card as metadata, and the card (with the files' sha256) beside them.

    Returns the card as written to ``folder/model_card.json``.
    """
    image_size = card.image_size
    example = torch.randint(0, 256, (2, card.channels, image_size, image_size), dtype=torch.uint8)
    graph_model = fold_adaptive_pool(model, image_size)  # the input size is fixed from here on
    props = card.onnx_props()
    log.info("exporting %s", CLASSIFIER_FILE)
    export_onnx(ClassifierGraph(graph_model, card.mean, card.std), folder / CLASSIFIER_FILE, (example,),
                ["image"], list(CLASSIFIER_OUTPUTS), props, opset)
    log.info("exporting %s", SALIENCY_FILE)
    export_onnx(SaliencyGraph(graph_model, card.mean, card.std, image_size), folder / SALIENCY_FILE,
                (example, torch.tensor([-1, 0])), ["image", "target"],
                ["logits", "gradient", "guided", "gradcam"], props, opset)
    card = card.model_copy(update={"files": {name: sha256_file(folder / name)
                                             for name in (CLASSIFIER_FILE, SALIENCY_FILE)}})
    (folder / CARD_FILE).write_text(card.to_json())
    return card


def write_export(model: torch.nn.Module, card: ModelCard, out_dir: Path, opset: int = 18) -> ModelCard:
    """:func:`export_files` into ``out_dir``, replaced atomically (no checks, no registry)."""
    with replace_dir(out_dir) as tmp:
        return export_files(model, card, tmp, opset)


def write_examples(folder: Path, images: np.ndarray, labels: np.ndarray, limit: int = 12) -> int:
    """Write ``folder/examples.npz``: the first test image of each class (class order, at most ``limit``),
    as the preprocess stage stored them. The service's web UI offers them; returns how many."""
    picks = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:limit]
    with open(folder / EXAMPLES_FILE, "wb") as file:
        np.savez_compressed(file, images=np.ascontiguousarray(images[picks]), labels=labels[picks].astype(np.int64))
    return len(picks)


def read_test_metrics(path: Path) -> EvalMetrics:
    """The evaluate stage's ``metrics/eval.json``: a version is never registered without it (``compare``
    ranks versions by its top-1, and ``promote`` refuses a version it cannot rank)."""
    try:
        return EvalMetrics.read(path)
    except ContractError as err:
        raise ContractError(f"{err}; no version is registered without test metrics") from None


def export_stage(model_path: Path, data_dir: Path, run_id_path: Path, eval_metrics_path: Path, out_dir: Path,
                 opset: int, registered_name: str, experiment: str) -> ModelCard:
    """The whole stage; returns the card of the registered version (also ``out_dir/model_card.json``)."""
    test_metrics = read_test_metrics(eval_metrics_path)
    torch.set_num_threads(torch_threads())
    model, card = load_trained(model_path)
    card = card.model_copy(update={"mlflow_run_id": tracking.read_run_id(run_id_path),
                                   "registered_model": registered_name, "metrics": test_metrics.card_metrics()})
    images, labels = load_split(data_dir, "test")
    # The folder appears only when every check passed and the version is registered.
    with replace_dir(out_dir) as staging:
        card = export_files(model, card, staging, opset)
        write_examples(staging, images, labels)
        max_diff = check_parity(staging / CLASSIFIER_FILE, images, predict_logits(model, images, card.mean, card.std))
        log.info("ONNX Runtime matches PyTorch on %d test images (max |Δlogit| %.2e)", len(images), max_diff)
        try:
            check_saliency_finite(staging / SALIENCY_FILE, len(card.classes), card.channels, card.image_size)
        except ValueError as err:
            raise ExportCheckFailed(f"{err}; nothing was registered") from None
        log.info("saliency.onnx is finite on black, white, grey and noise images for every target")
        val_images = load_split(data_dir, "val")[0]
        card = add_reference(staging, card, load_split(data_dir, "train"), val_images if len(val_images) else images)
        version = registry.register(staging, card, np.ascontiguousarray(images[:1]), experiment)
        card = card.model_copy(update={"version": version})
        (staging / CARD_FILE).write_text(card.to_json())
    log.info("registered %s version %s (alias candidate)", registered_name, version)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the trained model to ONNX and register it.")
    parser.add_argument("--model", default="artifacts/train/model.pt", type=Path)
    parser.add_argument("--data", default="artifacts/preprocessed", type=Path, help="for the parity check")
    parser.add_argument("--run-id", default="artifacts/train/run_id", type=Path)
    parser.add_argument("--eval-metrics", default="metrics/eval.json", type=Path)
    parser.add_argument("--out", default="artifacts/export", type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    for noisy in ("onnx_ir", "onnxscript"):  # one line per optimisation pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def body() -> None:
        params = load_params(args.params)
        export_stage(args.model, args.data, args.run_id, args.eval_metrics, args.out, params.export.opset,
                     params.export.registered_model, params.mlflow.experiment)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
