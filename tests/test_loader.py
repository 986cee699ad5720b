"""The batch loader thread: errors reach the training loop, leaving the loop ends the thread."""

from __future__ import annotations

import os
import pty
import re
import sys
import termios
import threading
import traceback
import tty
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.lib import engine
from pipeline.lib.config import TrainParams
from pipeline.lib.loader import batches


@pytest.fixture
def loader_threads():
    """Live batch-loader threads started during this test (a failed test's leftover is not ours)."""
    before = set(threading.enumerate())
    return lambda: [t for t in threading.enumerate() if t.name == "batch-loader" and t.is_alive() and t not in before]


class FailingImages:
    """A memory map stand-in whose gather fails on call ``fail_at`` (a disk error mid-epoch)."""

    def __init__(self, images: np.ndarray, fail_at: int) -> None:
        self.images, self.fail_at, self.calls = images, fail_at, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("injected: Input/output error reading train_images.npy")
        return self.images[index]


def arrays(n: int = 64, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 1, side, side), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64)


@pytest.mark.timeout(20)
def test_gather_error_on_third_batch_reaches_the_consumer_with_its_traceback(loader_threads):
    images, labels = arrays()
    received = 0
    with pytest.raises(OSError, match="injected") as caught:
        for _ in batches(FailingImages(images, fail_at=3), labels, batch_size=8):
            received += 1
    assert received == 2  # the two good batches arrive first, then the error, not a hang
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "__getitem__" and "produce" in frames  # raised where it happened
    assert not loader_threads()


@pytest.mark.timeout(20)
def test_gather_error_reaches_the_training_loop(loader_threads):
    images, labels = arrays()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ctx = engine.Context.for_device(torch.device("cpu"), [0.5], [0.25])
    with pytest.raises(OSError, match="injected"):
        engine.train_one_epoch(model, FailingImages(images, fail_at=3), labels, np.arange(64), optimizer, scheduler,
                               ctx, TrainParams(batch_size=8), torch.Generator(), progress=False)
    assert not loader_threads()


@pytest.mark.timeout(20)
def test_early_break_leaves_no_loader_thread(loader_threads):
    images, labels = arrays(n=256)
    for _ in batches(images, labels, batch_size=4, prefetch=1):  # the thread is blocked on a full queue
        assert loader_threads()
        break
    assert not loader_threads()


class InterruptedModel(torch.nn.Module):
    """Raises KeyboardInterrupt (Ctrl-C) on its second forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.calls = torch.nn.Linear(64, 3), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.linear(x.flatten(1))


def terminal_stderr(monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """Make ``sys.stderr`` a real terminal (a pty in raw mode, so what is read is what was written);
    returns a function giving everything drawn on it so far."""
    master, replica = pty.openpty()
    tty.setraw(replica)
    termios.tcsetwinsize(replica, (24, 80))  # tqdm draws nothing on a 0-row terminal, a fresh pty's size
    terminal = os.fdopen(replica, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    end = "\0end of test output\0"

    def drawn() -> str:
        terminal.write(end)  # a pty passes data on asynchronously: read up to a marker, not "what is there now"
        terminal.flush()
        output = ""
        while not output.endswith(end):
            output += os.read(master, 1 << 16).decode(errors="replace")
        os.close(master)
        terminal.close()
        return output[: -len(end)]

    return drawn


@pytest.mark.timeout(20)
def test_ctrl_c_in_a_training_step_ends_the_loader_thread(monkeypatch, loader_threads):
    # On a terminal the epoch's progress is tqdm's drawn bar, which walks the loader with a plain
    # `for` and, unlike the disabled bar's `yield from`, does not close it when it is closed
    # itself: the engine has to end the loader thread on its own.
    drawn = terminal_stderr(monkeypatch)
    images, labels = arrays(n=256)
    model = InterruptedModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ctx = engine.Context.for_device(torch.device("cpu"), [0.5], [0.25])
    with pytest.raises(KeyboardInterrupt) as caught:
        engine.train_one_epoch(model, images, labels, np.arange(256), optimizer, scheduler, ctx,
                               TrainParams(batch_size=4), torch.Generator(), progress=True)
    output = drawn()
    assert "train:" in output and "\r" in output and re.search(r"batch/s|s/batch", output), output  # a bar, redrawn
    # The traceback (held here, as a caller that logs or retries would) keeps train_one_epoch's
    # frame alive; the thread must be gone anyway.
    assert caught.value.__traceback__ is not None
    assert not loader_threads()
