"""MLflow plumbing: tracking URI, the run that train opens and later stages rejoin, retries.

One run per pipeline execution: ``train`` opens it and writes its id to a file; ``evaluate``
and ``export`` log into the same run through that id. MLflow is imported lazily so that
importing this module stays cheap.

The store is ``MLFLOW_TRACKING_URI`` (a team's ``http://`` tracking server) or a SQLite file in
the repository. A password in the URI never reaches MLflow: :func:`connect` moves it into
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (which MLflow sends as HTTP basic
auth), so MLflow's own messages, printed run links and tracebacks show a URI without it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.common.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow reads this when it is imported, and every stage imports this module first.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Downloading a registered version draws tqdm bars that fill a `make run` log with carriage returns;
# the stages print their own one-line summaries. Read at each download, so a user's setting still wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


SQLITE_TIMEOUT_S = 30  # how long a SQLite writer waits for the lock before "database is locked"
SQLITE_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED


def store_root() -> Path:
    """The directory that holds the default store: the DVC repository the user works in.

    ``dvc exp run --temp`` and queued experiments run each stage in a copy of the repository
    under ``.dvc/tmp/exps/``; a store there would be deleted with the copy. DVC sets
    ``DVC_ROOT`` to the original repository for every stage command (queued ones included),
    so that wins. Outside DVC: the nearest directory at or above the working directory that
    holds a ``.dvc`` folder, else the working directory.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)


def _configured_uri() -> str:
    default = f"sqlite:///{store_root() / 'mlflow.db'}?timeout={SQLITE_TIMEOUT_S}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` without its credentials, else the SQLite store ``mlflow.db`` in
    :func:`store_root`.

    The default URI carries a busy timeout so that parallel experiments wait for each
    other's writes instead of failing at once.
    """
    return split_credentials(_configured_uri())[0]


# scheme://user:password@ or scheme://token@ (a URI's userinfo), anywhere in a text
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*)(?P<password>:[^@/\s]*)?@")


def redact(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***`` (a lone user part, often
    a token, too): ``http://ana:s3cret@host`` -> ``http://ana:***@host``. For log lines and tags."""
    def hide(match: re.Match) -> str:
        if match["password"] is None:
            return f"{match['scheme']}***@"
        return f"{match['scheme']}{match['user']}:***@"
    return _USERINFO.sub(hide, text)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without user and password, user, password) of an ``http(s)://user:password@`` URI.

    Any other URI comes back whole with (None, None): a database URI (``postgresql://u:pw@host/db``)
    needs its password in it, and is only ever shown through :func:`redact`.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri, None, None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)), unquote(parts.username or ""), unquote(parts.password)


def connect() -> str:
    """Point MLflow at the store and return its URI (without credentials).

    Credentials in ``MLFLOW_TRACKING_URI`` move into ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (MLflow's own way to pass them, inherited by child processes),
    and ``MLFLOW_TRACKING_URI`` loses them, so no MLflow message or link can show the password.
    """
    import mlflow

    uri, user, password = split_credentials(_configured_uri())
    if password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (query string dropped), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _store_lock(uri: str):
    """Serialise first-time setup of a SQLite store between processes (a no-op lock otherwise).

    MLflow's tracking store creates its schema without a lock, so two experiments that start
    at once on a fresh ``mlflow.db`` can both try to create the tables.
    """
    from filelock import FileLock

    path = sqlite_path(uri)
    if path is None:
        return contextlib.nullcontext()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(path.name + ".lock"))  # beside the store, gone with it


def _sqlite_busy(err: BaseException) -> bool:
    """True when ``err`` wraps SQLite's "database is locked"/"busy" (MLflow wraps the driver's error
    in SQLAlchemy's, then in its own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlite3.OperationalError) and getattr(err, "sqlite_errorcode", None) in SQLITE_BUSY_CODES:
            return True
        err = getattr(err, "orig", None) or err.__cause__ or err.__context__
    return False


def with_retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call ``fn``, retrying while SQLite is busy (parallel ``dvc exp`` jobs share one store).

    SQLite's busy timeout covers most waits, but a transaction that started reading cannot wait
    for the write lock: SQLite fails it at once, and the only remedy is to run it again.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if not _sqlite_busy(err) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def setup(experiment: str) -> str:
    """Point MLflow at the store and select (creating once) the experiment; returns its id.

    Safe to call from parallel processes on a fresh store: schema and experiment creation
    happen under a file lock. Against a tracking server the server picks the artifact store
    (``mlflow-artifacts:/``, proxied): nothing here assumes the store is a local file.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = connect()
    with _store_lock(uri):
        found = with_retry(lambda: mlflow.get_experiment_by_name(experiment))
        if found is not None:
            return found.experiment_id
        artifacts = None
        if sqlite_path(uri) is not None:
            # Keep artifacts beside the database, not wherever the process happens to run.
            artifacts = (sqlite_path(uri).resolve().parent / "mlruns").as_uri()
        try:
            return with_retry(lambda: mlflow.create_experiment(experiment, artifact_location=artifacts))
        except MlflowException as err:  # created by a parallel run against a server in the meantime
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return mlflow.get_experiment_by_name(experiment).experiment_id


def run_name() -> str:
    """The DVC experiment name under ``dvc exp run``, else a readable timestamped default."""
    return os.environ.get("DVC_EXP_NAME") or time.strftime("run-%Y%m%d-%H%M%S")


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
        raise UserError(f"{path}: no MLflow run id; run the train stage first (dvc repro train)")
    return path.read_text().strip()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.lib.tracking init``: create the store and the experiment before parallel runs."""
    from pipeline.lib.config import PARAMS_FILE, load_params

    parser = argparse.ArgumentParser(description="MLflow store maintenance.")
    parser.add_argument("command", choices=["init"], help="init: create the store's schema and the experiment")
    parser.add_argument("--experiment", default=None, help="experiment name (default: mlflow.experiment in params)")
    parser.add_argument("--params", default=PARAMS_FILE, type=Path, help="params file for the default experiment")
    args = parser.parse_args(argv)
    experiment = args.experiment or load_params(args.params).mlflow.experiment
    store = redact(_configured_uri())  # before setup() moves the password out of the URI
    experiment_id = setup(experiment)
    print(f"{store}: experiment {experiment!r} (id {experiment_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
