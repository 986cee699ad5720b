"""The prediction log: append-only JSON lines, rotated by size, in a size-bounded folder.

The service hands each answer to :meth:`PredictionLog.log`, which never blocks and never
raises: a record, or a function that builds the records from values the answer already holds
(:func:`deferred`), waits in a bounded queue for one background thread that builds, encodes and
writes it, so a request pays one append; when the queue is full the entry is dropped and counted
(:attr:`PredictionLog.dropped`, for ``/metrics``). The thread looks at the queue every
:data:`FLUSH_S` seconds instead of being woken per record (a wake-up per answer cost the
event loop more than building the record did). What a look finds is written as whole lines,
in one ``write`` where rotation allows, to a file opened with ``O_APPEND``, so a ``kill -9`` loses
at most the records still queued and can tear only the last line of the file being written;
:func:`read_records` skips a line that is not whole JSON. Each writer (one per worker process)
writes its own files, named ``<UTC time>-<pid>-<n>.jsonl`` so that names sort oldest first; past
``max_bytes`` for the whole folder the oldest files are deleted.

Raw images are never logged: a record holds the feature record of :mod:`pipeline.common.features`.
stdlib only: it ships in the Bento.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOG_DIR_VARIABLE = "SERVING_LOG_DIR"
DEFAULT_LOG_DIR = "artifacts/predictions"
SUFFIX = ".jsonl"
DEFAULT_MAX_BYTES = 256 * 2**20  # the folder's bound: ~200,000 records of a 128-dim embedding
DEFAULT_FILE_BYTES = 8 * 2**20  # rotation size; several worker processes may each hold one file this big
DEFAULT_QUEUE = 10_000
ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # one, not one per json.dumps call
FLUSH_LINES = 1000  # lines per write at most
FLUSH_S = 0.05  # the writer's look at the queue: a kill -9 loses at most this long's records (plus a backlog)


def log_dir(environ: dict[str, str] | None = None) -> Path:
    """The folder ``SERVING_LOG_DIR`` names, else :data:`DEFAULT_LOG_DIR` (relative to the working directory)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(LOG_DIR_VARIABLE) or DEFAULT_LOG_DIR)


class PredictionLog:
    """A background writer of JSON-lines records into ``directory``.

    Args:
        directory: the log folder (created if missing).
        max_bytes: bound on the folder's ``*.jsonl`` files, all writers together; the oldest are deleted.
        file_bytes: a file is closed and a new one started before it would pass this size.
        queue_size: entries that may wait; beyond, :meth:`log` drops and counts.
    """

    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 file_bytes: int = DEFAULT_FILE_BYTES, queue_size: int = DEFAULT_QUEUE) -> None:
        if not 0 < file_bytes <= max_bytes // 2:
            raise ValueError(f"file_bytes ({file_bytes}) must be positive and at most half of max_bytes "
                             f"({max_bytes}), so that rotation can keep the folder under its bound")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.file_bytes, self.queue_size = max_bytes, file_bytes, queue_size
        # deque.append and popleft are atomic: the request side takes no lock and wakes no thread
        self._pending: deque[dict | Callable[[], Iterable[dict]]] = deque()
        self._in_hand = 0  # entries the writer has taken and not yet written (only the writer sets it)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._dropped = self._written = self._errors = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._files_opened = 0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the request side
    def log(self, entry: dict | Callable[[], Iterable[dict]]) -> bool:
        """Queue a record (plain JSON types) or a function returning records, run on the writer
        thread; False when the queue was full and it was dropped."""
        if len(self._pending) + self._in_hand >= self.queue_size:
            with self._lock:
                self._dropped += 1
            return False
        self._pending.append(entry)
        return True

    @property
    def dropped(self) -> int:
        """Entries dropped because the queue was full, or records whose building or writing failed
        (a counter for ``/metrics``)."""
        with self._lock:
            return self._dropped + self._errors

    @property
    def written(self) -> int:
        with self._lock:
            return self._written

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread and close the file."""
        self._closing.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            closing = self._closing.wait(FLUSH_S)
            while self._pending:
                lines: list[bytes] = []
                while self._pending and len(lines) < FLUSH_LINES:
                    self._in_hand += 1  # taken but not written: still counts against the queue's size
                    lines += self._encode(self._pending.popleft())
                self._write_lines(lines)
                self._in_hand = 0
            if closing:
                break
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _encode(self, entry: dict | Callable[[], Iterable[dict]]) -> list[bytes]:
        """The entry's records as JSON lines; a record that cannot be built or encoded is counted, never raised."""
        try:
            records = [entry] if isinstance(entry, dict) else list(entry())
        except Exception as err:  # noqa: BLE001 - a record that cannot be built is dropped, never raised
            self._count_errors(1, f"{type(err).__name__}: {err}")
            return []
        lines = []
        for record in records:
            try:
                lines.append((ENCODER.encode(record) + "\n").encode())
            except (TypeError, ValueError) as err:
                self._count_errors(1, str(err))
        return lines

    def _write_lines(self, lines: list[bytes]) -> None:
        """Whole lines, as few writes as rotation allows: one syscall per flush, not per record (each
        released the GIL to a waiting request). A failed write or rotation drops and counts what is left."""
        left = lines
        try:
            if self._fd is not None and left and os.fstat(self._fd).st_nlink == 0:
                self._rotate()  # a file another writer's bound deleted has no links left: start a new one
            while left:
                if self._fd is None or self._size + len(left[0]) > self.file_bytes:
                    self._rotate()
                take, size = 1, len(left[0])  # a line longer than a file still gets a file of its own
                while take < len(left) and self._size + size + len(left[take]) <= self.file_bytes:
                    size += len(left[take])
                    take += 1
                self._write(b"".join(left[:take]))
                with self._lock:
                    self._written += take
                left = left[take:]
        except OSError as err:  # never takes the service down
            self._count_errors(len(left), str(err))

    def _count_errors(self, count: int, reason: str) -> None:
        with self._lock:
            self._errors += count
        log.warning("prediction log: %d record(s) dropped (%s)", count, reason)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one write of whole lines; a short write (disk full, signal) continues it
            done = os.write(self._fd, view)
            view = view[done:]
        self._size += len(data)

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._files_opened += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        self._path = self.directory / f"{stamp}-{os.getpid()}-{self._files_opened:06d}{SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = 0
        enforce_bound(self.directory, self.max_bytes - self.file_bytes, keep=self._path)


