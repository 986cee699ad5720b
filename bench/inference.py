"""Inference cost: ONNX Runtime against PyTorch eager on the CPU, and what saliency costs.

    python bench/inference.py [--repeats 200]

For LeNet-5 (1×224×224, the default pipeline) and VGG16 (3×64×64, small enough for 2 cores):
batch-1 latency (p50, p99) and batch-32 throughput of ``classifier.onnx`` in onnxruntime and
of the same network in PyTorch eager (``inference_mode``, normalisation included), then the
cost of one ``saliency.onnx`` call (logits + gradient + guided + Grad-CAM) relative to one
``classifier.onnx`` forward at batch 1. Random seeded weights: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import build_model  # noqa: E402
from models.saliency import ClassifierGraph, SaliencyGraph, export_onnx  # noqa: E402

CASES = [("lenet5", 1, 224), ("vgg16", 3, 64)]


def timed(fn, repeats: int) -> np.ndarray:
    """Milliseconds per call, after a warm-up."""
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(name: str, channels: int, size: int, repeats: int, tmp: Path) -> tuple:
    """Export one model and time it: (ORT b1, eager b1, ORT b32, eager b32, saliency b1) in ms."""
    torch.manual_seed(0)
    model = build_model(name, 10, channels, size).eval()
    mean, std = [0.45] * channels, [0.25] * channels
    example = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    classifier_path, saliency_path = tmp / f"{name}.onnx", tmp / f"{name}_saliency.onnx"
    eager = ClassifierGraph(model, mean, std).eval()
    export_onnx(eager, classifier_path, (example,), ["image"], ["logits", "probabilities"], {})
    export_onnx(SaliencyGraph(model, mean, std, size), saliency_path, (example, torch.tensor([-1, 0])),
                ["image", "target"], ["logits", "gradient", "guided", "gradcam"], {})
    classifier, saliency = session(classifier_path), session(saliency_path)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, channels, size, size), dtype=np.uint8)
    many = rng.integers(0, 256, (32, channels, size, size), dtype=np.uint8)

    def eager_call(x: np.ndarray):
        with torch.inference_mode():
            return eager(torch.from_numpy(x))

    few = max(5, repeats // 10)
    return (timed(lambda: classifier.run(None, {"image": one}), repeats), timed(lambda: eager_call(one), repeats),
            timed(lambda: classifier.run(None, {"image": many}), few), timed(lambda: eager_call(many), few),
            timed(lambda: saliency.run(None, {"image": one, "target": np.array([-1])}), repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per batch-1 measurement")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':7} {'input':>9} | {'ORT b1 p50/p99 ms':>17} {'eager p50/p99 ms':>17} {'ratio':>6} | "
          f"{'ORT b32 img/s':>13} {'eager img/s':>11} {'ratio':>5} | {'saliency.onnx ms':>16} {'x forward':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, channels, size in CASES:
            repeats = args.repeats if name == "lenet5" else max(20, args.repeats // 5)
            ort_1, torch_1, ort_32, torch_32, saliency_1 = measure(name, channels, size, repeats, Path(tmp))
            p50, p99 = np.percentile(ort_1, [50, 99])
            e50, e99 = np.percentile(torch_1, [50, 99])
            ort_tp, torch_tp = 32e3 / np.median(ort_32), 32e3 / np.median(torch_32)
            s50 = np.percentile(saliency_1, 50)
            shape = f"{channels}x{size}x{size}"
            print(f"{name:7} {shape:>9} | {p50:8.2f}/{p99:<8.2f} {e50:8.2f}/{e99:<8.2f} {e50 / p50:5.1f}x | "
                  f"{ort_tp:13.0f} {torch_tp:11.0f} {ort_tp / torch_tp:4.1f}x | {s50:16.2f} {s50 / p50:8.1f}x")
    print("saliency.onnx computes all three maps (gradient, guided, Grad-CAM) and the logits in one call.")


if __name__ == "__main__":
    main()
