"""MLflow plumbing: tracking URI, the run that train opens and later stages rejoin, tags.

One run per pipeline execution: ``train`` opens it and writes its id to a file; ``evaluate``
and ``export`` log into the same run through that id. MLflow is imported lazily so that
importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the working directory.

    DVC runs every stage from the repository root, so that is where the store lands.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def with_retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call ``fn``, retrying when SQLite reports a lock (parallel ``dvc exp`` jobs share one store)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps sqlite3.OperationalError in several exception types
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def setup(experiment: str) -> str:
    """Point MLflow at the store and select (creating once) the experiment; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    found = with_retry(lambda: mlflow.get_experiment_by_name(experiment))
    if found is not None:
        return found.experiment_id
    artifacts = None
    if tracking_uri().startswith("sqlite:///"):
        # Keep artifacts beside the database, not wherever the process happens to run.
        artifacts = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    try:
        return with_retry(lambda: mlflow.create_experiment(experiment, artifact_location=artifacts))
    except Exception:  # created by a parallel run in the meantime
        return mlflow.get_experiment_by_name(experiment).experiment_id


def run_name() -> str:
    """The DVC experiment name under ``dvc exp run``, else a readable timestamped default."""
    return os.environ.get("DVC_EXP_NAME") or time.strftime("run-%Y%m%d-%H%M%S")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def file_md5(path: str | Path) -> str:
    """The md5 a ``.dvc`` file records for its output (the data version), or "" if absent."""
    path = Path(path)
    if not path.exists():
        return ""
    import yaml

    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))


def source_tags() -> dict[str, str]:
    """Git commit and dirty flag, data version, DVC experiment name and baseline."""
    tags = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data_md5": file_md5("data.dvc"),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        tags["dvc_exp_baseline_rev"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return tags


@contextlib.contextmanager
def run(experiment: str, run_id: str | None = None, name: str | None = None) -> Iterator[object]:
    """Start (or resume, given ``run_id``) a run that never stays RUNNING.

    Ends FINISHED on success, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.
    """
    import mlflow

    experiment_id = setup(experiment)
    active = with_retry(lambda: mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                                                 run_name=None if run_id else (name or run_name())))
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):  # turn SIGTERM (dvc, kill) into an exception we can record
        raise KeyboardInterrupt

    in_main_thread = hasattr(signal, "SIGTERM")
    with contextlib.suppress(ValueError):  # only possible in the main thread
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield active
    except KeyboardInterrupt:
        with_retry(lambda: mlflow.end_run("KILLED"))
        raise
    except BaseException:
        with_retry(lambda: mlflow.end_run("FAILED"))
        raise
    else:
        with_retry(lambda: mlflow.end_run("FINISHED"))
    finally:
        if in_main_thread:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, previous)


def read_run_id(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no MLflow run id; run the train stage first (dvc repro train)")
    return path.read_text().strip()


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
