"""Evaluate stage: top-1/top-5, per-class metrics and pictures on the test split.

    python -m pipeline.evaluate --data artifacts/preprocessed --model artifacts/train/model.pt

Logs into the training run (same MLflow run id), writes ``metrics/eval.json`` for
``dvc metrics`` and ``plots/eval/*.json`` for ``dvc plots``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.saliency import SaliencyGraph
from pipeline.common import colormap
from pipeline.common.contract import ModelCard
from pipeline.common.cpus import torch_threads
from pipeline.common.errors import UserError, run_command, setup_logging
from pipeline.common.metrics import ClassScores, EvalMetrics, EvalReport, Prediction, round_metric, write_rows
from pipeline.lib import tracking
from pipeline.lib.config import load_params
from pipeline.lib.engine import predict_logits
from pipeline.lib.loader import load_split
from pipeline.lib.trained import load_trained

log = logging.getLogger(__name__)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> EvalReport:
    """Top-1, top-k (k = min(5, classes)), loss, per-class precision/recall, confusion matrix."""
    k = min(5, len(classes))
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    predicted = ranked[:, 0]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros_like(tp), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros_like(tp), where=confusion.sum(1) > 0)
    return EvalReport(
        top1=float((predicted == labels).mean()), top5=float((ranked == labels[:, None]).any(1).mean()), top5_k=k,
        loss=float(-log_probs[np.arange(len(labels)), labels].mean()), samples=int(len(labels)),
        per_class=[ClassScores(class_name=name, precision=round_metric(precision[i]), recall=round_metric(recall[i]),
                               support=int(confusion[i].sum())) for i, name in enumerate(classes)],
        confusion=confusion.tolist(),
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    plt = _plt()
    size = max(4, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    for (i, j), value in np.ndenumerate(confusion):
        if value:
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > confusion.max() / 2 else "black", fontsize=8)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _show(ax, image: np.ndarray) -> None:
    """uint8 C×H×W on an axis."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image.transpose(1, 2, 0))
    ax.axis("off")


def plot_mistakes(images: np.ndarray, labels: np.ndarray, logits: np.ndarray, classes: list[str],
                  path: Path, count: int = 16) -> int:
    """A grid of the most confident mistakes; returns how many were drawn."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]
    plt = _plt()
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        _show(ax, images[i])
        ax.set_title(f"{classes[predicted[i]]} ({probs[i, predicted[i]]:.2f})\ntrue {classes[labels[i]]}", fontsize=8)
    if not len(wrong):
        axes[0, 0].set_title("no mistakes on the test split")
    fig.suptitle("Most confident mistakes: predicted (probability), true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(wrong)


def plot_saliency(model: torch.nn.Module, card: ModelCard, images: np.ndarray, labels: np.ndarray,
                  path: Path, per_class: int = 2) -> None:
    """Image, guided backpropagation and Grad-CAM overlay for a few test images of each class."""
    classes = card.classes
    picks = [i for c in range(len(classes)) for i in np.flatnonzero(labels == c)[:per_class]]
    if not picks:
        return
    graph = SaliencyGraph(model, card.mean, card.std, card.image_size)
    with torch.no_grad():
        logits, _, guided, gradcam = graph(torch.from_numpy(np.ascontiguousarray(images[picks])),
                                           torch.full((len(picks),), -1, dtype=torch.int64))
    plt = _plt()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(colormap.table(), name=colormap.NAME)  # the service's and the UI's colours
    fig, axes = plt.subplots(len(picks), 3, figsize=(7, 2.3 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        image = images[i]
        guided_map = guided[row].abs().amax(0).numpy()
        _show(axes[row, 0], image)
        axes[row, 0].set_title(f"true {classes[labels[i]]}, predicted {classes[int(logits[row].argmax())]}",
                               fontsize=7)
        axes[row, 1].imshow(guided_map / (guided_map.max() + 1e-12), cmap=cmap, vmin=0, vmax=1)
        axes[row, 1].set_title("guided backprop", fontsize=7)
        axes[row, 1].axis("off")
        _show(axes[row, 2], image)
        axes[row, 2].imshow(gradcam[row].numpy(), cmap=cmap, alpha=0.45, vmin=0, vmax=1)
        axes[row, 2].set_title("Grad-CAM", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate_stage(data_dir: Path, model_path: Path, run_id_path: Path, metrics_path: Path,
                   plots_dir: Path, figures_dir: Path, experiment: str, batch_size: int,
                   saliency_per_class: int) -> EvalMetrics:
    """The whole stage; returns the metrics written to ``metrics_path``."""
    import mlflow

    torch.set_num_threads(torch_threads())
    model, card = load_trained(model_path)
    classes = card.classes
    images, labels = load_split(data_dir, "test")
    if len(labels) == 0:
        raise UserError(f"{data_dir}: the test split is empty; raise preprocess.test_fraction")
    logits = predict_logits(model, images, card.mean, card.std, batch_size)
    report = classification_metrics(logits, labels, classes)
    if report.top5_k < 5:
        log.warning("only %d classes: top5 is top-%d accuracy", len(classes), report.top5_k)
    log.info("test: top-1 %.4f  top-%d %.4f  loss %.4f  (%d images)", report.top1, report.top5_k, report.top5,
             report.loss, report.samples)

    # 4 decimals also in MLflow's test_* metrics: they and the registered version's tags are the
    # same value as metrics/eval.json; eval/metrics.json in MLflow keeps full precision.
    summary = report.summary()
    summary.write(metrics_path)
    write_rows(plots_dir / "confusion.json", [Prediction(actual=classes[a], predicted=classes[p])
                                              for a, p in zip(labels, logits.argmax(1), strict=True)])
    write_rows(plots_dir / "per_class.json", report.per_class)

    figures_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion(np.asarray(report.confusion), classes, figures_dir / "confusion_matrix.png")
    plot_mistakes(images, labels, logits, classes, figures_dir / "confident_mistakes.png")
    plot_saliency(model, card, images, labels, figures_dir / "saliency.png", saliency_per_class)

    with tracking.run(experiment, run_id=tracking.read_run_id(run_id_path)):
        tracking.with_retry(lambda: mlflow.log_metrics({"test_top1": summary.top1, "test_top5": summary.top5,
                                                        "test_loss": summary.loss}))
        tracking.with_retry(lambda: mlflow.log_dict(report.plain(), "eval/metrics.json"))
        tracking.with_retry(lambda: mlflow.log_artifacts(str(figures_dir), "eval"))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate the trained model on the test split.")
    parser.add_argument("--data", default="artifacts/preprocessed", type=Path)
    parser.add_argument("--model", default="artifacts/train/model.pt", type=Path)
    parser.add_argument("--run-id", default="artifacts/train/run_id", type=Path, help="MLflow run to log into")
    parser.add_argument("--metrics", default="metrics/eval.json", type=Path)
    parser.add_argument("--plots", default="plots/eval", type=Path, help="dvc plots data")
    parser.add_argument("--figures", default="artifacts/eval", type=Path, help="PNG figures")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> None:
        params = load_params(args.params)
        evaluate_stage(args.data, args.model, args.run_id, args.metrics, args.plots, args.figures,
                       params.mlflow.experiment, params.evaluate.batch_size, params.evaluate.saliency_per_class)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
