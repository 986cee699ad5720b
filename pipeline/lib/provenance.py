"""Where a run's inputs came from: the git commit (and whether the checkout was clean) and the
data version ``data.dvc`` records, plus the DVC experiment it ran in.

The train stage tags its MLflow run with :class:`~pipeline.common.contract.Provenance` and
copies the commit and data version into the model card. Asks ``git`` and reads DVC's files;
never changes either.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pipeline.common.contract import Provenance


def _git(*args: str, cwd: str | Path | None = None) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=cwd).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _entry_paths(entries: object) -> list[str]:
    """Paths of a dvc.yaml ``outs``/``metrics``/``plots`` list: plain strings or one-key mappings."""
    paths: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict):
            paths.extend(str(key) for key in entry)
    return paths


def dvc_owned_paths(root: str | Path) -> list[str]:
    """Repository paths DVC writes: every stage's outs, metrics and plots in ``root/dvc.yaml``,
    the top-level plots, ``dvc.lock`` and the ``.dvc`` files (``dvc commit`` rewrites them)."""
    import yaml

    root = Path(root)
    try:
        pipeline = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pipeline = {}
    paths = ["dvc.lock"]
    for stage in (pipeline.get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            paths += _entry_paths((stage or {}).get(kind))
    paths += _entry_paths(pipeline.get("plots"))  # an id that names no file excludes nothing
    return paths


def git_dirty(root: str | Path | None = None) -> bool:
    """Tracked files differ from the commit, ignoring what DVC owns.

    ``dvc repro`` deletes a stage's outputs (``metrics/train.json``, ``plots/train.json``) before
    running it, and rewrites ``dvc.lock`` and ``.dvc`` files: none of that is a source edit, and a
    clean checkout under ``dvc repro`` must be tagged clean.
    """
    top = _git("rev-parse", "--show-toplevel", cwd=root)
    if not top:
        return False
    excluded = [f":(top,exclude){path.strip('/')}" for path in dvc_owned_paths(top)]
    excluded.append(":(top,exclude,glob)**/*.dvc")
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded, cwd=top))


def data_md5(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 a ``.dvc`` file records for its output (the data version), or "" if absent."""
    path = Path(dvc_file)
    if not path.exists():
        return ""
    import yaml

    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))


def current() -> Provenance:
    """The provenance of a run started here and now (the working directory's checkout)."""
    return Provenance(git_commit=_git("rev-parse", "HEAD"), git_dirty=git_dirty(), data_md5=data_md5(),
                      dvc_exp_name=os.environ.get("DVC_EXP_NAME", ""),
                      dvc_exp_baseline_rev=os.environ.get("DVC_EXP_BASELINE_REV", ""))
