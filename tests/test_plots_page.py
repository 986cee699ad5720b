"""`make plots` (bin/plots): the page `dvc plots show` writes works offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN; offline its charts are blank.
bin/plots hands DVC a template with the three libraries inlined (fetched once with `npm pack`).
The test runs the real `dvc plots show` through bin/plots on the project's own plot definitions
and committed plot data, then opens the page in Debian's Chromium with every non-file request
refused, and asserts each of the five charts drew its SVG or canvas.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, sh, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CHARTS = ("loss", "accuracy", "confusion", "recall", "precision")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: install Debian's package (apt-get install -y chromium), as .ci/run does")
    return path


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dvc_plots/index.html of a git + DVC repo holding the project's plot definitions and data."""
    repo = tmp_path_factory.mktemp("plots_repo")
    plots = [p for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] if isinstance(p, dict)]
    assert sorted(next(iter(p)) for p in plots) == sorted(CHARTS)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    shutil.copytree(ROOT / "plots", repo / "plots")
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the custom `curves` template
    out = repo / "dvc_plots"
    done = subprocess.run([str(ROOT / "bin" / "plots"), "show", "-o", str(out)], cwd=repo, env=tool_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "index.html"


def test_the_page_loads_no_script_from_elsewhere(page: Path):
    html = page.read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in html
    assert not re.findall(r"""<(?:script|link)[^>]*(?:src|href)\s*=\s*["']?https?:""", html, re.I)
    assert html.count("vegaEmbed(") >= len(CHARTS)  # DVC's per-chart embed calls are in the page


def test_every_chart_renders_offline(page: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    refused: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                   "--disable-background-networking", "--disable-dev-shm-usage"])
        try:
            view = browser.new_page()

            def offline(route):
                if route.request.url.startswith("file:"):
                    route.continue_()
                else:
                    refused.append(route.request.url)
                    route.abort()

            view.route("**/*", offline)
            errors: list[str] = []
            view.on("pageerror", lambda error: errors.append(str(error)))
            view.goto(page.as_uri())
            # vega-embed adds an svg or canvas inside each chart's div once the chart is drawn
            view.wait_for_function(f"document.querySelectorAll('svg.marks, canvas.marks').length >= {len(CHARTS)}",
                                   timeout=60_000)
            drawn = view.locator("svg.marks, canvas.marks").count()
            view.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
        finally:
            browser.close()
    assert drawn == len(CHARTS), drawn
    assert not errors, errors
    assert not refused, refused
