"""serving/ reaches frameworks through their public APIs only: an AST scan of every file.

Flagged: (a) an import of a module path with a ``_``-prefixed part, of a ``_``-prefixed name, or of
BentoML's and uvicorn's internals (also through ``importlib.import_module``/``__import__``);
(b) writing into a third-party module's state: an assignment, augmented assignment, ``del``,
``setattr``/``delattr`` or a mutating method call (``.update``, ``.append``, ...) whose target is
an attribute or subscript reached from a name bound by importing a third-party package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVING_FILES = sorted((ROOT / "serving").rglob("*.py"))
FORBIDDEN = ("_bentoml_impl", "_bentoml_sdk", "bentoml._internal", "uvicorn.protocols")
OURS = {"serving", "pipeline", "models", "tests"}
MUTATORS = {"update", "append", "extend", "insert", "pop", "popitem", "setdefault", "clear", "remove",
            "add", "discard", "__setitem__", "__delitem__", "__setattr__"}


def _private_path(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in OURS and top not in sys.stdlib_module_names and top != "__future__"


def _root_name(node: ast.AST) -> tuple[str | None, int]:
    """The name an attribute/subscript chain starts from, and how many links it has."""
    depth = 0
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node, depth = node.value, depth + 1
    return (node.id if isinstance(node, ast.Name) else None), depth


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Every use of a private module or write into a third-party module's state in ``source``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    modules: set[str] = set()  # local names bound to third-party modules or their members

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    def check_module(node: ast.AST, module: str) -> None:
        if _private_path(module) or any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
            flag(node, f"imports the private module {module}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check_module(node, alias.name)
                if _third_party(alias.name):
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            check_module(node, node.module)
            for alias in node.names:
                check_module(node, f"{node.module}.{alias.name}")
                if _third_party(node.module):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            first = node.args[0] if node.args else None
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and \
                    isinstance(first.value, str):
                check_module(node, first.value)
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("setattr", "delattr") and node.args:
            root, _ = _root_name(node.args[0])
            if root in modules:
                flag(node, f"{node.func.id} on {root}'s state")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            root, depth = _root_name(node.func.value)
            if root in modules and depth >= 1:
                flag(node, f"mutates {ast.unparse(node.func.value)} (state of the imported {root})")
        for target in [t for t in targets for t in (t.elts if isinstance(t, ast.Tuple) else [t])]:
            root, depth = _root_name(target)
            if root in modules and depth >= 1:
                flag(node, f"writes into {ast.unparse(target)} (state of the imported {root})")
    return found


@pytest.mark.parametrize("path", SERVING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_serving_uses_public_apis_only(path: Path) -> None:
    assert violations(path.read_text(), str(path.relative_to(ROOT))) == []


BAD = {
    "bentoml internals": "from bentoml._internal.server.http import instruments",
    "_bentoml_impl": "from _bentoml_impl import serde",
    "_bentoml_sdk": "import _bentoml_sdk.typing_utils as tu",
    "uvicorn protocols": "from uvicorn.protocols.http.h11_impl import H11Protocol",
    "private part of a path": "import prometheus_client._private.values",
    "private name": "from starlette.routing import _helper",
    "dynamic import": "import importlib\nmod = importlib.import_module('_bentoml_impl.serde')",
    "attribute of a module": "import uvicorn.config\nuvicorn.config.HTTP_PROTOCOLS = {}",
    "subscript of a module's table": "import uvicorn.config\nuvicorn.config.HTTP_PROTOCOLS['h11'] = 'x:Y'",
    "aliased module": "from uvicorn import config as c\nc.X = 1",
    "augmented assignment": "import bentoml\nbentoml.counter += 1",
    "annotated assignment": "import bentoml\nbentoml.flag: bool = True",
    "del": "import bentoml\ndel bentoml.models",
    "tuple target": "import bentoml\na, bentoml.b = 1, 2",
    "setattr": "import opentelemetry.instrumentation.asgi as asgi\nsetattr(asgi, 'OpenTelemetryMiddleware', object)",
    "setattr on a member": "from opentelemetry.instrumentation import asgi\nsetattr(asgi.X, 'y', 1)",
    "delattr": "import bentoml\ndelattr(bentoml, 'api')",
    "mutating call": "import bentoml\nbentoml.table.update({'a': 1})",
    "class of a package patched": "from starlette.requests import Request\nRequest.form = None",
}
GOOD = {
    "our own module state": "from serving import forms\nforms.X = 1",
    "a local object": "import bentoml\nservice = bentoml.Service\nx = {}\nx['a'] = 1",
    "stdlib": "import os\nos.environ.setdefault('A', 'b')",
    "calling a public API": "import bentoml\nbentoml.models.get('a:b')",
    "future import": "from __future__ import annotations",
}


@pytest.mark.parametrize("name", BAD)
def test_the_scan_flags_each_bad_pattern(name: str) -> None:
    assert violations(BAD[name]), name


@pytest.mark.parametrize("name", GOOD)
def test_the_scan_passes_public_use(name: str) -> None:
    assert violations(GOOD[name]) == [], name
