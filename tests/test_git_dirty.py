"""The git_dirty tag under a real ``dvc repro``: DVC's own writes are not source edits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib import provenance
from tests.conftest import sh, tool_env

ROOT = Path(__file__).resolve().parent.parent

# The stage records what the train stage would tag, and what git saw at that moment.
STAGE = (
    "import json, subprocess; from pipeline.lib import provenance; "
    "status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True, "
    "text=True).stdout; "
    "json.dump({'tags': provenance.current().tags(), 'status': status}, open('out/seen.json', 'w')); "
    "open('metrics/m.json', 'w').write(json.dumps({'value': len(open('src.py').read())})); "
    "open('plots/p.json', 'w').write(json.dumps([{'step': 1, 'value': 0.5}]))"
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC repository whose one stage, like train, writes git-tracked metrics and plots."""
    (tmp_path / "src.py").write_text("print('model code')\n")
    for folder in ("out", "metrics", "plots"):
        (tmp_path / folder).mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fit": {
        "cmd": f"mkdir -p out metrics plots && {sys.executable} -c \"{STAGE}\"",
        "deps": ["src.py"],
        "outs": ["out"],
        "metrics": [{"metrics/m.json": {"cache": False}}],
        "plots": [{"plots/p.json": {"cache": False}}],
    }}}))
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    sh(tmp_path, "dvc", "repro", "-q", env=_env())
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-q", "-m", "pipeline with committed metrics and plots")
    return tmp_path


def _env() -> dict[str, str]:
    return tool_env(PYTHONPATH=str(ROOT))


def _seen(repo: Path) -> dict:
    return json.loads((repo / "out" / "seen.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_clean_checkout_under_dvc_repro_is_clean_and_a_source_edit_is_dirty(repo: Path):
    sh(repo, "dvc", "repro", "--force", "-q", env=_env())
    seen = _seen(repo)
    # what made the old tag wrong: DVC had deleted the committed metrics and plots
    assert " D metrics/m.json" in seen["status"] and " D plots/p.json" in seen["status"], seen["status"]
    assert seen["tags"]["git_dirty"] == "false"
    # the committed metrics and plots came back byte for byte; dvc.lock records the new out/
    assert sh(repo, "git", "status", "--porcelain").split() in ([], ["M", "dvc.lock"])

    (repo / "src.py").write_text("print('edited model code')\n")
    sh(repo, "dvc", "repro", "-q", env=_env())
    assert _seen(repo)["tags"]["git_dirty"] == "true"


def test_dvc_owned_paths_come_from_dvc_yaml(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"a": {"cmd": "x", "outs": ["artifacts/a", {"artifacts/ckpt": {"persist": True}}],
                         "metrics": [{"metrics/a.json": {"cache": False}}], "plots": ["plots/a.json"]},
                   "b": {"cmd": "y"}},
        "plots": [{"plots/a.json": {"x": "epoch"}}, "artifacts/a/curves.png"]}))
    assert provenance.dvc_owned_paths(tmp_path) == ["dvc.lock", "artifacts/a", "artifacts/ckpt", "metrics/a.json",
                                                  "plots/a.json", "plots/a.json", "artifacts/a/curves.png"]
    assert provenance.dvc_owned_paths(tmp_path / "missing") == ["dvc.lock"]
