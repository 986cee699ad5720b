"""Progress in logs: whole lines with count, rate and ETA when the output is not a terminal."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest

from pipeline.lib.progress import progress

LINE = re.compile(r"work: (\d+)/6 img \((\d+)%\), .*img/s, elapsed \d\d:\d\d, ETA (\d\d:\d\d|\?)(, .*)?")


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


def test_lines_come_at_the_interval_not_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNN_PROGRESS_INTERVAL", "0.2")
    stream = io.StringIO()
    for _ in progress(range(30), total=30, desc="work", unit="img", stream=stream):
        time.sleep(0.02)  # 0.6 s in all: about 3 interval lines, plus the first and the last
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) <= 7, lines
    assert lines[-1].startswith("work: 30/30 img (100%)")


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
    assert re.fullmatch(r"train: 3/3 batch \(100%\), .*batch/s, elapsed 00:\d\d, ETA 00:00, "
                        r"acc=[\d.]+, loss=[\d.]+", lines[-1]), lines
