"""docs/architecture.md held to the code: the third-party imports it states per package, and its
module table (every file it names exists; every module file has a line)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from pipeline.lib.codebase import ROOT, direct_imports

DOC = ROOT / "docs" / "architecture.md"
OURS = {"pipeline", "models", "serving", "tests", "bench"}
# What the page says each package may import besides the standard library and our own code.
ALLOWED = {"models": {"torch"}, "pipeline/common": {"numpy", "PIL", "pydantic"}}


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, minus the standard library and ours."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - OURS - {"__future__"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_third_party_imports_are_what_the_page_says(package: str):
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    extra = {f.relative_to(ROOT).as_posix(): sorted(third_party_imports(f) - ALLOWED[package]) for f in files}
    assert not any(extra.values()), {f: names for f, names in extra.items() if names}


def test_contract_imports_only_errors_of_ours():
    assert direct_imports("pipeline.common.contract") == {"pipeline", "pipeline.common", "pipeline.common.errors"}


def test_the_import_reader_sees_imports(tmp_path: Path):
    (tmp_path / "m.py").write_text("import os, torch.nn\nfrom PIL import Image\nfrom . import x\nimport pipeline\n")
    assert third_party_imports(tmp_path / "m.py") == {"torch", "PIL"}


def named_paths() -> set[str]:
    """Every pipeline/models/serving file the page names in backticks, `{a,b}` expanded."""
    found = set()
    for ref in re.findall(r"`((?:pipeline|models|serving)/[\w/{},.]*\.py)`", DOC.read_text()):
        group = re.search(r"\{([\w,]+)\}", ref)
        found |= {ref.replace(group.group(0), alt) for alt in group.group(1).split(",")} if group else {ref}
    return found


def test_every_named_file_exists():
    missing = sorted(p for p in named_paths() if not (ROOT / p).is_file())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_module_has_its_line():
    modules = {p.relative_to(ROOT).as_posix() for package in ("pipeline", "models", "serving")
               for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"}
    unnamed = sorted(modules - named_paths())
    assert not unnamed, f"modules without a line in docs/architecture.md: {unnamed}"
