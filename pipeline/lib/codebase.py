"""Which project files a module depends on: its import closure over ``pipeline/`` and ``models/``.

The train stage fingerprints its checkpoints with it (code that changed invalidates a resume),
and a test holds ``dvc.yaml`` to it (a stage's deps are exactly the files it imports, so
``dvc repro`` never skips a stage whose code changed). Imports are read from the source with
:mod:`ast`, function-level (lazy) imports included.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "models", "serving")


def module_file(name: str) -> Path | None:
    """``pipeline.train`` → ``ROOT/pipeline/train.py`` (or the package's ``__init__.py``); None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def direct_imports(name: str) -> frozenset[str]:
    """Project modules that module ``name`` imports anywhere in its source."""
    path = module_file(name)
    if path is None:
        return frozenset()
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: drop (level - 1) trailing parts of the package
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, base] if base else parents)
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            # `import pipeline.common.images` also runs pipeline/__init__.py
            parts = candidate.split(".")
            for depth in range(1, len(parts) + 1):
                if module_file(".".join(parts[:depth])) is not None:
                    found.add(".".join(parts[:depth]))
    found.discard(name)
    return frozenset(found)


def import_closure(name: str) -> list[str]:
    """Every project module ``name`` needs, itself included, as sorted repository-relative paths."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or module_file(current) is None:
            continue
        seen.add(current)
        todo.extend(direct_imports(current))
    return sorted(module_file(m).relative_to(ROOT).as_posix() for m in seen)
