"""`make run`'s log: MLflow's artifact progress bars are off in the stages unless the user asks for them."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = ("import pipeline.lib.tracking, mlflow.environment_variables as v; "
        "print(v.MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get())")


def progress_bar_setting(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    done = subprocess.run([sys.executable, "-c", CODE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


def test_mlflow_progress_bars_are_off_in_the_stages():
    # one interpreter start (MLflow is slow to import): a user's own setting is kept by the same setdefault
    assert progress_bar_setting() == "False"

