"""The training and evaluation loops and what they need: device, precision, optimiser, schedule.

Shared by the train and evaluate stages and the benchmarks. Every loop gets its dependencies
as arguments and returns numbers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import closing

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.errors import UserError
from pipeline.common.metrics import EpochStats, SplitScores
from pipeline.lib.config import TrainParams
from pipeline.lib.loader import batches, to_input
from pipeline.lib.progress import progress as progress_bar


@dataclasses.dataclass
class Context:
    """What the loops need besides the model: device, normalisation, precision."""
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    amp: bool = False
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device, mean: Sequence[float], std: Sequence[float],
                   amp: bool = False, channels_last: bool = False) -> Context:
        return cls(device, torch.tensor(mean, device=device).view(1, -1, 1, 1),
                   torch.tensor(std, device=device).view(1, -1, 1, 1), amp, channels_last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is {setting!r} but CUDA is not available (use auto or cpu)")
    return torch.device(setting)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, on the device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    flip = torch.rand(n, generator=generator).lt(0.5).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flips = [i for i in range(n) if flip[i]]
    if flips:
        out[flips] = out[flips].flip(-1)
    return out


def build_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on biases and norm layers, as in torchvision's reference.
    decay = [t for t in model.parameters() if t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0)
    return torch.optim.AdamW(groups, lr=p.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int):
    total = p.epochs * steps_per_epoch
    warmup = min(int(p.warmup_epochs * steps_per_epoch), total - 1)
    if p.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=total,
                                                   pct_start=max(warmup, 1) / total)

    def factor(step: int) -> float:  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, images: np.ndarray, labels: np.ndarray, order: np.ndarray,
                    optimizer: torch.optim.Optimizer, scheduler, ctx: Context, p: TrainParams,
                    generator: torch.Generator, progress: bool = True,
                    on_step: Callable[[float, int], None] | None = None) -> EpochStats:
    """One pass over ``order``; returns loss, accuracy, images/s, data-wait share, seconds.

    ``on_step(seconds, images)`` sees every step (the thread pacer).
    """
    model.train()
    loss_sum = correct = seen = 0.0
    wait = 0.0
    start = tick = time.perf_counter()
    steps = math.ceil(len(order) / max(p.batch_size, 1))
    # closing(): an exception raised here keeps this frame (and a plain generator in a local)
    # alive in its traceback; the loader thread must stop now, not when that is collected.
    with closing(batches(images, labels, p.batch_size, order, pin=ctx.device.type == "cuda")) as loader:
        bar = progress_bar(loader, total=steps, desc="train", unit="batch", enabled=progress, leave=False)
        for x, y in bar:
            wait += time.perf_counter() - tick
            x = to_input(x, ctx.mean, ctx.std, ctx.device, ctx.channels_last)
            y = y.to(ctx.device, non_blocking=True)
            if p.augment:
                x = augment(x, generator, pad=max(1, x.shape[-1] // 8))
            with ctx.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=p.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # .item() syncs; once per step is fine at these sizes and keeps the meter exact.
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            if on_step is not None:
                on_step(time.perf_counter() - tick, len(y))
            tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return EpochStats(train_loss=loss_sum / seen, train_accuracy=correct / seen, images_per_s=seen / seconds,
                      data_wait=wait / seconds, epoch_seconds=seconds)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, ctx: Context,
             batch_size: int = 256) -> SplitScores:
    """Loss, top-1 and top-k (k = min(5, classes)) accuracy on a split."""
    model.eval()
    loss_sum = top1 = top5 = 0.0
    with closing(batches(images, labels, batch_size, pin=ctx.device.type == "cuda")) as loader:
        for x, y in loader:
            x = to_input(x, ctx.mean, ctx.std, ctx.device, ctx.channels_last)
            y = y.to(ctx.device)
            with ctx.autocast():
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (ranked[:, 0] == y).sum().item()
            top5 += (ranked == y[:, None]).any(1).sum().item()
    n = max(len(labels), 1)
    return SplitScores(loss=loss_sum / n, top1=top1 / n, top5=top5 / n)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                   batch_size: int = 256) -> np.ndarray:
    """Float32 logits N×K on the CPU for uint8 images, normalised with the training mean/std."""
    model.eval()
    ctx = Context.for_device(torch.device("cpu"), mean, std)
    with closing(batches(images, np.zeros(len(images), dtype=np.int64), batch_size)) as loader:
        out = [model(to_input(x, ctx.mean, ctx.std, ctx.device)).float().numpy() for x, _ in loader]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
