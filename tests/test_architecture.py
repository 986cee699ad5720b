"""The layering rules, read off the code: stages never import each other, models import nothing of
ours, serving imports no torch/mlflow/dvc, and every stage's dvc.yaml deps are its import closure."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib.codebase import ROOT, direct_imports, import_closure
from pipeline.lib.config import load_params

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = {name: stage["cmd"].split("-m ", 1)[1].split()[0] for name, stage in DVC["stages"].items()}
PROJECT_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for package in ("pipeline", "models", "serving") for p in (ROOT / package).rglob("*.py")
)
# The commands: pipeline/*.py that are not a package's __init__ (stages and CLIs).
COMMANDS = sorted(f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")


def test_every_dvc_stage_is_a_pipeline_module():
    assert STAGES == {"preprocess": "pipeline.preprocess", "train": "pipeline.train",
                      "evaluate": "pipeline.evaluate", "export": "pipeline.export"}


@pytest.mark.parametrize("module", PROJECT_MODULES)
def test_no_stage_imports_another_stage(module: str):
    stages = set(STAGES.values())
    imported = direct_imports(module) & stages
    assert not imported - {module}, f"{module} imports the stage(s) {sorted(imported)}: move what they share " \
                                    "into a shared module"


@pytest.mark.parametrize("module", PROJECT_MODULES)
def test_no_module_imports_a_command(module: str):
    """Commands (stages and CLIs) stand apart: shared code lives in pipeline.common or pipeline.lib."""
    imported = direct_imports(module) & set(COMMANDS)
    assert not imported - {module}, f"{module} imports the command(s) {sorted(imported)}"


@pytest.mark.parametrize("module", [m for m in PROJECT_MODULES if m.startswith("pipeline.common")])
def test_common_imports_only_common(module: str):
    """pipeline.common ships in the Bento whole, so it may not reach into lib, models or serving."""
    ours = {d for d in direct_imports(module) if d != "pipeline"}
    assert all(d.startswith("pipeline.common") for d in ours), (module, sorted(ours))


@pytest.mark.parametrize("module", [m for m in PROJECT_MODULES if m.startswith("serving")])
def test_serving_imports_only_common_of_the_pipeline(module: str):
    ours = {d for d in direct_imports(module) if d.startswith(("pipeline.", "models"))}
    assert all(d.startswith("pipeline.common") for d in ours), (module, sorted(ours))


def test_models_import_nothing_from_pipeline_or_serving():
    for module in (m for m in PROJECT_MODULES if m.startswith("models")):
        assert all(dep.startswith("models") for dep in direct_imports(module)), module


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_deps_are_the_stage_import_closure(stage: str):
    deps = {d for d in DVC["stages"][stage]["deps"] if d.endswith(".py")}
    closure = set(import_closure(STAGES[stage]))
    assert not closure - deps, f"dvc.yaml stage {stage!r} misses deps {sorted(closure - deps)}"
    assert not deps - closure, f"dvc.yaml stage {stage!r} lists files it does not import: {sorted(deps - closure)}"


RUNTIME_IMPORTS = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
root = sys.argv[2]
print(json.dumps(sorted({m.__file__[len(root) + 1:] for m in list(sys.modules.values())
                         if getattr(m, "__file__", None) and m.__file__.startswith(root + "/")})))
"""


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_closure_covers_what_python_really_imports(stage: str):
    """Cross-check of the ast reading: whatever importing the stage loads is in its closure."""
    done = subprocess.run([sys.executable, "-c", RUNTIME_IMPORTS, STAGES[stage], str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = {f for f in json.loads(done.stdout) if f.startswith(("pipeline/", "models/", "serving/"))}
    assert loaded, "nothing of ours was imported: the check would be vacuous"
    assert loaded <= set(import_closure(STAGES[stage])), sorted(loaded - set(import_closure(STAGES[stage])))


def test_serving_never_imports_torch_mlflow_or_dvc():
    """The Bento ships without them: importing the service (and what it imports) must not load them."""
    code = ("import sys, serving.service; bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'mlflow', 'dvc', 'torchvision'}); print(','.join(bad))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "BENTOML_DO_NOT_TRACK": "true",
                               "SERVING_MODEL": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""


def test_the_bento_ships_every_module_the_service_imports():
    """The Bento includes serving/ and pipeline/common/ whole, never a hand-picked list of files."""
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    shipped = {p for pattern in bentofile["include"] for p in
               (q.relative_to(ROOT).as_posix() for q in ROOT.glob(pattern))}
    needed = set(import_closure("serving.service"))
    assert needed <= shipped, sorted(needed - shipped)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_lock_matches_the_committed_code_and_params(stage: str):
    """dvc.lock records the code and params each stage last ran with: when it lags behind the code, a
    fresh clone's ``dvc repro`` reruns the stage and rewrites tracked files (dvc.lock, metrics/, plots/).
    Fix: ``dvc repro`` and commit dvc.lock with the code."""
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"][stage]
    for dep in locked["deps"]:
        path = ROOT / dep["path"]
        if path.is_file():
            assert hashlib.md5(path.read_bytes()).hexdigest() == dep["md5"], f"{dep['path']}: changed since dvc.lock"
    params = load_params(ROOT / "params.yaml").flat()
    for key, value in locked.get("params", {}).get("params.yaml", {}).items():
        assert params[key] == value, f"params.yaml {key}: {params[key]!r}, dvc.lock ran with {value!r}"
