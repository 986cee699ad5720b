"""GPU check: VGG16 at 224 through the real training code path, fp32 and bf16.

    python bench/gpu_check.py [--steps 300] [--batch-size 128] [--compile]

Random uint8 data stands in for images (the input path is the same memory-to-device path
``pipeline.train`` uses). Prints images/s, achieved TFLOP/s (VGG16 ≈ 15.5 GMAC per 224×224
forward; a training step ≈ 3 forwards), data-wait share and peak memory. Needs CUDA;
``--device cpu --size 32 --steps 2`` is a smoke run of the same code (the tests use it so the
script cannot rot between GPU sessions; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from models import build_model
from pipeline.lib.config import TrainParams
from pipeline.lib.engine import Context, build_optimizer, build_scheduler, train_one_epoch

GMAC_PER_IMAGE = 15.5


def measure(amp: bool, steps: int, batch_size: int, compile_model: bool, device: torch.device,
            size: int = 224) -> dict[str, float]:
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    p = TrainParams(model="vgg16", epochs=1, batch_size=batch_size, lr=0.01)
    n = steps * batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, 1000, n).astype(np.int64)
    model = build_model("vgg16", 1000, 3, size).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, p)
    scheduler = build_scheduler(optimizer, p, steps)
    net = torch.compile(model) if compile_model else model
    mean = torch.full((1, 3, 1, 1), 0.45, device=device)
    std = torch.full((1, 3, 1, 1), 0.25, device=device)
    ctx = Context(device, mean, std, amp=amp, channels_last=True)
    generator = torch.Generator().manual_seed(0)
    warm = np.arange(min(n, 10 * batch_size))
    train_one_epoch(net, images, labels, warm, optimizer, scheduler, ctx, p, generator, progress=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stats = train_one_epoch(net, images, labels, np.arange(n), optimizer, scheduler, ctx, p, generator,
                            progress=False)
    if cuda:
        torch.cuda.synchronize()
    return {"images_per_s": stats.images_per_s, "data_wait": stats.data_wait, "loss": stats.train_loss,
            "tflops": stats.images_per_s * GMAC_PER_IMAGE * 2 * 3 / 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--size", type=int, default=224, help="image side; TFLOP/s assumes 224")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU (--device cpu for a smoke run)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"{name}  torch {torch.__version__}  VGG16 at {args.size}  batch {args.batch_size}  {args.steps} steps")
    print(f"{'precision':9} | {'img/s':>7} | {'TFLOP/s':>7} | {'data wait':>9} | {'peak GiB':>8}")
    for name, amp in (("fp32", False), ("bf16", True)):
        r = measure(amp, args.steps, args.batch_size, args.compile, device, args.size)
        if not np.isfinite(r["loss"]):
            sys.exit(f"{name}: training loss is {r['loss']}")
        print(f"{name:9} | {r['images_per_s']:7.0f} | {r['tflops']:7.1f} | {r['data_wait']:9.1%} | "
              f"{r['peak_gib']:8.1f}")


if __name__ == "__main__":
    main()
