"""Training throughput: our input path against the loop a user would write from the lecture.

    python bench/train.py [--steps 30] [--batch-size 64]

Ours: the preprocessed uint8 arrays, memory-mapped, gathered by a background thread,
normalised on the device, channels_last. Baseline: torchvision ``ImageFolder`` with per-sample
PIL transforms and a ``DataLoader``; same model, batch size, threads and step count. Both run
in this process, one after the other, on the default digits images.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from pipeline.config import PreprocessParams  # noqa: E402
from pipeline.datasets import write_digits  # noqa: E402
from pipeline.loader import batches, to_input  # noqa: E402
from pipeline.preprocess import preprocess_folder  # noqa: E402


def image_folder() -> Path:
    data = ROOT / "data"
    if data.is_dir():
        return data
    cache = ROOT / "bench" / ".cache" / "digits"
    if not cache.is_dir():
        write_digits(cache)
    return cache


def step(model, optimizer, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run_ours(name: str, pre: Path, size: int, batch_size: int, steps: int) -> tuple[float, float]:
    images = np.load(pre / "train_images.npy", mmap_mode="r")
    labels = np.load(pre / "train_labels.npy")
    mean = torch.tensor([images[:256].mean() / 255]).view(1, -1, 1, 1)
    std = torch.tensor([images[:256].std() / 255]).view(1, -1, 1, 1)
    torch.manual_seed(0)
    model = build_model(name, 10, 1, size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = np.random.default_rng(0).permutation(len(labels))
    order = np.resize(order, steps * batch_size + batch_size)  # cycle if the split is small
    done = wait = 0.0
    tick = start = time.perf_counter()
    for i, (x, y) in enumerate(batches(images, labels, batch_size, order)):
        if i == steps:
            break
        wait += time.perf_counter() - tick
        step(model, optimizer, to_input(x, mean, std, torch.device("cpu"), True), y)
        done += len(y)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return done / seconds, wait / seconds


def run_baseline(name: str, folder: Path, size: int, batch_size: int, steps: int) -> tuple[float, float]:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Grayscale(), transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize([0.3], [0.33]),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform), batch_size=batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(name, 10, 1, size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    done = wait = 0.0
    tick = start = time.perf_counter()
    it = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        wait += time.perf_counter() - tick
        step(model, optimizer, x, y)
        done += len(y)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return done / seconds, wait / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = image_folder()
    cases = [("lenet5", 32), ("vgg16", 32)]
    print(f"{len(list(folder.rglob('*.png')))} images from {folder}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} threads")
    print(f"{'model':8} {'size':>4} | {'ours img/s':>10} {'wait':>6} | {'baseline img/s':>14} {'wait':>6} | ratio")
    for name, size in cases:
        with tempfile.TemporaryDirectory() as tmp:
            preprocess_folder(folder, Path(tmp) / "pre", PreprocessParams(size=size, val_fraction=0.1,
                                                                          test_fraction=0.1), seed=0)
            steps = args.steps if name == "lenet5" else max(3, args.steps // 6)
            run_ours(name, Path(tmp) / "pre", size, args.batch_size, 2)  # warm-up (oneDNN kernels)
            ours, ours_wait = run_ours(name, Path(tmp) / "pre", size, args.batch_size, steps)
            base, base_wait = run_baseline(name, folder, size, args.batch_size, steps)
        print(f"{name:8} {size:>4} | {ours:>10.0f} {ours_wait:>6.1%} | {base:>14.0f} {base_wait:>6.1%} | "
              f"{ours / base:.1f}x")


if __name__ == "__main__":
    main()
