"""Train stage: LeNet-5 or VGG16 on the preprocessed arrays, tracked in MLflow, resumable.

    python -m pipeline.train --data artifacts/preprocessed --out artifacts/train \\
        --checkpoint artifacts/checkpoint/last.pt
    torchrun --nproc_per_node=2 -m pipeline.train ...     # data-parallel (gloo on CPU, nccl on CUDA)

The uint8 arrays are memory-mapped and normalised on the device, so the input path is one
gather and one copy per batch. A checkpoint is written atomically after every epoch; a run
killed mid-way resumes from it and ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import build_model, load_init_weights
from pipeline import tracking
from pipeline.config import Params, TrainParams, load_params

log = logging.getLogger(__name__)
CODE_FILES = ("pipeline/train.py", "models/registry.py", "models/lenet5.py", "models/vgg16.py")


# --------------------------------------------------------------------------- data
def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped uint8 images N×C×H×W and int64 labels of one split."""
    images = np.load(data_dir / f"{split}_images.npy", mmap_mode="r")
    labels = np.load(data_dir / f"{split}_labels.npy")
    return images, labels


def batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, order: np.ndarray | None = None,
    pin: bool = False, prefetch: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield uint8 image and label batches, gathered by a background thread.

    The gather from the memory map (numpy fancy indexing releases the GIL) overlaps with the
    training step, which is what keeps data waiting out of the step time.
    """
    order = np.arange(len(labels)) if order is None else order
    chunks = [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    ready: queue.Queue = queue.Queue(maxsize=prefetch)

    def produce() -> None:
        for chunk in chunks:
            x = torch.from_numpy(np.ascontiguousarray(images[chunk]))
            y = torch.from_numpy(labels[chunk])
            ready.put((x.pin_memory(), y.pin_memory()) if pin else (x, y))
        ready.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ready.get()) is not None:
        yield item


def to_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
             channels_last: bool) -> torch.Tensor:
    """uint8 N×C×H×W (host) → normalised float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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


# --------------------------------------------------------------------------- optimisation
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


# --------------------------------------------------------------------------- loops
@dataclasses.dataclass
class Context:
    """What the loops need besides the model: device, normalisation, precision."""
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    amp: bool = False
    channels_last: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def train_one_epoch(model: nn.Module, images: np.ndarray, labels: np.ndarray, order: np.ndarray,
                    optimizer: torch.optim.Optimizer, scheduler, ctx: Context, p: TrainParams,
                    generator: torch.Generator, progress: bool = True) -> dict[str, float]:
    """One pass over ``order``; returns loss, accuracy, images/s, data-wait share, seconds."""
    from tqdm import tqdm

    model.train()
    loss_sum = correct = seen = 0.0
    wait = 0.0
    start = tick = time.perf_counter()
    steps = math.ceil(len(order) / max(p.batch_size, 1))
    loader = batches(images, labels, p.batch_size, order, pin=ctx.device.type == "cuda")
    bar = tqdm(loader, total=steps, desc="train", unit="batch", leave=False, disable=not progress or None)
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
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "images_per_s": seen / seconds, "data_wait": wait / seconds, "epoch_seconds": seconds}


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, ctx: Context,
             batch_size: int = 256) -> dict[str, float]:
    """Loss, top-1 and top-k (k = min(5, classes)) accuracy on a split."""
    model.eval()
    loss_sum = top1 = top5 = 0.0
    for x, y in batches(images, labels, batch_size, pin=ctx.device.type == "cuda"):
        x = to_input(x, ctx.mean, ctx.std, ctx.device, ctx.channels_last)
        y = y.to(ctx.device)
        with ctx.autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (ranked[:, 0] == y).sum().item()
        top5 += (ranked == y[:, None]).any(1).sum().item()
    n = max(len(labels), 1)
    return {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n}


