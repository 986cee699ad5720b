"""ONNX Runtime on the pipeline side: the one way to open a session (:func:`cpu_session`) and the
checks an export must pass before the export stage registers it.

numpy and onnxruntime only, no torch: the checks run the files as the service will, so they see
what the exporter's optimizer and ONNX Runtime made of the graph, not what PyTorch meant. That
gap is real: Grad-CAM's ``cam / (max + 1e-8)`` lost its epsilon in the optimizer and divided
0/0 in ONNX only, wherever the map was all zero, while every PyTorch-side check passed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.common.cpus import onnx_check_threads

SALIENCY_OUTPUTS = ("logits", "gradient", "guided", "gradcam")  # the saliency.onnx contract, in order
# Rows per run: the graph keeps every activation for its hand-written backward pass, so a row of
# VGG16 at 224 px holds a few hundred MB; a chunk bounds memory whatever the number of classes.
CHUNK = 8
# Every class up to this many; beyond (ImageNet's 1,000) an even spread of this many, so the
# check costs a bounded number of passes: the zero-map failure does not depend on which class.
MAX_TARGETS = 32


class ExportCheckFailed(RuntimeError):
    """The exported graphs do not behave like the trained model; nothing was registered."""


def cpu_session(path: str | Path) -> ort.InferenceSession:
    """An onnxruntime session on the CPU (checks and signatures; serving opens its own), with
    :func:`~pipeline.common.cpus.onnx_check_threads` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = onnx_check_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(path: str | Path, images: np.ndarray, reference_logits: np.ndarray, batch: int = 64) -> float:
    """Run ``classifier.onnx`` on ``images`` (uint8 N×C×H×W); its top-1 must equal the reference
    (PyTorch's) on every image. Returns the largest absolute logit difference.

    Raises:
        ExportCheckFailed: naming the file and how many images disagree.
    """
    session = cpu_session(path)
    logits = np.concatenate([session.run(["logits"], {"image": np.ascontiguousarray(images[i:i + batch])})[0]
                             for i in range(0, len(images), batch)])
    disagree = int((logits.argmax(1) != reference_logits.argmax(1)).sum())
    if disagree:
        raise ExportCheckFailed(f"{path}: ONNX Runtime and PyTorch disagree on {disagree} of {len(images)} "
                                "test images; nothing was registered")
    return float(np.abs(logits - reference_logits).max())


def degenerate_inputs(channels: int, image_size: int) -> dict[str, np.ndarray]:
    """The images where saliency maps tend to vanish, plus one ordinary image.

    Uniform images have no edges: activations are flat, whole ReLU/Tanh layers die or saturate
    together and Grad-CAM is often all zero (5 of 10 targets of a random LeNet-5). Seeded noise
    is the everyday case the check must not break.

    Args:
        channels: image channels (1 or 3).
        image_size: square image side in pixels.

    Returns:
        name → uint8 batch (1, channels, image_size, image_size): ``black``, ``white``, ``grey``, ``noise``.
    """
    shape = (1, channels, image_size, image_size)
    return {
        "black": np.zeros(shape, np.uint8),
        "white": np.full(shape, 255, np.uint8),
        "grey": np.full(shape, 128, np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8),
    }


def check_saliency_finite(path: str | Path, num_classes: int, channels: int, image_size: int) -> None:
    """Run ``saliency.onnx`` on every :func:`degenerate_inputs` image for every target (each
    class and −1, the predicted one) and require every output to be finite.

    Besides the graph's outputs this checks ``guided * gradcam``, the guided Grad-CAM the service
    computes from them: a NaN in Grad-CAM reaches users through it too.

    Args:
        path: the exported ``saliency.onnx`` (inputs image, target; outputs
            :data:`SALIENCY_OUTPUTS`).
        num_classes: K, the number of logits; targets 0..K−1 (an even spread of
            :data:`MAX_TARGETS` when K is larger) and −1 are tried.
        channels: image channels the graph takes.
        image_size: square image side the graph was built for.

    Raises:
        ValueError: naming the first image, target and output that are not finite.
    """
    session = cpu_session(path)
    classes = np.unique(np.linspace(0, num_classes - 1, min(num_classes, MAX_TARGETS)).round().astype(np.int64))
    targets = np.array([*classes.tolist(), -1], dtype=np.int64)
    for name, image in degenerate_inputs(channels, image_size).items():
        for start in range(0, len(targets), CHUNK):
            chunk = targets[start:start + CHUNK]
            feeds = {"image": np.repeat(image, len(chunk), axis=0), "target": chunk}
            outputs = dict(zip(SALIENCY_OUTPUTS, session.run(list(SALIENCY_OUTPUTS), feeds), strict=True))
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite products are reported below
                outputs["guided*gradcam"] = outputs["guided"] * outputs["gradcam"][:, None]
            for row, target in enumerate(chunk.tolist()):
                for output, values in outputs.items():
                    if not np.isfinite(values[row]).all():
                        raise ValueError(f"{path}: saliency.onnx yields non-finite values for the {name} image, "
                                         f"target {target}, output {output}")
