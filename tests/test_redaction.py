"""Credentials in a tracking URI: redacted for display, moved out of the URI before MLflow sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow

from pipeline.lib import tracking
from pipeline.lib.tracking import redact, split_credentials

ROOT = Path(__file__).resolve().parent.parent


def test_redact_hides_passwords_and_lone_tokens():
    assert redact("http://ana:s3cret@host:5000/x") == "http://ana:***@host:5000/x"
    assert redact("see https://tok3n@host/p and https://example.org/a@b") == \
        "see https://***@host/p and https://example.org/a@b"  # an @ in a path is no userinfo
    assert redact("postgresql://u:pw@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert redact("sqlite:////tmp/mlflow.db?timeout=30") == "sqlite:////tmp/mlflow.db?timeout=30"


def test_split_credentials_only_for_http_passwords():
    assert split_credentials("http://ana:s%40cret@host:5000/p?q=1") == ("http://host:5000/p?q=1", "ana", "s@cret")
    assert split_credentials("https://ana:pw@[::1]:5000") == ("https://[::1]:5000", "ana", "pw")
    assert split_credentials("http://host:5000") == ("http://host:5000", None, None)
    # a database URI keeps its password (the driver needs it); it is only ever shown redacted
    assert split_credentials("postgresql://u:pw@db/x") == ("postgresql://u:pw@db/x", None, None)


def test_connect_moves_the_password_into_mlflow_variables(monkeypatch):
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ana:s3cret@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    try:
        assert tracking.connect() == "http://127.0.0.1:9"
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:9"
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"  # what child processes inherit
        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ana", "s3cret")
        assert tracking.tracking_uri() == "http://127.0.0.1:9"
    finally:
        mlflow.set_tracking_uri(previous)  # MLflow keeps it process-wide


def test_mlflow_telemetry_is_off_in_project_processes():
    """A process that imports the project's tracking module before MLflow gets no telemetry client."""
    code = ("import pipeline.lib.tracking, mlflow; from mlflow.telemetry.client import get_telemetry_client; "
            "print(get_telemetry_client())")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}  # no CI or pytest markers
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"