# --------------------------------------------------------------------------- setup
def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {setting!r} but CUDA is not available (use auto or cpu)")
    return torch.device(setting)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run_fingerprint(params: Params, manifest_text: str) -> str:
    """Identifies what a checkpoint was trained on: train params, data and training code."""
    root = Path(__file__).resolve().parent.parent
    code = "".join((root / f).read_text() for f in CODE_FILES if (root / f).exists())
    train = json.dumps(dataclasses.asdict(params.train), sort_keys=True)
    return tracking.fingerprint(train, str(params.base.seed), manifest_text, code)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], label="val top-1")
    ax_acc.plot(epochs, [h["val_top5"] for h in history], label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def train(params: Params, data_dir: Path, out_dir: Path, checkpoint_path: Path,
          metrics_path: Path, plots_path: Path, progress: bool = True) -> dict:
    """The whole stage. Returns the final metrics written to ``metrics_path``."""
    p = params.train
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(p.device)
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_process = rank == 0
    if device.type == "cpu":
        threads = p.threads or os.cpu_count() or 1
        torch.set_num_threads(max(1, threads // world))
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    manifest_text = (data_dir / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    classes, channels, size = manifest["classes"], manifest["channels"], manifest["size"]
    train_x, train_y = load_split(data_dir, "train")
    val_x, val_y = load_split(data_dir, "val")
    ctx = Context(device=device,
                  mean=torch.tensor(manifest["mean"], device=device).view(1, -1, 1, 1),
                  std=torch.tensor(manifest["std"], device=device).view(1, -1, 1, 1),
                  # channels_last is also ~4x faster for these convs on the CPU (oneDNN).
                  amp=device.type == "cuda", channels_last=True)

    seed_everything(params.base.seed)
    model = build_model(p.model, num_classes=len(classes), in_channels=channels, image_size=size)
    if p.init_weights:
        load_init_weights(model, p.init_weights, channels)
    model.to(device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, p)
    steps_per_epoch = math.ceil(len(train_y) / world / p.batch_size)
    scheduler = build_scheduler(optimizer, p, steps_per_epoch)

    fingerprint = run_fingerprint(params, manifest_text)
    history: list[dict] = []
    best = {"val_top1": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    start_epoch, run_id = 1, None
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            history, best, best_state = state["history"], state["best"], state["best_state"]
            start_epoch, run_id = state["epoch"] + 1, state["mlflow_run_id"] or None
            log.info("resuming from %s at epoch %d", checkpoint_path, start_epoch)
        else:
            log.info("ignoring %s: it was trained with other params, data or code", checkpoint_path)

    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if p.compile and device.type == "cuda":
        net = torch.compile(net)

    tracked = tracking.run(params.mlflow.experiment, run_id=run_id) if main_process else _nullrun()
    with tracked as active:
        run_id = active.info.run_id if main_process else ""
        if main_process and start_epoch == 1:
            _log_run_start(params, device, len(train_y))
        for epoch in range(start_epoch, p.epochs + 1):
            # Per-epoch seeds make each epoch's shuffle, augmentation and dropout a function of
            # (seed, epoch) alone: that is what makes resume bit-identical.
            torch.manual_seed(params.base.seed * 100_003 + epoch)
            generator = torch.Generator().manual_seed(params.base.seed * 100_003 + epoch)
            order = torch.randperm(len(train_y), generator=generator).numpy()[rank::world]
            stats = train_one_epoch(net, train_x, train_y, order, optimizer, scheduler, ctx, p,
                                    generator, progress=progress and main_process)
            if main_process:
                val = evaluate(model, val_x, val_y, ctx)
                row = {"epoch": epoch, **stats, "val_loss": val["loss"], "val_top1": val["top1"],
                       "val_top5": val["top5"], "lr": optimizer.param_groups[0]["lr"]}
                history.append(row)
                if val["top1"] > best["val_top1"]:
                    best = {"epoch": epoch, "val_top1": val["top1"], "val_top5": val["top5"],
                            "val_loss": val["loss"]}
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_top1 %.4f  val_top5 %.4f  "
                         "%.0f img/s  data wait %.1f%%  %.1fs", epoch, p.epochs, stats["train_loss"],
                         stats["train_accuracy"], val["loss"], val["top1"], val["top5"],
                         stats["images_per_s"], 100 * stats["data_wait"], stats["epoch_seconds"])
                tracking.with_retry(lambda row=row: _log_epoch(row))
                save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                             "epoch": epoch, "history": history, "best": best, "best_state": best_state,
                             "mlflow_run_id": run_id, "fingerprint": fingerprint}, checkpoint_path)
            if distributed:
                dist.barrier()
        result = {}
        if main_process:
            result = _finish(params, manifest, history, best, best_state, run_id, device,
                             out_dir, metrics_path, plots_path)
    if distributed:
        dist.destroy_process_group()
    return result


class _nullrun:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _log_run_start(params: Params, device: torch.device, n_train: int) -> None:
    import mlflow

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tracking.with_retry(lambda: mlflow.log_params(params.flat()))
    tracking.with_retry(lambda: mlflow.set_tags({
        **tracking.source_tags(), "model": params.train.model, "device": device_name,
        "torch_version": torch.__version__, "train_images": str(n_train),
    }))


def _log_epoch(row: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def _finish(params: Params, manifest: dict, history: list[dict], best: dict, best_state: dict,
            run_id: str, device: torch.device, out_dir: Path, metrics_path: Path, plots_path: Path) -> dict:
    import mlflow

    last = history[-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_atomic({
        "model": best_state,
        "config": {"model": params.train.model, "classes": manifest["classes"], "channels": manifest["channels"],
                   "image_size": manifest["size"], "mean": manifest["mean"], "std": manifest["std"]},
        "best": best, "params": params.flat(),
    }, out_dir / "model.pt")
    timing = {
        "train_seconds": round(sum(h["epoch_seconds"] for h in history), 2),
        "mean_images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1),
        "mean_data_wait": round(float(np.mean([h["data_wait"] for h in history])), 4),
    }
    # metrics/train.json is committed with the code: only deterministic numbers go there, so the
    # same params and data reproduce it byte for byte. Timing lives in MLflow.
    metrics = {
        "final": {k: round(last[k], 6) for k in ("train_loss", "train_accuracy", "val_loss", "val_top1", "val_top5")},
        "best": {k: round(v, 6) if isinstance(v, float) else v for k, v in best.items()},
        "epochs": len(history),
    }
    write_json(metrics, metrics_path)
    # Timing columns differ run to run; the plot file keeps the curves DVC compares.
    write_json([{k: h[k] for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_top1", "val_top5",
                                   "lr")} for h in history], plots_path)
    curves = out_dir / "training_curves.png"
    plot_curves(history, curves)
    tracking.with_retry(lambda: mlflow.log_metrics({"best_val_top1": best["val_top1"], **timing}))
    tracking.with_retry(lambda: mlflow.log_artifact(str(curves)))
    (out_dir / "run_id").write_text(run_id + "\n")
    log.info("best val top-1 %.4f at epoch %d; MLflow run %s", best["val_top1"], best["epoch"], run_id)
    return {**metrics, **timing}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the model params.yaml names.")
    parser.add_argument("--data", default="artifacts/preprocessed", type=Path, help="preprocess output")
    parser.add_argument("--out", default="artifacts/train", type=Path, help="best weights and run id")
    parser.add_argument("--checkpoint", default="artifacts/checkpoint/last.pt", type=Path,
                        help="resumable state, rewritten every epoch")
    parser.add_argument("--metrics", default="metrics/train.json", type=Path)
    parser.add_argument("--plots", default="plots/train.json", type=Path, help="per-epoch curves for dvc plots")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    try:
        train(params, args.data, args.out, args.checkpoint, args.metrics, args.plots, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; the next run resumes from {args.checkpoint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
