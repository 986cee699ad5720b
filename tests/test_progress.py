"""Progress in logs: whole lines with count, rate and ETA when the output is not a terminal."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from pipeline.lib.progress import progress

# tqdm writes the rate as items/s, or s/item when an item takes over a second (a busy machine)
RATE = r"(?:\?|[\d.]+){unit}/s|[\d.]+s/{unit}"
LINE = re.compile(rf"work: (\d+)/6 img \((\d+)%\), +(?:{RATE.format(unit='img')}), elapsed \d\d:\d\d, "
                  r"ETA (\d\d:\d\d|\?)(, .*)?")


def test_a_log_gets_whole_lines_with_count_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()  # not a terminal
    bar = progress(range(6), total=6, desc="work", unit="img", stream=stream)
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert all(LINE.fullmatch(line) for line in lines), lines
    counts = [int(LINE.fullmatch(line).group(1)) for line in lines]
    assert counts[0] == 0 and counts[-1] == 6 and counts == sorted(counts) and len(set(counts)) >= 6
    assert lines[-1].endswith("ETA 00:00, loss=0.167")


class Clock:
    """The time tqdm reads, moved by the test: each step takes exactly what the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_the_interval_not_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_PROGRESS_INTERVAL", "1")
    clock = Clock()
    monkeypatch.setattr("tqdm.std.time", clock)  # the name a tqdm object takes its clock from
    stream = io.StringIO()
    # 20 quarter-interval steps, one step of 3 intervals (reported at once, not 3 lines later), 9 more
    steps = [0.25] * 20 + [3.0] + [0.25] * 9
    for seconds in progress(steps, total=len(steps), desc="work", unit="img", stream=stream):
        clock.now += seconds
    lines = stream.getvalue().splitlines()
    counts = [int(re.match(r"work: (\d+)/30 img", line).group(1)) for line in lines]
    assert counts == [0, 4, 8, 12, 16, 20, 21, 25, 29, 30], lines
    assert lines[-1].startswith("work: 30/30 img (100%)") and "elapsed 00:10" in lines[-1]


def test_disabled_prints_nothing() -> None:
    stream = io.StringIO()
    assert list(progress(range(3), total=3, enabled=False, stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_training_epoch_reports_progress_in_a_log(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from models import build_model
    from pipeline.lib.config import TrainParams
    from pipeline.lib.engine import Context, build_optimizer, build_scheduler, train_one_epoch

    monkeypatch.setenv("CNN_PROGRESS_INTERVAL", "0")
    torch.manual_seed(0)
    params = TrainParams(epochs=1, batch_size=8, threads=1)
    model = build_model("lenet5", 3, 1, 32)
    images = np.random.default_rng(0).integers(0, 256, (24, 1, 32, 32), dtype=np.uint8)
    labels = np.arange(24) % 3
    optimizer = build_optimizer(model, params)
    ctx = Context.for_device(torch.device("cpu"), [0.5], [0.25])
    train_one_epoch(model, images, labels, np.arange(24), optimizer, build_scheduler(optimizer, params, 3), ctx,
                    params, torch.Generator().manual_seed(0))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert lines[0].startswith("train: 0/3 batch (0%)")
    assert re.fullmatch(rf"train: 3/3 batch \(100%\), +(?:{RATE.format(unit='batch')}), elapsed \d\d:\d\d, "
                        r"ETA 00:00, acc=[\d.]+, loss=[\d.]+", lines[-1]), lines
