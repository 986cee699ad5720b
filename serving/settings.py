"""The service's settings: ``SERVING_*`` environment variables, defaults sized to the usable CPUs.

Protocol limits (header and body deadlines, connection counts) belong to the HTTP front, not here.

Read once at import (``SETTINGS``), in the ``bentoml serve`` process and in each worker, so
every process agrees. ``python -m serving.settings`` prints what the defaults resolve to here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.common.cpus import decode_threads, server_session_threads, server_workers, usable_cpus
from pipeline.common.envsettings import describe as env_lines
from pipeline.common.envsettings import env_field, read_env

AUTO = -1  # a field left at AUTO is derived from the usable CPUs in from_env
# Relative paths of the monitoring folders are resolved against the project root (the folder holding
# serving/: the repository, or a Bento's src/), never against the working directory of the server.
ROOT = Path(__file__).resolve().parent.parent
PATH_VARIABLES = {"log_dir": ("SERVING_LOG_DIR", "artifacts/predictions"),
                  "review_dir": ("SERVING_REVIEW_DIR", "artifacts/review"),
                  "drift_report": ("SERVING_DRIFT_REPORT", "artifacts/monitor/drift.json")}


@dataclass(frozen=True)
class Settings:
    """Serving knobs. Each field is read from the ``SERVING_*`` variable in its metadata (integers; 0/1 for flags)."""

    max_bytes: int = env_field("SERVING_MAX_BYTES", 10 * 1024 * 1024, "request body limit → 413")
    max_pixels: int = env_field("SERVING_MAX_PIXELS", 25_000_000, "decoded pixels of one image → 413")
    max_batch_pixels: int = env_field("SERVING_MAX_BATCH_PIXELS", 25_000_000,
                                 "decoded pixels of all images of one request → 413")
    min_side: int = env_field("SERVING_MIN_SIDE", 8, "shorter image side below this → 422")
    max_files: int = env_field("SERVING_MAX_FILES", 64, "images per /predict_batch → 413")
    max_field_chars: int = env_field("SERVING_MAX_FIELD_CHARS", 128,
                                     "characters of a text field (k, target, ...) → 400")
    batching: bool = env_field("SERVING_BATCHING", True, "0 runs every /predict alone")
    max_batch_size: int = env_field("SERVING_MAX_BATCH_SIZE", 32, "images per batched onnxruntime call")
    max_latency_ms: int = env_field("SERVING_MAX_LATENCY_MS", 2000, "longest wait in the batch queue → 503")
    workers: int = env_field("SERVING_WORKERS", AUTO, "server processes (default: the usable CPUs)")
    threads: int = env_field("SERVING_THREADS", AUTO, "onnxruntime intra-op threads per session (default 1)")
    decode_threads: int = env_field("SERVING_DECODE_THREADS", AUTO,
                               "image decoding threads per worker (default: usable CPUs / workers)")
    ort_spinning: bool = env_field("SERVING_ORT_SPINNING", False, "1 lets idle onnxruntime threads spin")
    max_concurrency: int = env_field("SERVING_MAX_CONCURRENCY", 128, "requests in processing per replica → 503")
    timeout_s: int = env_field("SERVING_TIMEOUT", 30, "seconds to answer once the body has arrived → 503")
    max_scan_pixels: int = env_field("SERVING_MAX_SCAN_PIXELS", 400_000_000,
                                "a JPEG's scans × pixels: its decoding work (16 scans of 25 MP) → 422")
    log: bool = env_field("SERVING_LOG", True, "0 or off: no prediction log (SERVING_LOG_DIR)")
    log_max_bytes: int = env_field("SERVING_LOG_MAX_BYTES", 256 * 2**20,
                                   "the prediction log folder's bound; the oldest files are deleted past it")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, cpus: int | None = None) -> Settings:
        """Settings from ``env`` (default ``os.environ``); AUTO fields sized for ``cpus`` (default: usable CPUs)."""
        values = read_env(cls, env, minimums={"threads": 0}, special=frozenset({AUTO}))
        return cls(**values).resolved(cpus)

    def resolved(self, cpus: int | None = None) -> Settings:
        """AUTO fields replaced: one worker per usable CPU, one onnxruntime thread each, and the
        decoding threads that are left (measured in bench/serve.py: workers × 1 thread beats
        one worker with a thread per core, as in the issue's TorchServe comparison)."""
        cpus = cpus or usable_cpus()
        workers = server_workers(cpus) if self.workers == AUTO else self.workers
        threads = server_session_threads() if self.threads == AUTO else self.threads
        decode = decode_threads(cpus, workers) if self.decode_threads == AUTO else self.decode_threads
        return dataclasses.replace(self, workers=workers, threads=threads, decode_threads=decode)

    def per_worker(self, total: int) -> int:
        """A per-replica limit split over the workers (each worker enforces its share)."""
        return max(1, math.ceil(total / max(1, self.workers)))

    def public(self) -> dict[str, int | bool]:
        """The values, for /metadata."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MonitoringPaths:
    """Where monitoring reads and writes: the prediction log folder, the feedback review folder, the
    last drift verdict (``python -m pipeline.monitor --out``'s ``drift.json``). Never in /metadata."""

    log_dir: Path
    review_dir: Path
    drift_report: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, root: Path = ROOT) -> MonitoringPaths:
        """Each path from its variable (:data:`PATH_VARIABLES`), a relative one taken from ``root``."""
        env = os.environ if env is None else env
        return cls(**{name: root / Path(env.get(variable, "").strip() or default).expanduser()
                      for name, (variable, default) in PATH_VARIABLES.items()})


def describe() -> str:
    """A table of every setting: variable, value here, meaning."""
    settings = Settings.from_env()
    paths = MonitoringPaths.from_env()
    rows = [f"{variable:30} {getattr(paths, name)}" for name, (variable, _) in PATH_VARIABLES.items()]
    return "\n".join([f"usable CPUs: {usable_cpus()}", *env_lines(settings), *rows])


if __name__ == "__main__":
    print(describe())
