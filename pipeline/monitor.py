"""Watch a served model: drift of its logged predictions against its reference; feedback into the dataset.

    python -m pipeline.monitor --log artifacts/predictions --model artifacts/export --last 300 --out artifacts/monitor
    python -m pipeline.monitor feedback --review artifacts/review --out data --model artifacts/export

The check reads the prediction log the service writes (``SERVING_LOG_DIR``), keeps the records of
the model version in ``--model`` (its ``model_card.json``), takes the last ``--last`` of them (or
those since ``--since``), and tests them against the deployable's ``reference.npz``
(:mod:`pipeline.lib.drift`). It prints a table and a verdict, writes ``drift.json`` and
``report.html`` to ``--out``, logs the result as an MLflow run tagged with the model version and,
with ``--fail-on-drift``, exits 3 on drift (for cron or CI).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.contract import CARD_FILE, REFERENCE_FILE, ModelCard, sha256_file
from pipeline.common.errors import UserError, run_command, setup_logging
from pipeline.common.features import Reference
from pipeline.common.predlog import DEFAULT_LOG_DIR, read_records
from pipeline.lib import drift, tracking
from pipeline.lib.config import load_params
from pipeline.lib.drift_report import DRIFT_FILE, REPORT_FILE, charts, table, verdict_line, write_outputs
from pipeline.lib.review import import_feedback

log = logging.getLogger(__name__)
DRIFT_EXIT = 3


def load_deployable(folder: Path) -> tuple[ModelCard, Reference]:
    card = ModelCard.read(folder)
    path = folder / REFERENCE_FILE
    if REFERENCE_FILE not in card.files or not path.is_file():
        raise UserError(f"{path}: no monitoring reference; export the model again (dvc repro export)")
    card.verify_files(folder)
    try:
        return card, Reference.load(path)
    except ValueError as err:
        raise UserError(str(err)) from None


def check(args: argparse.Namespace) -> bool:
    """The drift check; returns whether there is drift."""
    card, reference = load_deployable(args.model)
    version = args.version or card.version
    try:
        found = read_records(args.log, since=args.since, version=version or None)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    records = found.records if args.since else found.records[-args.last:]
    if found.skipped:
        log.warning("%s: %d line(s) were not whole records (a torn last line after a kill) and were skipped",
                    args.log, found.skipped)
    try:
        signals = drift.compare(reference, drift.Window.from_records(records), card.classes,
                                permutations=args.permutations)
    except ValueError as err:
        raise UserError(f"{args.log}: model version {version or '(none)'}: {err}") from None
    model = {"name": card.registered_model, "version": version, "card_sha256": sha256_file(args.model / CARD_FILE)}
    window = {"records": len(records), "first": records[0]["time"], "last": records[-1]["time"],
              "selection": f"since {args.since}" if args.since else f"last {args.last}"}
    verdict = verdict_line(signals, version, len(records))
    print(table(signals))
    print(verdict)
    uploads = [r["upload"] for r in records if r.get("upload")]
    json_path, html_path = write_outputs(args.out, signals, verdict, model, window,
                                         charts(reference, drift.Window.from_records(records), card.classes),
                                         uploads)
    print(f"wrote {json_path} and {html_path}")
    drifted = any(s.drift for s in signals)
    log_run(args, card, version, signals, drifted, len(records))
    return drifted


def log_run(args: argparse.Namespace, card: ModelCard, version: str, signals: list[drift.Signal], drifted: bool,
            count: int) -> None:
    """One MLflow run per check, in ``<experiment>-monitoring``, tagged with the model and version."""
    import mlflow

    experiment = f"{load_params(args.params).mlflow.experiment}-monitoring"
    with tracking.run(experiment, name=f"monitor-v{version or 'unversioned'}"):
        mlflow.set_tags({"model_version": version, "registered_model": card.registered_model,
                         "drift": str(drifted).lower(), "kind": "drift-check"})
        mlflow.log_params({"window": count, "selection": f"since {args.since}" if args.since else f"last {args.last}"})
        metrics = {"drift": float(drifted)}
        for s in signals:
            metrics[f"{s.name}_statistic"] = s.statistic
            metrics[f"{s.name}_p_value"] = s.p_value
        mlflow.log_metrics(metrics)
        for name in (DRIFT_FILE, REPORT_FILE):
            mlflow.log_artifact(str(args.out / name))


def feedback(args: argparse.Namespace) -> None:
    card = ModelCard.read(args.model)
    result = import_feedback(args.review, args.out, card.classes)
    for path in result.added:
        print(f"added {path}")
    print(f"{len(result.added)} image(s) added to {args.out}, {result.already_present} already there; "
          f"next: dvc add {args.out} && dvc repro")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["feedback"]:
        parser = argparse.ArgumentParser(prog="python -m pipeline.monitor feedback",
                                         description="Add reviewed feedback images to the dataset folder.")
        parser.add_argument("--review", default="artifacts/review", type=Path, help="the service's review folder")
        parser.add_argument("--out", default="data", type=Path, help="the dataset folder (default: data)")
        parser.add_argument("--model", default="artifacts/export", type=Path, help="deployable whose classes apply")
        args = parser.parse_args(argv[1:])
        setup_logging()
        return run_command(lambda: feedback(args))

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", default=DEFAULT_LOG_DIR, type=Path, help="the prediction log (SERVING_LOG_DIR)")
    parser.add_argument("--model", default="artifacts/export", type=Path, help="the deployable folder")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--last", default=300, type=int, help="the last N predictions (default 300)")
    selection.add_argument("--since", help="instead, every prediction since this UTC time (2026-12-06T04:00:00Z)")
    parser.add_argument("--version", default="", help="model version in the log (default: the card's)")
    parser.add_argument("--out", default="artifacts/monitor", type=Path, help="drift.json and report.html go here")
    parser.add_argument("--fail-on-drift", action="store_true", help=f"exit {DRIFT_EXIT} on drift")
    parser.add_argument("--permutations", default=drift.PERMUTATIONS, type=int, help="for the MMD p-value")
    parser.add_argument("--params", default="params.yaml", help="for the MLflow experiment name")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be at least 1")
    setup_logging()
    outcome = {"drift": False}

    def body() -> None:
        outcome["drift"] = check(args)

    code = run_command(body)
    return DRIFT_EXIT if code == 0 and outcome["drift"] and args.fail_on_drift else code


if __name__ == "__main__":
    sys.exit(main())
