"""Training throughput: our input path, and thread counts on a quiet and on a busy machine.

    python bench/train.py [--steps 30] [--batch-size 64] [--contention-steps 200] [--only input|contention]

Input path. Ours: the preprocessed uint8 arrays, memory-mapped, gathered by a background
thread, normalised on the device, channels_last. Baseline: torchvision ``ImageFolder`` with
per-sample PIL transforms and a ``DataLoader``; same model, batch size, threads and step count.
Both run in this process, one after the other, on the default digits images.

Contention. LeNet-5 at 32 px through the train stage's own loop (``train_one_epoch`` with the
``ThreadPacer``), quiet and then with one busy competitor process (a Python spin loop), for
1 thread, all usable CPUs, the default (``threads: 0``) and ``adaptive``. Settings run round-robin,
``--repeats`` rounds, each figure the median; ratios are against the best fixed count in the same condition.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import build_model
from pipeline.common.cpus import usable_cpus
from pipeline.lib.config import PreprocessParams, TrainParams
from pipeline.lib.dataset_folders import write_digits
from pipeline.lib.engine import Context, train_one_epoch
from pipeline.lib.loader import batches, to_input
from pipeline.lib.pacing import ThreadPacer
from pipeline.preprocess import preprocess_folder

ROOT = Path(__file__).resolve().parent.parent


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


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def run_pacer(setting: int | str, pre: Path, batch_size: int, steps: int) -> tuple[float, bool]:
    """img/s of ``steps`` training steps under ``train.threads: setting``; and whether it warned."""
    images = np.load(pre / "train_images.npy", mmap_mode="r")
    labels = np.load(pre / "train_labels.npy")
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 32).to(memory_format=torch.channels_last)
    p = TrainParams(batch_size=batch_size, threads=setting)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ctx = Context.for_device(torch.device("cpu"), [0.3], [0.33], channels_last=True)
    order = np.resize(np.random.default_rng(0).permutation(len(labels)), steps * batch_size)
    warnings, pacing_log = _Warnings(), logging.getLogger("pipeline.lib.pacing")
    pacing_log.addHandler(warnings)
    pacing_log.setLevel(logging.WARNING)
    pacing_log.propagate = False  # counted in the table, not printed
    try:
        pacer = ThreadPacer(setting, usable_cpus())
        pacer.start_epoch(1)
        stats = train_one_epoch(model, images, labels, order, optimizer, scheduler, ctx, p, torch.Generator(),
                                progress=False, on_step=pacer.step_done)
    finally:
        pacing_log.removeHandler(warnings)
    return stats.images_per_s, warnings.count > 0


def contention_table(folder: Path, batch_size: int, steps: int, repeats: int) -> None:
    usable = usable_cpus()
    settings: list[tuple[str, int | str]] = [("1 thread", 1), (f"all usable ({usable})", usable),
                                             ("default (0)", 0), ("adaptive", "adaptive")]
    print(f"\nContention: LeNet-5 32 px, batch {batch_size}, {steps} steps, median of {repeats}; "
          f"{usable} usable CPUs; load average {os.getloadavg()[0]:.1f} before")
    results: dict[str, dict[str, tuple[float, bool]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre"
        preprocess_folder(folder, pre, PreprocessParams(image_size=32, val_fraction=0.1, test_fraction=0.1), seed=0)
        for setting in (1, usable):
            run_pacer(setting, pre, batch_size, 5)  # warm-up: oneDNN kernels for both counts
        for condition in ("quiet", "1 busy competitor"):
            competitor = None
            if condition != "quiet":
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                # Round-robin, not one setting after the other: load from other jobs drifts, and
                # each round then sees about the same drift for every setting.
                runs: dict[str, list[tuple[float, bool]]] = {name: [] for name, _ in settings}
                for _ in range(repeats):
                    for name, setting in settings:
                        runs[name].append(run_pacer(setting, pre, batch_size, steps))
                results[condition] = {name: (statistics.median(r[0] for r in rs), any(r[1] for r in rs))
                                      for name, rs in runs.items()}
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    print(f"load average {os.getloadavg()[0]:.1f} after")
    print(f"{'threads':18} | {'quiet img/s':>11} {'vs best':>7} {'warned':>6} | {'busy img/s':>10} {'vs best':>7} "
          f"{'warned':>6} | busy/quiet")
    best = {c: max(results[c][settings[0][0]][0], results[c][settings[1][0]][0]) for c in results}
    quiet, busy = results["quiet"], results["1 busy competitor"]
    for name, _ in settings:
        print(f"{name:18} | {quiet[name][0]:>11.0f} {quiet[name][0] / best['quiet']:>6.2f}x "
              f"{'yes' if quiet[name][1] else 'no':>6} | {busy[name][0]:>10.0f} "
              f"{busy[name][0] / best['1 busy competitor']:>6.2f}x {'yes' if busy[name][1] else 'no':>6} | "
              f"{busy[name][0] / quiet[name][0]:.2f}x")
    default, adaptive = "default (0)", "adaptive"
    checks = [
        ("busy: default >= 0.9x best fixed, or warns",
         busy[default][0] >= 0.9 * best["1 busy competitor"] or busy[default][1]),
        ("busy: adaptive >= 0.9x best fixed", busy[adaptive][0] >= 0.9 * best["1 busy competitor"]),
        ("quiet: default >= 0.95x best fixed", quiet[default][0] >= 0.95 * best["quiet"]),
        ("quiet: adaptive >= 0.95x best fixed", quiet[adaptive][0] >= 0.95 * best["quiet"]),
    ]
    for what, ok in checks:
        print(f"  {'met ' if ok else 'MISSED'} {what}")


def input_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    folder = image_folder()
    cases = [("lenet5", 32), ("vgg16", 32)]
    print(f"{len(list(folder.rglob('*.png')))} images from {folder}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} threads")
    print(f"{'model':8} {'size':>4} | {'ours img/s':>10} {'wait':>6} | {'baseline img/s':>14} {'wait':>6} | ratio")
    for name, size in cases:
        with tempfile.TemporaryDirectory() as tmp:
            preprocess_folder(folder, Path(tmp) / "pre", PreprocessParams(image_size=size, val_fraction=0.1,
                                                                          test_fraction=0.1), seed=0)
            steps = args.steps if name == "lenet5" else max(3, args.steps // 6)
            run_ours(name, Path(tmp) / "pre", size, args.batch_size, 2)  # warm-up (oneDNN kernels)
            ours, ours_wait = run_ours(name, Path(tmp) / "pre", size, args.batch_size, steps)
            base, base_wait = run_baseline(name, folder, size, args.batch_size, steps)
        print(f"{name:8} {size:>4} | {ours:>10.0f} {ours_wait:>6.1%} | {base:>14.0f} {base_wait:>6.1%} | "
              f"{ours / base:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="input table: torch threads")
    parser.add_argument("--contention-steps", type=int, default=150, help="steps per contention run")
    parser.add_argument("--repeats", type=int, default=3, help="contention rounds (median per cell)")
    parser.add_argument("--only", choices=["input", "contention"], help="one table")
    args = parser.parse_args()
    if args.only != "contention":
        input_table(args)
    if args.only != "input":
        contention_table(image_folder(), args.batch_size, args.contention_steps, args.repeats)


if __name__ == "__main__":
    main()
