"""The prediction log writer and reader: rotation, the folder's bound, drops, and a kill -9 mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.common import predlog
from pipeline.common.predlog import PredictionLog, enforce_bound, model_identity, prediction_record, read_records
from tests.conftest import ROOT

MODEL = model_identity("cnn-classifier", "3", "ab" * 32)


def record(i: int, version: str = "3") -> dict:
    features = {"predicted": i % 10, "confidence": 0.5, "embedding": [0.1] * 16, "seq": i}
    return prediction_record(features, {**MODEL, "version": version}, "/predict", now=1_800_000_000 + i)


def wait_written(log: PredictionLog, count: int) -> None:
    log.close()
    assert log.written == count


def test_records_round_trip_in_order(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, max_bytes=1 << 20, file_bytes=1 << 18)
    for i in range(50):
        assert log.log(record(i))
    wait_written(log, 50)
    found = read_records(tmp_path)
    assert [r["seq"] for r in found.records] == list(range(50)) and found.skipped == 0
    assert found.records[0]["model"] == MODEL and found.records[0]["endpoint"] == "/predict"
    assert found.records[0]["time"] == "2027-01-15T08:00:00.000000Z"


def test_rotation_keeps_every_file_under_its_size_and_the_folder_under_its_bound(tmp_path: Path) -> None:
    line = len(json.dumps(record(0), separators=(",", ":"))) + 1
    file_bytes, max_bytes = 20 * line, 100 * line
    log = PredictionLog(tmp_path, max_bytes=max_bytes, file_bytes=file_bytes)
    for i in range(1000):
        while not log.log(record(i)):  # this test wants every record written: wait out a full queue
            time.sleep(0.001)
    wait_written(log, 1000)
    files = sorted(tmp_path.glob("*.jsonl"))
    sizes = [f.stat().st_size for f in files]
    assert len(files) >= 4 and max(sizes) <= file_bytes + line  # a record may only make a new file
    assert sum(sizes) <= max_bytes
    # The oldest went first: what is left is the newest records, contiguous, ending with the last.
    seqs = [r["seq"] for r in read_records(tmp_path).records]
    assert seqs == list(range(seqs[0], 1000)) and seqs[0] > 0


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, queue_size=5)
    gate = threading.Event()
    original = log._write  # hold the writer thread inside its first write, so the queue fills

    def blocked(line: bytes) -> None:
        gate.wait(10)
        original(line)

    log._write = blocked
    accepted = sum(log.log(record(i)) for i in range(20))
    # the first record may already be in the writer's hands, so 5 or 6 were accepted
    assert accepted in (5, 6) and log.dropped == 20 - accepted
    gate.set()
    wait_written(log, accepted)
    assert len(read_records(tmp_path).records) == accepted


def test_unserialisable_record_is_dropped_not_raised(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    assert log.log({"time": "x", "bad": object()})
    assert log.log(record(1))
    log.close()
    assert log.written == 1 and log.dropped == 1


def test_enforce_bound_deletes_oldest_first_and_keeps_the_current_file(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"2026010{i}T000000-1-{i:06d}.jsonl").write_bytes(b"x" * 100)
    deleted = enforce_bound(tmp_path, 250, keep=tmp_path / "20260100T000000-1-000000.jsonl")
    assert [p.name[:9] for p in deleted] == ["20260101T", "20260102T", "20260103T"]
    assert sorted(p.name[:9] for p in tmp_path.glob("*.jsonl")) == ["20260100T", "20260104T"]


def test_reader_filters_version_and_time(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    for i in range(10):
        log.log(record(i, version="3" if i % 2 else "4"))
    wait_written(log, 10)
    assert [r["seq"] for r in read_records(tmp_path, version="3").records] == [1, 3, 5, 7, 9]
    since = read_records(tmp_path, since="2027-01-15T08:00:05Z").records
    assert [r["seq"] for r in since] == [5, 6, 7, 8, 9]


def test_log_dir_from_the_environment() -> None:
    assert predlog.log_dir({}) == Path("artifacts/predictions")
    assert predlog.log_dir({"SERVING_LOG_DIR": "/var/log/cnn"}) == Path("/var/log/cnn")


WRITER = """
import sys, time
from pipeline.common.predlog import PredictionLog
log = PredictionLog(sys.argv[1], max_bytes=1 << 30, file_bytes=1 << 14)
i = 0
while True:
    if log.log({"time": "2026-12-06T00:00:00.000000Z", "seq": i, "pad": "x" * 200}):
        i += 1
    else:
        time.sleep(0.0005)
"""


@pytest.mark.timeout(120)
def test_kill_9_loses_only_records_in_flight(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT)
    try:
        # until the writer has rotated a few times (events on disk, not a sleep)
        while len(list(tmp_path.glob("*.jsonl"))) < 4:
            assert child.poll() is None, "the writer died on its own"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # What a kill during a write leaves at worst: half a line at the end of the newest file.
    newest = sorted(tmp_path.glob("*.jsonl"))[-1]
    with open(newest, "ab") as handle:
        handle.write(b'{"time": "2026-12-06T00:00:00.000000Z", "seq": 99999')
    found = read_records(tmp_path)
    seqs = [r["seq"] for r in found.records]
    assert found.skipped == 1  # the torn line, nothing else
    assert seqs == list(range(len(seqs))) and len(seqs) > 100  # every earlier record, none lost or mangled
    for path in sorted(tmp_path.glob("*.jsonl"))[:-1]:  # closed files end with a whole line
        assert path.read_bytes().endswith(b"\n")
