"""The service's settings: ``SERVING_*`` environment variables, defaults sized to the usable CPUs.

Protocol limits (header and body deadlines, connection counts) belong to the HTTP front, not here.

Read once at import (``SETTINGS``), in the ``bentoml serve`` process and in each worker, so
every process agrees. ``python -m serving.settings`` prints what the defaults resolve to here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common.cpus import decode_threads, server_session_threads, server_workers, usable_cpus

AUTO = -1  # a field left at AUTO is derived from the usable CPUs in from_env
SWITCHES = {"on": "1", "true": "1", "yes": "1", "off": "0", "false": "0", "no": "0"}  # flags also read as words
# Relative paths of the monitoring folders are resolved against the project root (the folder holding
# serving/: the repository, or a Bento's src/), never against the working directory of the server.
ROOT = Path(__file__).resolve().parent.parent
PATH_VARIABLES = {"log_dir": ("SERVING_LOG_DIR", "artifacts/predictions"),
                  "review_dir": ("SERVING_REVIEW_DIR", "artifacts/review"),
                  "drift_report": ("SERVING_DRIFT_REPORT", "artifacts/monitor/drift.json")}


def _var(name: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": name, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """Serving knobs. Each field is read from the ``SERVING_*`` variable in its metadata (integers; 0/1 for flags)."""

    max_bytes: int = _var("SERVING_MAX_BYTES", 10 * 1024 * 1024, "request body limit → 413")
    max_pixels: int = _var("SERVING_MAX_PIXELS", 25_000_000, "decoded pixels of one image → 413")
    max_batch_pixels: int = _var("SERVING_MAX_BATCH_PIXELS", 25_000_000,
                                 "decoded pixels of all images of one request → 413")
    min_side: int = _var("SERVING_MIN_SIDE", 8, "shorter image side below this → 422")
    max_files: int = _var("SERVING_MAX_FILES", 64, "images per /predict_batch → 413")
    max_field_chars: int = _var("SERVING_MAX_FIELD_CHARS", 128, "characters of a text field (k, target, ...) → 400")
    batching: bool = _var("SERVING_BATCHING", True, "0 runs every /predict alone")
    max_batch_size: int = _var("SERVING_MAX_BATCH_SIZE", 32, "images per batched onnxruntime call")
    max_latency_ms: int = _var("SERVING_MAX_LATENCY_MS", 2000, "longest wait in the batch queue → 503")
    workers: int = _var("SERVING_WORKERS", AUTO, "server processes (default: the usable CPUs)")
    threads: int = _var("SERVING_THREADS", AUTO, "onnxruntime intra-op threads per session (default 1)")
    decode_threads: int = _var("SERVING_DECODE_THREADS", AUTO,
                               "image decoding threads per worker (default: usable CPUs / workers)")
    ort_spinning: bool = _var("SERVING_ORT_SPINNING", False, "1 lets idle onnxruntime threads spin")
    max_concurrency: int = _var("SERVING_MAX_CONCURRENCY", 128, "requests in processing per replica → 503")
    timeout_s: int = _var("SERVING_TIMEOUT", 30, "seconds to answer once the body has arrived → 503")
    max_scan_pixels: int = _var("SERVING_MAX_SCAN_PIXELS", 400_000_000,
                                "a JPEG's scans × pixels: its decoding work (16 scans of 25 MP) → 422")
    log: bool = _var("SERVING_LOG", True, "0 or off: no prediction log (SERVING_LOG_DIR)")
    log_max_bytes: int = _var("SERVING_LOG_MAX_BYTES", 256 * 2**20,
                              "the prediction log folder's bound; the oldest files are deleted past it")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, cpus: int | None = None) -> Settings:
        """Settings from ``env`` (default ``os.environ``); AUTO fields sized for ``cpus`` (default: usable CPUs)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            name, text = spec.metadata["env"], env.get(spec.metadata["env"], "").strip()
            if isinstance(spec.default, bool) and text.lower() in SWITCHES:
                text = SWITCHES[text.lower()]
            try:
                value = int(text) if text else spec.default
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected an integer") from None
            if isinstance(spec.default, bool):
                value = bool(value)
            elif value != AUTO and value < (0 if spec.name == "threads" else 1):
                raise ValueError(f"{name}={value}: must be >= 1")
            values[spec.name] = value
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
    rows = [f"{f.metadata['env']:26} {getattr(settings, f.name)!s:>10}  {f.metadata['doc']}"
            for f in dataclasses.fields(Settings)]
    paths = MonitoringPaths.from_env()
    rows += [f"{variable:26} {getattr(paths, name)}" for name, (variable, _) in PATH_VARIABLES.items()]
    return "\n".join([f"usable CPUs: {usable_cpus()}", *rows])


if __name__ == "__main__":
    print(describe())
