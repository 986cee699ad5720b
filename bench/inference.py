"""Inference cost: ONNX Runtime against PyTorch eager on the CPU, and what saliency costs.

    python bench/inference.py [--repeats 200]

For LeNet-5 (1×224×224, the default pipeline) and VGG16 (3×64×64, small enough for 2 cores):
batch-1 latency (p50, p99) and batch-32 throughput of ``classifier.onnx`` in onnxruntime and
of the same network in PyTorch eager (``inference_mode``, normalisation included), then the
cost of each saliency method relative to one ``classifier.onnx`` forward at batch 1: a graph
exported with that method alone (``SaliencyGraph(methods=...)``), and ``saliency.onnx`` as the
export stage writes it (logits + gradient + guided + Grad-CAM in one call, what the service
runs). The ONNX graphs are built as the export stage builds them (VGG16's adaptive pool folded
into its first Linear below 224 px, see ``models.graphs.fold_adaptive_pool``); eager runs the
model as trained. ONNX Runtime runs every node of a graph whatever outputs are fetched, so a single
method's cost is measured on its own graph. Random seeded weights: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models import build_model
from models.graphs import ClassifierGraph, fold_adaptive_pool
from models.saliency import METHODS, SaliencyGraph
from pipeline.lib.onnx_export import export_onnx

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


def measure(name: str, channels: int, size: int, repeats: int, tmp: Path) -> dict[str, np.ndarray]:
    """Export one model and time each call in ms: ORT and eager at batch 1 and 32, and each
    saliency graph at batch 1 (one per method, then all methods together)."""
    torch.manual_seed(0)
    model = build_model(name, 10, channels, size).eval()
    mean, std = [0.45] * channels, [0.25] * channels
    example = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    eager = ClassifierGraph(model, mean, std).eval()
    exported = fold_adaptive_pool(model, size)  # as pipeline.export does
    export_onnx(ClassifierGraph(exported, mean, std), tmp / f"{name}.onnx", (example,), ["image"],
                ["logits", "probabilities", "embedding"], {})
    classifier = session(tmp / f"{name}.onnx")
    saliency = {}
    for methods in [(m,) for m in METHODS] + [METHODS]:
        path = tmp / f"{name}_{'_'.join(methods)}.onnx"
        export_onnx(SaliencyGraph(exported, mean, std, size, methods), path, (example, torch.tensor([-1, 0])),
                    ["image", "target"], ["logits", *methods], {})
        saliency["all" if methods == METHODS else methods[0]] = session(path)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, channels, size, size), dtype=np.uint8)
    many = rng.integers(0, 256, (32, channels, size, size), dtype=np.uint8)

    def eager_call(x: np.ndarray):
        with torch.inference_mode():
            return eager(torch.from_numpy(x))

    few = max(5, repeats // 10)
    times = {"ort_1": timed(lambda: classifier.run(None, {"image": one}), repeats),
             "eager_1": timed(lambda: eager_call(one), repeats),
             "ort_32": timed(lambda: classifier.run(None, {"image": many}), few),
             "eager_32": timed(lambda: eager_call(many), few)}
    for method, graph in saliency.items():
        times[method] = timed(lambda graph=graph: graph.run(None, {"image": one, "target": np.array([-1])}), repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per batch-1 measurement")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':7} {'input':>9} | {'ORT b1 p50/p99 ms':>17} {'eager p50/p99 ms':>17} {'ratio':>6} | "
          f"{'ORT b32 img/s':>13} {'eager img/s':>11} {'ratio':>5}")
    costs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, channels, size in CASES:
            repeats = args.repeats if name == "lenet5" else max(20, args.repeats // 5)
            times = measure(name, channels, size, repeats, Path(tmp))
            p50, p99 = np.percentile(times["ort_1"], [50, 99])
            e50, e99 = np.percentile(times["eager_1"], [50, 99])
            ort_tp, torch_tp = 32e3 / np.median(times["ort_32"]), 32e3 / np.median(times["eager_32"])
            shape = f"{channels}x{size}x{size}"
            print(f"{name:7} {shape:>9} | {p50:8.2f}/{p99:<8.2f} {e50:8.2f}/{e99:<8.2f} {e50 / p50:5.1f}x | "
                  f"{ort_tp:13.0f} {torch_tp:11.0f} {ort_tp / torch_tp:4.1f}x")
            costs.append((name, shape, p50, {m: np.median(times[m]) for m in (*METHODS, "all")}))
    print("\nSaliency at batch 1 in ONNX Runtime, ms (× one classifier.onnx forward); 'all' = saliency.onnx:")
    print(f"{'model':7} {'input':>9} | {'forward':>7} | " + " | ".join(f"{m:>16}" for m in (*METHODS, "all")))
    for name, shape, forward, medians in costs:
        cells = " | ".join(f"{ms:8.2f} ({ms / forward:4.1f}x)" for ms in medians.values())
        print(f"{name:7} {shape:>9} | {forward:7.2f} | {cells}")


if __name__ == "__main__":
    main()
