"""The drift check's outputs: ``drift.json``, a self-contained HTML report, the console table.

The report embeds its charts as PNG data URIs (matplotlib, Agg): one file a person can open
anywhere, no scripts and nothing fetched.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.common.features import Reference
from pipeline.common.files import write_json, write_text
from pipeline.lib.drift import Signal, Window

DRIFT_FILE = "drift.json"
REPORT_FILE = "report.html"


def verdict_line(signals: list[Signal], version: str, count: int) -> str:
    fired = [s.name for s in signals if s.drift]
    if fired:
        return f"DRIFT: model version {version or '?'}, last {count} predictions differ from the reference in " \
               f"{', '.join(fired)}"
    return f"no drift: model version {version or '?'}, last {count} predictions match the reference " \
           f"({len(signals)} tests, family-wise false-alarm rate <= {sum(s.threshold for s in signals):.2g})"


def table(signals: list[Signal]) -> str:
    """The console table: signal, test, statistic, p-value, threshold, verdict."""
    rows = [("signal", "test", "statistic", "p-value", "threshold", "verdict")]
    rows += [(s.name, s.test, f"{s.statistic:.4g}", f"{s.p_value:.4g}", f"p < {s.threshold:.4g}",
              "DRIFT" if s.drift else "ok") for s in signals]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def drift_document(signals: list[Signal], model: dict, window: dict) -> dict:
    """``drift.json``: top-level ``drift``, the model and window, one entry per signal."""
    return {"drift": any(s.drift for s in signals), "model": model, "window": window,
            "signals": {s.name: {k: v for k, v in s.as_dict().items() if k != "name"} for s in signals}}


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def charts(reference: Reference, window: Window, classes: list[str]) -> dict[str, str]:
    """Chart title → PNG data URI: each signal's reference and window side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(7, 3))
    positions = np.arange(len(classes))
    for offset, (label, values) in zip((-0.2, 0.2), (("reference", reference.predicted),
                                                    ("window", window.predicted)), strict=True):
        share = np.bincount(values, minlength=len(classes)) / max(len(values), 1)
        ax.bar(positions + offset, share, width=0.4, label=label)
    ax.set_xticks(positions, classes, rotation=45 if len(classes) > 12 else 0)
    ax.set(xlabel="predicted class", ylabel="share of predictions")
    ax.legend()
    out["Predicted classes"] = _png(fig)
    scores = reference.ood_scores(window.embedding, window.mean_intensity, window.std_intensity)
    for title, ref, cur, xlabel in (
            ("Confidence (top probability)", reference.confidence, window.confidence, "confidence"),
            ("Mean intensity of the model input", reference.mean_intensity, window.mean_intensity, "mean (0-1)"),
            ("Intensity standard deviation", reference.std_intensity, window.std_intensity, "std (0-1)"),
            ("Out-of-distribution score", reference.ood_score, scores, "squared Mahalanobis distance")):
        fig, ax = plt.subplots(figsize=(7, 3))
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
        ax.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
        ax.hist(cur, bins=bins, density=True, alpha=0.5, label="window")
        if xlabel.startswith("squared"):
            ax.axvline(reference.ood_threshold, color="k", linestyle="--", label="flag threshold")
        ax.set(xlabel=xlabel, ylabel="density")
        ax.legend()
        out[title] = _png(fig)
    # The embedding on the reference's first two principal axes.
    centre = reference.embedding.mean(axis=0)
    _, _, axes = np.linalg.svd(reference.embedding - centre, full_matrices=False)
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, values in (("reference", reference.embedding), ("window", window.embedding)):
        points = (values - centre) @ axes[:2].T
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.5, label=label)
    ax.set(xlabel="principal axis 1", ylabel="principal axis 2")
    ax.legend()
    out["Embedding (reference's principal axes)"] = _png(fig)
    return out


def html_report(signals: list[Signal], verdict: str, model: dict, window_info: dict, images: dict[str, str],
                uploads: list[dict]) -> str:
    """The whole page: verdict, signal table, upload facts, charts."""
    esc = html.escape
    rows = "".join(
        f"<tr class={'drift' if s.drift else 'ok'}><td>{esc(s.name)}</td><td>{esc(s.test)}</td>"
        f"<td>{s.statistic:.4g}</td><td>{s.p_value:.4g}</td><td>p &lt; {s.threshold:.4g}</td>"
        f"<td>{'DRIFT' if s.drift else 'ok'}</td><td>{esc(s.reference_summary)}</td>"
        f"<td>{esc(s.window_summary)}</td></tr>" for s in signals)
    formats = Counter(u.get("format") or "unknown" for u in uploads)
    sizes = [u.get("bytes", 0) for u in uploads]
    upload_text = (f"{len(uploads)} uploads; formats: {', '.join(f'{k} {v}' for k, v in formats.most_common())}; "
                   f"median {np.median(sizes):.0f} bytes" if uploads else "no upload facts in the window")
    figures = "".join(f"<h3>{esc(title)}</h3><img alt='{esc(title)}' src='{uri}'>" for title, uri in images.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report: {esc(str(model.get('name')))} \
v{esc(str(model.get('version')))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}tr.drift{{background:#fdd}}
.verdict{{font-size:1.2em;font-weight:bold}}</style></head><body>
<h1>Drift report</h1>
<p class="verdict">{esc(verdict)}</p>
<p>Model {esc(str(model.get('name')))} version {esc(str(model.get('version')))}; window: {esc(str(window_info))}</p>
<table><tr><th>signal</th><th>test</th><th>statistic</th><th>p-value</th><th>threshold</th><th>verdict</th>
<th>reference</th><th>window</th></tr>{rows}</table>
<p>Each test runs at the Bonferroni level (overall false-alarm rate &le; the sum of the thresholds).</p>
<h2>Uploads</h2><p>{esc(upload_text)}</p>
<h2>Charts</h2>{figures}
</body></html>
"""


def write_outputs(out: Path, signals: list[Signal], verdict: str, model: dict, window_info: dict,
                  images: dict[str, str], uploads: list[dict]) -> tuple[Path, Path]:
    """``out/drift.json`` and ``out/report.html``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    document = drift_document(signals, model, window_info)
    return (write_json(out / DRIFT_FILE, document),
            write_text(out / REPORT_FILE, html_report(signals, verdict, model, window_info, images, uploads)))
