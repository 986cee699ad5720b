"""bin/python: the stages' interpreter, whichever dvc launched them and wherever DVC runs the stage."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fake_venv(root: Path, name: str) -> None:
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho {name} \"$@\"\n")
    python.chmod(0o755)


def run(repo: Path, **env: str) -> str:
    clean = {"PATH": os.environ["PATH"], **env}
    return subprocess.run([str(repo / "bin" / "python"), "-m", "x"], env=clean, capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()


def test_the_repository_venv_then_dvc_root_venv_then_active_venv(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "bin" / "python", repo / "bin" / "python")
    origin, active = tmp_path / "origin", tmp_path / "active"
    fake_venv(origin, "origin")
    (active / "bin").mkdir(parents=True)
    (active / "bin" / "python").write_text("#!/bin/sh\necho active \"$@\"\n")
    (active / "bin" / "python").chmod(0o755)
    # a queued experiment's copy: no .venv of its own, DVC_ROOT names the user's repository
    assert run(repo, DVC_ROOT=str(origin), VIRTUAL_ENV=str(active)) == "origin -m x"
    assert run(repo, VIRTUAL_ENV=str(active)) == "active -m x"
    fake_venv(repo, "own")
    assert run(repo, DVC_ROOT=str(origin), VIRTUAL_ENV=str(active)) == "own -m x"
