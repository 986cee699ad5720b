"""The comparison table of an experiment's MLflow runs: which params differ, the metric columns,
text or Markdown, and the per-epoch curves (``python -m pipeline.compare``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

# (column title, metric keys (first present wins), format) of the metric columns, in table order.
METRIC_COLUMNS = (("test top-1", ("test_top1",), "{:.4f}"), ("test top-k", ("test_top5",), "{:.4f}"),
                  ("train s", ("train_seconds",), "{:.1f}"),
                  # the run's mean; older runs only have the per-epoch value (its last epoch)
                  ("img/s", ("mean_images_per_s", "images_per_s"), "{:.0f}"))
CURVES = (("val_top1", "val top-1"), ("val_loss", "val loss"))


def differing_params(runs: list, skip: Sequence[str] = ("train.model",)) -> list[str]:
    """Param keys whose values are not the same in every run (a missing value counts as one)."""
    keys = sorted({k for r in runs for k in r.data.params} - set(skip))
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def sort_runs(runs: list, metric: str, ascending: bool = False) -> list:
    """Sort by ``metric`` (a metric key or ``start_time``); runs without it go last."""
    def value(run) -> float | None:
        raw = run.info.start_time if metric == "start_time" else run.data.metrics.get(metric)
        return None if raw is None or (isinstance(raw, float) and math.isnan(raw)) else float(raw)

    present = [r for r in runs if value(r) is not None]
    missing = [r for r in runs if value(r) is None]
    return sorted(present, key=value, reverse=not ascending) + missing


def table_rows(runs: list, params: Sequence[str], with_status: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and string cells: run, [status], model, the given params, metrics, short run id."""
    header = ["run", *(["status"] if with_status else []), "model", *params,
              *(title for title, _, _ in METRIC_COLUMNS), "run id"]
    rows = []
    for run in runs:
        metrics = run.data.metrics
        values = [next((metrics[k] for k in keys if k in metrics), None) for _, keys, _ in METRIC_COLUMNS]
        cells = [run.info.run_name or "-", *([run.info.status] if with_status else []),
                 run.data.params.get("train.model", run.data.tags.get("model", "-")),
                 *(run.data.params.get(k, "-") for k in params),
                 *("-" if v is None else fmt.format(v) for v, (_, _, fmt) in zip(values, METRIC_COLUMNS, strict=True)),
                 run.info.run_id[:8]]
        rows.append(cells)
    return header, rows


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A fixed-width text table, or a GitHub Markdown one; numeric columns right-aligned."""
    right = [bool(rows) and all(_numeric(row[i]) for row in rows) for i in range(len(header))]
    if markdown:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        rule = "|" + "|".join("---:" if r else "---" for r in right) + "|"
        return "\n".join([line(header), rule, *(line(row) for row in rows)])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def pad(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()
    return "\n".join([pad(header), "  ".join("-" * w for w in widths), *(pad(row) for row in rows)])


def plot_curves(client, runs: list, path: Path) -> None:
    """val top-1 and val loss per epoch (MLflow metric history) of each run, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for run in runs:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], marker=".",
                        label=run.info.run_name or run.info.run_id[:8])
        ax.set(xlabel="epoch", ylabel=title, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
