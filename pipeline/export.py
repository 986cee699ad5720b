"""Export stage: ``classifier.onnx`` and ``saliency.onnx``, checked and registered in MLflow.

    python -m pipeline.export --model artifacts/train/model.pt --out artifacts/export

Both graphs take uint8 N×C×H×W and normalise inside (DESIGN.md, model contract). Before
anything is registered, ONNX Runtime must reproduce PyTorch's predictions on the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.saliency import ClassifierGraph, SaliencyGraph, export_onnx, fold_adaptive_pool
from pipeline import tracking
from pipeline.config import load_params
from pipeline.evaluate import load_trained, predict_logits
from pipeline.train import load_split, write_json

log = logging.getLogger(__name__)


def model_metadata(config: dict, run_id: str, metrics: dict) -> dict[str, str]:
    """The metadata props both ONNX files carry (the service reads them)."""
    tags = tracking.source_tags()
    return {
        "classes": json.dumps(config["classes"]),
        "image_size": str(config["image_size"]),
        "channels": str(config["channels"]),
        "mean": json.dumps(config["mean"]),
        "std": json.dumps(config["std"]),
        "model": config["model"],
        "git_commit": tags["git_commit"],
        "data_md5": tags["data_md5"],
        "mlflow_run_id": run_id,
        "metrics": json.dumps(metrics),
    }


def _providers() -> list[str]:
    # onnxruntime-gpu lists CUDA even where no driver exists; torch knows whether it would load.
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.cuda.is_available() else ["CPUExecutionProvider"]


def onnx_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_parity(path: Path, model: torch.nn.Module, config: dict, images: np.ndarray) -> dict[str, float]:
    """Run ``classifier.onnx`` and PyTorch on the same images; top-1 must agree on every one."""
    session = onnx_session(path)
    onnx_logits = np.concatenate([session.run(["logits"], {"image": np.ascontiguousarray(images[i:i + 64])})[0]
                                  for i in range(0, len(images), 64)])
    torch_logits = predict_logits(model, images, config)
    disagree = int((onnx_logits.argmax(1) != torch_logits.argmax(1)).sum())
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    if disagree:
        raise RuntimeError(f"{path}: ONNX Runtime and PyTorch disagree on {disagree} of {len(images)} test images")
    return {"images": len(images), "max_abs_logit_diff": max_diff}


def register(classifier_path: Path, registered_name: str, run_id: str, experiment: str, metrics: dict,
             example: np.ndarray) -> str:
    """Log ``classifier.onnx`` with the ONNX flavor, register it, alias it ``candidate``; returns the version."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    session = onnx_session(classifier_path)
    outputs = dict(zip(["logits", "probabilities"], session.run(None, {"image": example}), strict=True))
    signature = infer_signature({"image": example}, outputs)
    with tracking.run(experiment, run_id=run_id):
        info = tracking.with_retry(lambda: mlflow.onnx.log_model(
            onnx.load(str(classifier_path)), name="classifier", signature=signature,
            input_example={"image": example}, registered_model_name=registered_name,
            save_as_external_data=False, onnx_execution_providers=_providers()))
        mlflow.log_artifact(str(classifier_path.parent / "saliency.onnx"), "export")
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    tracking.with_retry(lambda: client.set_registered_model_alias(registered_name, "candidate", version))
    tags = {"mlflow_run_id": run_id, **{f"test_{k}": str(v) for k, v in metrics.items()}}
    for key, value in tags.items():
        tracking.with_retry(lambda key=key, value=value: client.set_model_version_tag(
            registered_name, version, key, value))
    return version


def export_stage(model_path: Path, data_dir: Path, run_id_path: Path, eval_metrics_path: Path, out_dir: Path,
                 opset: int, registered_name: str, experiment: str) -> dict:
    """The whole stage; returns a summary written to ``out_dir/export.json``."""
    model, config = load_trained(model_path)
    run_id = tracking.read_run_id(run_id_path)
    eval_metrics = json.loads(eval_metrics_path.read_text()) if eval_metrics_path.exists() else {}
    metrics = {k: eval_metrics[k] for k in ("top1", "top5") if k in eval_metrics}
    metadata = model_metadata(config, run_id, metrics)
    channels, size = config["channels"], config["image_size"]
    example = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)

    classifier_path, saliency_path = out_dir / "classifier.onnx", out_dir / "saliency.onnx"
    graph_model = fold_adaptive_pool(model, size)  # the size is fixed from here on
    log.info("exporting %s", classifier_path)
    export_onnx(ClassifierGraph(graph_model, config["mean"], config["std"]), classifier_path, (example,),
                ["image"], ["logits", "probabilities"], metadata, opset)
    log.info("exporting %s", saliency_path)
    export_onnx(SaliencyGraph(graph_model, config["mean"], config["std"], size), saliency_path,
                (example, torch.tensor([-1, 0])), ["image", "target"],
                ["logits", "gradient", "guided", "gradcam"], metadata, opset)

    images, _ = load_split(Path(data_dir), "test")
    parity = check_parity(classifier_path, model, config, images)
    log.info("ONNX Runtime matches PyTorch on %d test images (max |Δlogit| %.2e)", parity["images"],
             parity["max_abs_logit_diff"])
    version = register(classifier_path, registered_name, run_id, experiment, metrics,
                       np.ascontiguousarray(images[:1]))
    log.info("registered %s version %s (alias candidate)", registered_name, version)
    summary = {"registered_model": registered_name, "version": version, "mlflow_run_id": run_id,
               "parity": parity, "metrics": metrics}
    write_json(summary, out_dir / "export.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the trained model to ONNX and register it.")
    parser.add_argument("--model", default="artifacts/train/model.pt", type=Path)
    parser.add_argument("--data", default="artifacts/preprocessed", type=Path, help="for the parity check")
    parser.add_argument("--run-id", default="artifacts/train/run_id", type=Path)
    parser.add_argument("--eval-metrics", default="metrics/eval.json", type=Path)
    parser.add_argument("--out", default="artifacts/export", type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # one line per optimisation pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    params = load_params(args.params)
    try:
        export_stage(args.model, args.data, args.run_id, args.eval_metrics, args.out, params.export.opset,
                     params.export.registered_model, params.mlflow.experiment)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
