"""README.md and docs/*.md: every relative link resolves, every shell block is marked, and the
blocks marked runnable run as written, in order, in a fresh clone with no venv activated.

The marker is an HTML comment on the line right before a fenced ``sh`` block (GitHub renders
nothing for it):

- ``<!-- run -->``: run by :func:`test_marked_blocks_run_in_a_fresh_clone` (slow tier), in the
  order README.md, then the docs pages in :data:`PAGES` order, each block in a new ``bash``;
- ``<!-- not-run: why -->``: not run, for the reason given (it starts a server and blocks,
  needs your own files, a real remote, docker, ...).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, sh, tool_env

SHELL_LANGS = {"sh", "bash", "shell", "console"}
MARKER = re.compile(r"^<!--\s*(run|not-run)\s*(?::\s*(.*?))?\s*-->$")
# The order the runnable blocks run in: the README first, then these pages.
PAGES = ["own-data.md", "params.md", "pipeline.md", "experiments.md", "saliency.md", "api.md", "errors.md",
         "scaling.md", "deployment.md", "architecture.md"]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str  # "run", "not-run" or "" (none)
    reason: str
    code: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"), key=lambda p: (PAGES.index(p.name) if p.name in PAGES else 99, p.name))
    return [ROOT / "README.md", *docs]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each with the marker on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        found.append(Block(page, i + 1, fence.group(2).lower(), marker.group(1) if marker else "",
                           (marker.group(2) or "") if marker else "", "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


# ----------------------------------------------------------------------------- fast checks
def test_pages_are_found():
    names = [p.name for p in markdown_files()]
    assert names[0] == "README.md" and "architecture.md" in names and len(names) > 5, names


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_links_are_checked_for_real(tmp_path: Path):
    """The checker itself: a missing file and a missing anchor are caught, a good anchor passes."""
    (tmp_path / "a.md").write_text("# Title\n## Second part\n[ok](b.md#the-heading) [bad](c.md) [x](b.md#nope) "
                                   "[self](#second-part) [web](https://example.com) `[code](d.md)`\n")
    (tmp_path / "b.md").write_text("# The heading\n```sh\n# not a heading\n```\n")
    assert relative_links(tmp_path / "a.md") == ["b.md#the-heading", "c.md", "b.md#nope", "#second-part"]
    assert anchors(tmp_path / "b.md") == {"the-heading"}
    assert anchors(tmp_path / "a.md") == {"title", "second-part"}
    assert slug("Parameters (`params.yaml`)") == "parameters-paramsyaml"


def test_every_shell_block_is_marked():
    unmarked, no_reason = [], []
    for page in markdown_files():
        for block in blocks(page):
            if block.lang in SHELL_LANGS and not block.marker:
                unmarked.append(block.where())
            if block.marker == "not-run" and len(block.reason) < 5:
                no_reason.append(block.where())
            if block.marker and block.lang not in SHELL_LANGS:
                unmarked.append(f"{block.where()}: a marker on a ```{block.lang} block")
    assert not unmarked, f"shell blocks without <!-- run --> or <!-- not-run: why -->: {unmarked}"
    assert not no_reason, f"not-run blocks must say why: {no_reason}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_dvc_remote_add_keeps_the_committed_dvc_config(tmp_path: Path):
    """docs/scaling.md: `dvc remote add -d`, then `git add .dvc/config && git commit`. DVC rewrites the
    file (dropping comments), so the committed file must hold nothing that the rewrite loses."""
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-q", "-m", "project config")
    sh(tmp_path, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    diff = sh(tmp_path, "git", "diff", "--unified=0", ".dvc/config")
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert not removed, diff
    assert any("shared" in line for line in added), diff


# ----------------------------------------------------------------------------- the slow run
TINY = {  # the pipeline as committed, only smaller: the commands are the README's, the minutes are not
    "preprocess": {"image_size": 32, "workers": 1},
    "train": {"epochs": 2, "threads": 1, "device": "cpu"},
    "evaluate": {"saliency_per_class": 1},
}


def fresh_shell_env(home: Path) -> dict[str, str]:
    """A new login's environment: no venv on PATH or activated, no MLflow/DVC settings inherited."""
    env = {k: v for k, v in tool_env().items()
           if not k.startswith(("MLFLOW_", "DVC_", "PYTEST", "VIRTUAL_ENV", "BENTOML_"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if Path(p).resolve() != BIN.resolve() and Path(p) != BIN)
    return {**env, "HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"}


def runnable_blocks() -> list[Block]:
    return [b for page in markdown_files() for b in blocks(page) if b.marker == "run"]


def _stop_queue(clone: Path, env: dict[str, str]) -> None:
    subprocess.run(["bin/dvc", "queue", "stop", "--kill"], cwd=clone, env=env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _worker_pids(clone):
        time.sleep(1)
    for pid in _worker_pids(clone):
        os.kill(pid, 9)


def _worker_pids(clone: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if b"queue-worker" in (proc / "cmdline").read_bytes() and Path(os.readlink(proc / "cwd")) == clone:
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_marked_blocks_run_in_a_fresh_clone(tmp_path: Path):
    """Each `<!-- run -->` block, in order, in its own `bash -e` in a clone of this commit, then the
    outcomes the text promises: each experiment trained with its own params (none inherited),
    the champion is the best run, and the plots page loads nothing from elsewhere."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    clone = (tmp_path / "clone").resolve()
    sh(tmp_path, "git", "clone", "-q", "--no-local", str(ROOT), str(clone))
    sh(clone, "git", "checkout", "-q", head)
    settings = yaml.safe_load((clone / "params.yaml").read_text())
    for section, values in TINY.items():
        settings[section].update(values)
    (clone / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    sh(clone, "git", "commit", "-q", "-am", "tiny params for the documentation run")
    (clone / ".venv").symlink_to(BIN.parent)  # what `make setup` made; older than pyproject.toml's
    os.utime(clone / "pyproject.toml", (0, 0))  # ... so make does not reinstall it
    (tmp_path / "home").mkdir()
    env = fresh_shell_env(tmp_path / "home")

    ran = []
    try:
        for block in runnable_blocks():
            started = time.monotonic()
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=clone, env=env,
                                  capture_output=True, text=True, timeout=1500)
            ran.append(f"{block.where()} {time.monotonic() - started:.0f}s")
            output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            assert done.returncode == 0, f"{block.where()} failed ({done.returncode}):\n{block.code}\n{output}"
            assert "FileNotFoundError" not in output, f"{block.where()}:\n{output}"
    finally:
        _stop_queue(clone, env)
        print("\n".join(ran))

    # Each experiment ran with the committed params plus its own -S, nothing inherited
    with sqlite3.connect(clone / "mlflow.db") as db:
        params = {}
        for run_name, key, value in db.execute(
                "SELECT r.name, p.key, p.value FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
                "WHERE r.status = 'FINISHED' AND p.key IN ('train.lr', 'train.model', 'preprocess.image_size')"):
            params.setdefault(run_name, {})[key] = value
        # the queued and --temp runs wrote to the one store in the clone's root, never a copy in
        # .dvc/tmp, their artifacts beside it, and each registered its own version
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finished = dict(db.execute("SELECT run_uuid, artifact_uri FROM runs WHERE status = 'FINISHED'").fetchall())
        registered = {run_id for (run_id,) in db.execute("SELECT run_id FROM model_versions")}
    assert not list((clone / ".dvc" / "tmp").rglob("mlflow.db"))
    assert all(uri.startswith((clone / "mlruns").as_uri()) for uri in finished.values()), finished
    assert registered == set(finished), (registered, finished)
    lrs = sorted(float(p["train.lr"]) for p in params.values())
    assert lrs == [0.003, 0.01, 0.03, 0.1], params  # make run's, lenet-lr03 and the sweep's two
    assert all(p["train.model"] == "lenet5" and p["preprocess.image_size"] == "32" for p in params.values()), params
    assert params["lenet-lr03"]["train.lr"] == "0.03"
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"] == settings["train"]["lr"]
    # make plots: the page draws with scripts inlined, none from a CDN
    page = (clone / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "vegaEmbed(" in page and not re.search(r"<script[^>]*src=[\"']?https?:", page)
