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
import dataclasses
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
from pipeline.common.files import write_text
from pipeline.common.metrics import BestEpoch, EpochRecord, TrainMetrics, write_rows
from pipeline.lib import provenance, tracking
from pipeline.lib.checkpoint import Checkpoint, fingerprint
from pipeline.lib.codebase import import_closure
from pipeline.lib.config import Params, TrainParams, load_params
from pipeline.lib.engine import Context, build_optimizer, build_scheduler, evaluate, resolve_device, train_one_epoch
from pipeline.lib.loader import load_split
from pipeline.lib.pacing import ThreadPacer
from pipeline.lib.trained import save_trained

log = logging.getLogger(__name__)


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
    return fingerprint(train, str(params.base.seed), manifest_text, code, tracking.tracking_uri())


def plot_curves(history: Sequence[EpochRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.train_loss for h in history], label="train")
    ax_loss.plot(epochs, [h.val_loss for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h.train_accuracy for h in history], label="train")
    ax_acc.plot(epochs, [h.val_top1 for h in history], label="val top-1")
    ax_acc.plot(epochs, [h.val_top5 for h in history], label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the steps
@dataclasses.dataclass(frozen=True)
class Processes:
    """This process among the training processes: one, unless torchrun started several (DDP)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_processes(device_setting: str) -> Processes:
    """The device, and under torchrun the process group (gloo on CPU, nccl on CUDA)."""
    device = resolve_device(device_setting)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(device, dist.get_rank(), dist.get_world_size())


def configure_compute(p: TrainParams, procs: Processes) -> ThreadPacer | None:
    """CPU: the thread pacer (ranks on this machine share its usable CPUs, not all its cores).
    CUDA: cuDNN autotuning and TF32."""
    if procs.device.type != "cpu":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return None
    usable = usable_cpus()
    pacer = ThreadPacer(p.threads, usable, int(os.environ.get("LOCAL_WORLD_SIZE", procs.world)))
    if procs.main and pacer.adaptive:
        log.info("CPU threads: adaptive, the fastest of %s each epoch (%d usable CPUs; not bit-reproducible)",
                 pacer.candidates, usable)
    elif procs.main:
        log.info("CPU threads: %d per process (%d usable CPUs, train.threads: %s)", pacer.threads, usable, p.threads)
    return pacer


@dataclasses.dataclass
class Training:
    """What the epochs change: the model, its optimiser and schedule, and the record so far."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list[EpochRecord] = dataclasses.field(default_factory=list)
    best: BestEpoch | None = None
    best_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    run_id: str = ""

    def resume(self, checkpoint: Checkpoint) -> int:
        """Continue from ``checkpoint``; returns the first epoch still to run."""
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        torch.set_rng_state(checkpoint.rng_cpu)
        self.history, self.best, self.best_state = list(checkpoint.history), checkpoint.best, checkpoint.best_state
        self.run_id = checkpoint.mlflow_run_id
        return checkpoint.epoch + 1

    def record(self, row: EpochRecord) -> None:
        """Append the epoch; keep its weights when its val top-1 is the best so far."""
        self.history.append(row)
        if self.best is None or row.val_top1 > self.best.val_top1:
            self.best = BestEpoch.of(row)
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def checkpoint(self, epoch: int, fingerprint: str) -> Checkpoint:
        assert self.best is not None, "a checkpoint follows a recorded epoch"
        return Checkpoint(fingerprint=fingerprint, epoch=epoch, mlflow_run_id=self.run_id,
                          model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict(), rng_cpu=torch.get_rng_state(),
                          history=self.history, best=self.best, best_state=self.best_state)


def build_training(p: TrainParams, manifest: Manifest, procs: Processes, ctx: Context, train_images: int) -> Training:
    """The model (seeded, optionally from initial weights) on the device, its optimiser and schedule."""
    try:
        model = build_model(p.model, num_classes=len(manifest.classes), in_channels=manifest.channels,
                            image_size=manifest.image_size)
    except ValueError as err:
        raise UserError(f"train.model: {err}") from None
    if p.init_weights:
        load_init_weights(model, p.init_weights, manifest.channels)
    model.to(procs.device)
    if ctx.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, p)
    steps_per_epoch = math.ceil(math.ceil(train_images / procs.world) / p.batch_size)  # rank_order's length
    return Training(model, optimizer, build_scheduler(optimizer, p, steps_per_epoch))


def wrap_for_steps(model: nn.Module, p: TrainParams, procs: Processes) -> nn.Module:
    """What the training steps call: DDP across processes, compiled on CUDA when asked."""
    net = model
    if procs.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[procs.device.index]
                                                  if procs.device.type == "cuda" else None)
    if p.compile and procs.device.type == "cuda":
        net = torch.compile(net)
    return net


def log_epoch(row: EpochRecord, epochs: int) -> None:
    log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_top1 %.4f  val_top5 %.4f  "
             "%.0f img/s  data wait %.1f%%  %.1fs", row.epoch, epochs, row.train_loss, row.train_accuracy,
             row.val_loss, row.val_top1, row.val_top5, row.images_per_s, 100 * row.data_wait, row.epoch_seconds)
    tracking.with_retry(lambda: _log_epoch_metrics(row))


