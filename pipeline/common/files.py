"""Outputs that an interrupted run never leaves half-written: atomic files and folders.

A file is written under a temporary name in its own folder and renamed over the target.
A folder is replaced in three renames (old aside, new in, old removed), so a crash at any
point leaves either the old folder or the new one, never neither: :func:`recover_dir` puts
the old one back if the process died between the first two renames.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary sibling of ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON with a trailing newline, indented, keys in insertion order."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def recover_dir(out: str | Path) -> None:
    """Finish an interrupted :func:`replace_dir`: restore the old folder if the new one never
    arrived, drop it if it did."""
    out = Path(out)
    old = _aside(out)
    if not old.exists():
        return
    if out.exists():
        shutil.rmtree(old)
    else:
        old.rename(out)


@contextmanager
def replace_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; it becomes ``out`` when the block succeeds.

    On an exception the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    recover_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        old = _aside(out)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