def enforce_bound(directory: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Delete the oldest ``*.jsonl`` files (by name) until the rest hold at most ``max_bytes``; never ``keep``.

    Returns:
        The deleted files.
    """
    files = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            files.append((path, path.stat().st_size))
        except FileNotFoundError:  # deleted by another writer meanwhile
            continue
    total = sum(size for _, size in files)
    deleted = []
    for path, size in files:
        if total <= max_bytes:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted


@dataclass
class ReadResult:
    """:func:`read_records`' answer: the records, oldest first, and how many lines were not whole JSON."""

    records: list[dict] = field(default_factory=list)
    skipped: int = 0
    files: int = 0


def iter_lines(directory: str | Path) -> Iterator[bytes]:
    """Every line of every ``*.jsonl`` file, files oldest first; a last line without its newline
    (a write a kill interrupted) is yielded as it is and fails to parse."""
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # rotated away while reading
            continue
        yield from data.splitlines(keepends=True)


def read_records(directory: str | Path, since: str | None = None, version: str | None = None,
                 model: str | None = None) -> ReadResult:
    """Read the prediction log, oldest first, skipping torn or foreign lines.

    Args:
        directory: the log folder.
        since: ISO 8601 UTC time (``2026-12-06T04:00:00Z``); older records are left out.
        version: keep only records of this model version (``record["model"]["version"]``).
        model: keep only records of this registered model name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no prediction log folder (set {LOG_DIR_VARIABLE} for the service)")
    result = ReadResult(files=len(list(directory.glob(f"*{SUFFIX}"))))
    threshold = _parse_time(since) if since else None
    for line in iter_lines(directory):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("torn line")
            record = json.loads(line)
            stamp = _parse_time(record["time"]) if threshold is not None else None
            identity = record.get("model") or {}
        except (ValueError, KeyError, TypeError):
            result.skipped += 1
            continue
        if threshold is not None and stamp < threshold:
            continue
        if version is not None and str(identity.get("version")) != str(version):
            continue
        if model is not None and identity.get("name") != model:
            continue
        result.records.append(record)
    result.records.sort(key=lambda r: str(r.get("time", "")))  # several writers' files interleave in time
    return result


def _parse_time(text: str) -> float:
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def prediction_record(features: dict, model: dict, endpoint: str, now: float | None = None) -> dict:
    """The logged record: time (ISO 8601 UTC, sorts as text), endpoint, the model identity and the feature record.

    Args:
        features: one entry of :func:`pipeline.common.features.feature_records`.
        model: ``{"name", "version", "card_sha256"}`` of the served model (:func:`model_identity`).
        endpoint: ``/predict``, ``/predict_batch`` or ``/saliency``.
        now: POSIX time (default: now).
    """
    when = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return {"time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "endpoint": endpoint, "model": model, **features}


def deferred(features: Callable[[], Iterable[dict]], model: dict, endpoint: str, now: float
             ) -> Callable[[], list[dict]]:
    """An entry for :meth:`PredictionLog.log` that builds its records on the writer thread.

    Args:
        features: returns the answers' feature records (a :func:`functools.partial` of
            :func:`pipeline.common.features.feature_records` over values the answer already computed).
        model, endpoint: as for :func:`prediction_record`.
        now: the answer's POSIX time, taken when it was given (not when it is written).
    """
    return lambda: [prediction_record(record, model, endpoint, now) for record in features()]


def model_identity(name: str, version: str, card_sha256: str) -> dict:
    """What each record says about the model: registered name, version, sha256 of ``model_card.json``."""
    return {"name": name, "version": str(version), "card_sha256": card_sha256}