# --------------------------------------------------------------------------- main
def train(params: Params, data_dir: Path, out_dir: Path, checkpoint_path: Path,
          metrics_path: Path, plots_path: Path, progress: bool = True) -> TrainMetrics | None:
    """The whole stage. Returns the metrics written to ``metrics_path`` (None in a DDP process
    other than the first: that one writes everything)."""
    p, seed = params.train, params.base.seed
    procs = join_processes(p.device)
    pacer = configure_compute(p, procs)
    manifest = Manifest.read(data_dir)
    train_x, train_y = load_split(data_dir, "train")
    val_x, val_y = load_split(data_dir, "val")
    # channels_last is also ~4x faster for these convs on the CPU (oneDNN).
    ctx = Context.for_device(procs.device, manifest.mean, manifest.std, amp=procs.device.type == "cuda",
                             channels_last=True)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    training = build_training(p, manifest, procs, ctx, len(train_y))
    trained_on = run_fingerprint(params, manifest.to_json())
    checkpoint = Checkpoint.load(checkpoint_path, trained_on, procs.device)
    start_epoch = training.resume(checkpoint) if checkpoint else 1
    if checkpoint:
        log.info("resuming from %s at epoch %d", checkpoint_path, start_epoch)
    net = wrap_for_steps(training.model, p, procs)

    tracked = tracking.run(params.mlflow.experiment, run_id=training.run_id or None) if procs.main else _nullrun()
    result = None
    with _ends_with_peers(procs, checkpoint_path), tracked as active:
        training.run_id = active.info.run_id if procs.main else ""
        if procs.main and start_epoch == 1:
            _log_run_start(params, procs.device, len(train_y))
        for epoch in range(start_epoch, p.epochs + 1):
            # Per-epoch seeds make each epoch's shuffle, augmentation and dropout a function of
            # (seed, epoch) alone: that is what makes resume bit-identical.
            torch.manual_seed(seed * 100_003 + epoch)
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = rank_order(len(train_y), generator, procs.rank, procs.world)
            if pacer is not None:
                pacer.start_epoch(epoch)
            stats = train_one_epoch(net, train_x, train_y, order, training.optimizer, training.scheduler, ctx, p,
                                    generator, progress=progress and procs.main,
                                    on_step=pacer.step_done if pacer is not None else None)
            if procs.main:
                val = evaluate(training.model, val_x, val_y, ctx)
                # MLflow shows what adaptive chose, epoch by epoch
                training.record(EpochRecord.of(epoch, stats, val, training.optimizer.param_groups[0]["lr"],
                                               pacer.threads if pacer is not None else None))
                log_epoch(training.history[-1], p.epochs)
                training.checkpoint(epoch, trained_on).save(checkpoint_path)
            if procs.distributed:
                dist.barrier()
        if procs.main:
            result = _finish(params, manifest, training, procs.device, out_dir, metrics_path, plots_path)
    if procs.distributed:
        dist.destroy_process_group()
    return result


@contextlib.contextmanager
def _ends_with_peers(procs: Processes, checkpoint_path: Path) -> Iterator[None]:
    """A collective that failed because another rank is gone becomes one clear line (RankFailed)."""
    try:
        yield
    except Exception as err:
        if not (procs.distributed and _lost_peer(err)):
            raise
        reason = " ".join(str(err).split())[:300]
        raise RankFailed(f"rank {procs.rank} of {procs.world}: another training process failed or stopped "
                         f"answering ({reason}); its own output says why. The next run resumes from "
                         f"{checkpoint_path}") from err


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
        **provenance.current().tags(), "model": params.train.model, "device": device_name,
        "torch_version": torch.__version__, "train_images": str(n_train),
    }))


def _log_epoch_metrics(row: EpochRecord) -> None:
    import mlflow

    mlflow.log_metrics(row.mlflow_metrics(), step=row.epoch)


def _finish(params: Params, manifest: Manifest, training: Training, device: torch.device, out_dir: Path,
            metrics_path: Path, plots_path: Path) -> TrainMetrics:
    """The stage's outputs: the best weights with their card, metrics, curves; the run's summary."""
    import mlflow

    history, best = training.history, training.best
    assert best is not None, "at least one epoch ran"
    out_dir.mkdir(parents=True, exist_ok=True)
    source = provenance.current()
    card = ModelCard(architecture=params.train.model, classes=manifest.classes, image_size=manifest.image_size,
                     channels=manifest.channels, mean=manifest.mean, std=manifest.std,
                     git_commit=source.git_commit, data_md5=source.data_md5, mlflow_run_id=training.run_id)
    save_trained(out_dir / "model.pt", training.best_state, card, best=best, params=params.flat())
    # Committed with the code: deterministic numbers only (timing and full precision live in MLflow).
    metrics = TrainMetrics.of(history, best)
    metrics.write(metrics_path)
    write_rows(plots_path, [row.curve_point() for row in history])
    curves = out_dir / "training_curves.png"
    plot_curves(history, curves)
    timing = {"train_seconds": round(sum(h.epoch_seconds for h in history), 2),
              "mean_images_per_s": round(float(np.mean([h.images_per_s for h in history])), 1),
              "mean_data_wait": round(float(np.mean([h.data_wait for h in history])), 4)}
    tracking.with_retry(lambda: mlflow.log_metrics({"best_val_top1": best.val_top1, **timing}))
    tracking.with_retry(lambda: mlflow.log_artifact(str(curves)))
    write_text(out_dir / "run_id", training.run_id + "\n")
    log.info("best val top-1 %.4f at epoch %d; MLflow run %s", best.val_top1, best.epoch, training.run_id)
    return metrics


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
