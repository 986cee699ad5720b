"""Train stage: LeNet-5 or VGG16 on the preprocessed arrays, tracked in MLflow, resumable.

    python -m pipeline.train --data artifacts/preprocessed --out artifacts/train \\
        --checkpoint artifacts/checkpoint/last.pt
    torchrun --nproc_per_node=2 -m pipeline.train ...     # data-parallel (gloo on CPU, nccl on CUDA)

The uint8 arrays are memory-mapped and normalised on the device, so the input path is one
gather and one copy per batch. A checkpoint is written atomically after every epoch; a run
killed mid-way resumes from it and ends with the same metrics as an uninterrupted one. The
checkpoint is local state (git- and dvc-ignored), not a stage output: a teammate who pulls the
outputs from the DVC remote has everything ``dvc status`` checks without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models import build_model, load_init_weights
from pipeline.common.contract import Manifest, ModelCard
from pipeline.common.cpus import usable_cpus
from pipeline.common.errors import UserError, run_command, setup_logging
from pipeline.common.files import write_atomic, write_json, write_text
from pipeline.lib import tracking
from pipeline.lib.codebase import import_closure
from pipeline.lib.config import Params, load_params
from pipeline.lib.engine import (
    Context,
    build_optimizer,
    build_scheduler,
    evaluate,
    resolve_device,
    round_metric,
    train_one_epoch,
)
from pipeline.lib.loader import load_split
from pipeline.lib.pacing import ThreadPacer
from pipeline.lib.trained import save_trained

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves half a file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


class RankFailed(UserError):
    """Another DDP process died or stopped answering: this one ends with one line, not a hang.

    The cause (a traceback, an out-of-memory kill) is in that process's own output.
    """


def rank_order(n: int, generator: torch.Generator, rank: int, world: int) -> np.ndarray:
    """This rank's share of the epoch's shuffle of ``n`` images; every rank gets ceil(n / world).

    Padded like ``DistributedSampler``: the shuffle is extended with its own first images until
    it divides evenly. Ranks with different lengths run different numbers of batches, and the
    one with an extra batch waits forever in an all-reduce the others never join. Padding rather
    than dropping the remainder: every image is still trained on each epoch (a drop leaves up to
    world - 1 images out, possibly a rare class's), at the cost of repeating at most world - 1
    images per epoch. With one process nothing is added: the order is the plain shuffle.
    """
    order = torch.randperm(n, generator=generator).numpy()
    padded = np.resize(order, math.ceil(n / world) * world)  # np.resize repeats from the start
    return padded[rank::world]


def _lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo/nccl socket closed, timeout)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                  "Timed out", "timed out", "NCCL communicator was aborted"))


def run_fingerprint(params: Params, manifest_text: str) -> str:
    """Identifies what a checkpoint was trained on: train params, data, training code, and the
    MLflow store (URI without credentials) that holds the run it continues."""
    root = Path(__file__).resolve().parent.parent
    # By name, not __name__: that is "__main__" under `python -m`.
    code = "".join((root / f).read_text() for f in import_closure("pipeline.train"))
    train = json.dumps(params.train.model_dump(), sort_keys=True)
    return tracking.fingerprint(train, str(params.base.seed), manifest_text, code, tracking.tracking_uri())


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
    pacer = None
    if device.type == "cpu":
        # Ranks on this machine share its usable CPUs (affinity, cgroup quota), not all its cores.
        usable = usable_cpus()
        pacer = ThreadPacer(p.threads, usable, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if main_process and pacer.adaptive:
            log.info("CPU threads: adaptive, the fastest of %s each epoch (%d usable CPUs; not bit-reproducible)",
                     pacer.candidates, usable)
        elif main_process:
            log.info("CPU threads: %d per process (%d usable CPUs, train.threads: %s)", pacer.threads, usable,
                     p.threads)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    manifest = Manifest.read(data_dir)
    manifest_text = manifest.to_json()
    classes, channels, size = manifest.classes, manifest.channels, manifest.image_size
    train_x, train_y = load_split(data_dir, "train")
    val_x, val_y = load_split(data_dir, "val")
    # channels_last is also ~4x faster for these convs on the CPU (oneDNN).
    ctx = Context.for_device(device, manifest.mean, manifest.std, amp=device.type == "cuda", channels_last=True)

    seed_everything(params.base.seed)
    try:
        model = build_model(p.model, num_classes=len(classes), in_channels=channels, image_size=size)
    except ValueError as err:
        raise UserError(f"train.model: {err}") from None
    if p.init_weights:
        load_init_weights(model, p.init_weights, channels)
    model.to(device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, p)
    steps_per_epoch = math.ceil(math.ceil(len(train_y) / world) / p.batch_size)  # rank_order's length
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
            log.info("ignoring %s: it was trained with other params, data or code, or for another MLflow store",
                     checkpoint_path)

    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if p.compile and device.type == "cuda":
        net = torch.compile(net)

    tracked = tracking.run(params.mlflow.experiment, run_id=run_id) if main_process else _nullrun()
    with _ends_with_peers(distributed, rank, world, checkpoint_path), tracked as active:
        run_id = active.info.run_id if main_process else ""
        if main_process and start_epoch == 1:
            _log_run_start(params, device, len(train_y))
        for epoch in range(start_epoch, p.epochs + 1):
            # Per-epoch seeds make each epoch's shuffle, augmentation and dropout a function of
            # (seed, epoch) alone: that is what makes resume bit-identical.
            torch.manual_seed(params.base.seed * 100_003 + epoch)
            generator = torch.Generator().manual_seed(params.base.seed * 100_003 + epoch)
            order = rank_order(len(train_y), generator, rank, world)
            if pacer is not None:
                pacer.start_epoch(epoch)
            stats = train_one_epoch(net, train_x, train_y, order, optimizer, scheduler, ctx, p, generator,
                                    progress=progress and main_process,
                                    on_step=pacer.step_done if pacer is not None else None)
            if main_process:
                val = evaluate(model, val_x, val_y, ctx)
                row = {"epoch": epoch, **stats, "val_loss": val["loss"], "val_top1": val["top1"],
                       "val_top5": val["top5"], "lr": optimizer.param_groups[0]["lr"]}
                if pacer is not None:  # MLflow shows what adaptive chose, epoch by epoch
                    row["cpu_threads"] = pacer.threads
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
                save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
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


@contextlib.contextmanager
def _ends_with_peers(distributed: bool, rank: int, world: int, checkpoint_path: Path) -> Iterator[None]:
    """A collective that failed because another rank is gone becomes one clear line (RankFailed)."""
    try:
        yield
    except Exception as err:
        if not (distributed and _lost_peer(err)):
            raise
        reason = " ".join(str(err).split())[:300]
        raise RankFailed(f"rank {rank} of {world}: another training process failed or stopped answering "
                         f"({reason}); its own output says why. The next run resumes from {checkpoint_path}") from err


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


def _finish(params: Params, manifest: Manifest, history: list[dict], best: dict, best_state: dict,
            run_id: str, device: torch.device, out_dir: Path, metrics_path: Path, plots_path: Path) -> dict:
    import mlflow

    last = history[-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    source = tracking.source_tags()
    card = ModelCard(architecture=params.train.model, classes=manifest.classes, image_size=manifest.image_size,
                     channels=manifest.channels, mean=manifest.mean, std=manifest.std,
                     git_commit=source["git_commit"], data_md5=source["data_md5"], mlflow_run_id=run_id)
    save_trained(out_dir / "model.pt", best_state, card, best=best, params=params.flat())
    timing = {
        "train_seconds": round(sum(h["epoch_seconds"] for h in history), 2),
        "mean_images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1),
        "mean_data_wait": round(float(np.mean([h["data_wait"] for h in history])), 4),
    }
    # metrics/train.json is committed with the code: only deterministic numbers go there, at
    # round_metric's 4 decimals, so the same params and data reproduce it byte for byte on
    # another CPU too. Timing and full precision live in MLflow.
    metrics = {
        "final": {k: round_metric(last[k]) for k in ("train_loss", "train_accuracy", "val_loss", "val_top1",
                                                      "val_top5")},
        "best": {k: round_metric(v) if isinstance(v, float) else v for k, v in best.items()},
        "epochs": len(history),
    }
    write_json(metrics_path, metrics)
    # Timing columns differ run to run; the plot file keeps the curves DVC compares. The learning
    # rate spans decades: 4 significant digits rather than 4 decimals.
    curve_keys = ("train_loss", "train_accuracy", "val_loss", "val_top1", "val_top5")
    write_json(plots_path, [{"epoch": h["epoch"], **{k: round_metric(h[k]) for k in curve_keys},
                             "lr": float(f"{h['lr']:.4g}")} for h in history])
    curves = out_dir / "training_curves.png"
    plot_curves(history, curves)
    tracking.with_retry(lambda: mlflow.log_metrics({"best_val_top1": best["val_top1"], **timing}))
    tracking.with_retry(lambda: mlflow.log_artifact(str(curves)))
    write_text(out_dir / "run_id", run_id + "\n")
    log.info("best val top-1 %.4f at epoch %d; MLflow run %s", best["val_top1"], best["epoch"], run_id)
    return {**metrics, **timing}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the model params.yaml names.")
    parser.add_argument("--data", default="artifacts/preprocessed", type=Path, help="preprocess output")
    parser.add_argument("--out", default="artifacts/train", type=Path, help="best weights and run id")
    parser.add_argument("--checkpoint", default="artifacts/checkpoint/last.pt", type=Path,
                        help="resumable state, rewritten every epoch; read when its fingerprint matches "
                             "(not a DVC output: a clone that pulls the outputs has none and needs none)")
    parser.add_argument("--metrics", default="metrics/train.json", type=Path)
    parser.add_argument("--plots", default="plots/train.json", type=Path, help="per-epoch curves for dvc plots")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    return run_command(
        lambda: train(load_params(args.params), args.data, args.out, args.checkpoint, args.metrics, args.plots,
                      progress=not args.no_progress),
        interrupted=f"interrupted; the next run resumes from {args.checkpoint}")


if __name__ == "__main__":
    sys.exit(main())
