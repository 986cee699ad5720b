"""The preprocessed arrays as training and evaluation batches.

Splits are memory-mapped uint8 N×C×H×W arrays; a background thread gathers the next batches
while the current step runs, and normalisation happens on the device, so the input path is one
gather and one copy per batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.common.errors import UserError


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped uint8 images N×C×H×W and int64 labels of one split."""
    data_dir = Path(data_dir)
    try:
        images = np.load(data_dir / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(data_dir / f"{split}_labels.npy")
    except FileNotFoundError as err:
        raise UserError(f"{err.filename}: not found; run the preprocess stage first (dvc repro preprocess)") from None
    if len(images) != len(labels):
        raise UserError(f"{data_dir}: {split} has {len(images)} images but {len(labels)} labels; "
                        "preprocess again")
    return images, labels


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, order: np.ndarray | None = None,
    pin: bool = False, prefetch: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield uint8 image and label batches (in ``order``), gathered by a background thread.

    The gather from the memory map (numpy fancy indexing releases the GIL) overlaps with the
    step. An error in the thread is raised here with its original traceback; leaving the loop
    early (``break``, an exception, Ctrl-C) stops the thread.
    """
    order = np.arange(len(labels)) if order is None else order
    chunks = [np.sort(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():  # a bounded wait, so a consumer that left never strands us
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                x = torch.from_numpy(np.ascontiguousarray(images[chunk]))
                y = torch.from_numpy(np.ascontiguousarray(labels[chunk]))
                if not put((x.pin_memory(), y.pin_memory()) if pin else (x, y)):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(_Failed(err))

    thread = threading.Thread(target=produce, name="batch-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def to_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 N×C×H×W (host) → normalised float on the device."""
    x = x.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
