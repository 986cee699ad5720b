"""The exported ONNX graphs as onnxruntime sessions, and a broken model refused before any worker starts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.common.contract import CLASSIFIER_FILE, SALIENCY_FILE, ModelCard
from serving import store


def onnx_session(path: Path, threads: int, spinning: bool = False, cpu_only: bool = False):
    """An onnxruntime session on CUDA when onnxruntime can really use it there, else on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle intra-op threads spin by default: fine for one caller, but in a server they burn the
    # cores that decode the next requests (bench/serve.py measures both; SERVING_ORT_SPINNING).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not cpu_only and "CUDAExecutionProvider" in ort.get_available_providers():
        # onnxruntime-gpu lists CUDA even without a driver or cuDNN; only creating a session
        # tells. It then logs an error and falls back to CPU: silence that, we log the outcome.
        ort.set_default_logger_severity(4)
        try:
            return ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        finally:
            ort.set_default_logger_severity(2)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_in_chunks(session, outputs: list[str], batch: np.ndarray, size: int) -> list[np.ndarray]:
    """``session.run`` on at most ``size`` images at a time, each output concatenated over the chunks.

    onnxruntime's memory arena grows to the largest batch it has run and keeps it: with chunks, that
    is one ``size`` batch (reached at start-up), however many images one request brings.
    """
    chunks = [session.run(outputs, {"image": batch[i:i + size]}) for i in range(0, len(batch), size)]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def check_model_or_exit() -> None:
    """Load both graphs once, in the ``bentoml serve`` process before any worker starts; on
    failure print one line naming the file and the reason and exit 3.

    A worker whose ``__init__`` raises is restarted by BentoML's supervisor every few seconds
    forever, with /readyz and /livez never answering; this makes a broken model a start-up error.
    """
    current = "SERVING_MODEL"
    try:
        model_dir = store.resolve_model_dir()  # the card is valid and names both files by sha256
        for name in (CLASSIFIER_FILE, SALIENCY_FILE):
            current = str(Path(model_dir) / name)
            ModelCard.from_onnx_props(  # the graph loads and carries a valid card
                onnx_session(Path(model_dir) / name, 1, cpu_only=True).get_modelmeta().custom_metadata_map)
    except Exception as err:  # noqa: BLE001 - any reason is reported the same way, then the process exits
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        print(f"error: cannot serve the model: {current}: {reason}"[:1000], file=sys.stderr, flush=True)
        sys.exit(3)
