"""Compare the experiment's MLflow runs, promote a model version, fetch the champion for serving.

    python -m pipeline.compare                          # table of FINISHED runs, best test top-1 first
    python -m pipeline.compare --last 5 --md --plot curves.png
    python -m pipeline.compare promote --run <exp-name|run-id> [--force]
    python -m pipeline.compare promote --version 3
    python -m pipeline.compare export-champion --out artifacts/champion
    python -m pipeline.compare serve-source             # what `make serve` serves: champion, else latest export

A DVC experiment is one MLflow run named after it (see ``pipeline/lib/tracking.py``), so the
table lines up with ``dvc exp show``. The store is the one ``tracking.tracking_uri()`` names.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.contract import CARD_FILE, ModelCard
from pipeline.common.errors import UserError, run_command
from pipeline.lib import model_registry as registry
from pipeline.lib import tracking
from pipeline.lib.config import PARAMS_FILE, load_params
from pipeline.lib.run_table import differing_params, format_table, plot_curves, sort_runs, table_rows

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CompareError(UserError):
    """A bad argument or a missing run, version or store; the message says which."""


# --------------------------------------------------------------------------- store
def open_client():
    """An ``MlflowClient`` on the project's store; refuses to create an empty SQLite file."""
    import mlflow

    uri = tracking.tracking_uri()
    path = tracking.sqlite_path(uri)
    if path is not None and not path.exists():
        raise CompareError(f"{path}: no MLflow store; run the pipeline first (dvc exp run) "
                           "or point MLFLOW_TRACKING_URI at the store")
    return mlflow.MlflowClient(tracking.connect())


def fetch_runs(client, experiment: str, include_all: bool = False) -> list:
    """The experiment's runs, newest first; only FINISHED ones unless ``include_all``."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no MLflow experiment {experiment!r} (have: {', '.join(names) or 'none'})")
    status = "" if include_all else "attributes.status = 'FINISHED'"
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], status, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def select_runs(runs: list, wanted: Sequence[str] = (), last: int | None = None) -> list:
    """Keep the runs named (by run name, run id or id prefix) in ``wanted``, then the ``last`` newest."""
    if wanted:
        chosen = []
        for key in wanted:
            hits = [r for r in runs if key in (r.info.run_name, r.info.run_id) or
                    (len(key) >= 6 and r.info.run_id.startswith(key))]
            if not hits:
                names = ", ".join(r.info.run_name for r in runs) or "none"
                raise CompareError(f"no run named {key!r} among the listed runs (have: {names})")
            chosen.extend(h for h in hits if h not in chosen)
        runs = chosen
    if last is not None:
        if last < 1:
            raise CompareError(f"--last must be at least 1, got {last}")
        runs = sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)[:last]
    return runs


# --------------------------------------------------------------------------- registry
def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def alias_version(client, model_name: str, alias: str):
    """The model version ``alias`` points to, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        # A missing alias is INVALID_PARAMETER_VALUE in get_model_version_by_alias; the model's
        # alias map tells "not set" apart from real errors.
        aliases = client.get_registered_model(model_name).aliases or {}
    except MlflowException as err:
        if _not_found(err):
            return None
        raise
    return client.get_model_version(model_name, str(aliases[alias])) if alias in aliases else None


def find_run(client, key: str, experiment: str):
    """A run by id, else the newest FINISHED run of that name in ``experiment``."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.match(key):
        try:
            return client.get_run(key)
        except MlflowException as err:
            if not _not_found(err):
                raise
    runs = [r for r in fetch_runs(client, experiment) if r.info.run_name == key]
    if not runs:
        raise CompareError(f"no FINISHED run with id or name {key!r} in experiment {experiment!r}")
    if len(runs) > 1:
        log.warning("%d runs are named %r; using the newest, %s", len(runs), key, runs[0].info.run_id)
    return runs[0]


def resolve_version(client, model_name: str, version: int | None = None, run: str | None = None,
                    experiment: str = ""):
    """The model version given by number, or the newest version registered from ``run``."""
    from mlflow.exceptions import MlflowException

    if version is not None:
        try:
            return client.get_model_version(model_name, str(version))
        except MlflowException as err:
            if _not_found(err):
                raise CompareError(f"model {model_name!r} has no version {version}") from None
            raise
    found = find_run(client, run or "", experiment)
    run_id = found.info.run_id
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if not versions:
        raise CompareError(f"run {run!r} ({run_id}) has no registered version of {model_name!r}; "
                           "did its export stage run?")
    return max(versions, key=lambda v: int(v.version))


def best_run_id(client, experiment: str) -> str:
    """The id of the run the comparison table lists first: the best test top-1 of the FINISHED runs."""
    runs = [r for r in fetch_runs(client, experiment) if r.data.metrics.get("test_top1") is not None]
    if not runs:
        raise CompareError(f"no FINISHED run with a test_top1 metric in experiment {experiment!r}")
    return sort_runs(runs, "test_top1")[0].info.run_id


def version_top1(client, model_version) -> float | None:
    """Test top-1 of a model version: its ``test_top1`` tag, else its run's ``test_top1`` metric."""
    tag = (model_version.tags or {}).get("test_top1")
    if tag not in (None, ""):
        return float(tag)
    if model_version.run_id:
        return client.get_run(model_version.run_id).data.metrics.get("test_top1")
    return None


def promote(client, model_name: str, model_version, alias: str = "champion", force: bool = False) -> tuple[bool, str]:
    """Point ``alias`` at ``model_version`` unless its test top-1 is below the current holder's.

    Returns:
        (done, message). Not done means refused; ``force`` never refuses.
    """
    new = version_top1(client, model_version)
    current = alias_version(client, model_name, alias)
    label = f"version {model_version.version} (test top-1 {_fmt(new)})"
    if current is not None and current.version == model_version.version:
        return True, f"{model_name} {label} already is {alias!r}"
    if current is not None:
        old = version_top1(client, current)
        held = f"{alias} version {current.version} (test top-1 {_fmt(old)})"
        worse = new is None or (old is not None and new < old)
        if worse and not force:
            why = "not comparable with" if new is None else "below"
            return False, (f"refusing to promote {model_name} {label}: {why} the current {held}; "
                           "pass --force to promote anyway")
        note = f", replacing {held}" + (" (forced)" if worse else "")
    else:
        note = ""
    tracking.with_retry(lambda: client.set_registered_model_alias(model_name, alias, model_version.version))
    return True, f"{model_name} {label} is now {alias!r}{note}"


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"


def export_champion(client, model_name: str, out: Path, alias: str = "champion") -> ModelCard:
    """Write the ``alias`` version (both ONNX files and the card) into ``out``, laid out like
    ``artifacts/export`` so ``python -m serving.store import-export <out>`` takes it the same way."""
    model_version = alias_version(client, model_name, alias)
    if model_version is None:
        raise CompareError(f"model {model_name!r} has no {alias!r} version; promote one first "
                           "(python -m pipeline.compare promote --run NAME)")
    return registry.download(model_name, str(model_version.version), out)


def serving_source(model_name: str, champion_out: Path, export_dir: Path, alias: str = "champion") -> tuple[Path, str]:
    """What ``make serve`` serves: the ``alias`` version from the MLflow registry (written into
    ``champion_out``) if the store has one, else the latest export. Returns (folder, why)."""
    client = None
    try:
        client = open_client()
    except CompareError:  # no store yet: only an export can exist
        pass
    version = alias_version(client, model_name, alias) if client is not None else None
    if version is not None:
        card = export_champion(client, model_name, champion_out, alias)
        return champion_out, (f"serving the {alias}: {model_name} version {card.version} "
                              f"(test top-1 {_fmt(card.metrics.get('top1'))}, run {card.mlflow_run_id})")
    if not (export_dir / CARD_FILE).exists():
        raise CompareError(f"nothing to serve: no {alias!r} version of {model_name!r} in the MLflow registry and "
                           f"no {export_dir}; run the pipeline first (make run)")
    card = ModelCard.read(export_dir)
    return export_dir, (f"no {alias!r} in the MLflow registry (python -m pipeline.compare promote ...): serving "
                        f"the latest export {export_dir}: {model_name} version {card.version or '?'} "
                        f"(test top-1 {_fmt(card.metrics.get('top1'))}, run {card.mlflow_run_id})")


# --------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare the MLflow runs of the experiment (no command), promote a model version, "
                    "or download the champion for serving.")
    parser.add_argument("--params", default=PARAMS_FILE, type=Path, help="params file for the defaults")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: mlflow.experiment in params)")
    parser.add_argument("--sort", default="test_top1", help="metric to sort by, or start_time (default test_top1)")
    parser.add_argument("--asc", action="store_true", help="sort ascending (default descending)")
    parser.add_argument("--runs", nargs="+", default=(), metavar="RUN", help="only these run names or ids")
    parser.add_argument("--last", type=int, default=None, metavar="N", help="only the N newest runs")
    parser.add_argument("--all", action="store_true", help="include runs that are not FINISHED (adds a status column)")
    parser.add_argument("--md", action="store_true", help="print a Markdown table (for a CI comment)")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE",
                        help="write a PNG of val top-1 and val loss per epoch of the listed runs")
    parser.set_defaults(command=compare_cli)
    commands = parser.add_subparsers(title="commands", metavar="{promote,export-champion,serve-source}")

    def registry_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--model-name", default=None,
                         help="registered model (default: export.registered_model in params)")
        sub.add_argument("--alias", default="champion", help="registry alias (default champion)")
        sub.add_argument("--params", default=PARAMS_FILE, type=Path, help="params file for the defaults")
        return sub

    promote_parser = registry_command("promote", "Point the champion alias at a model version, unless it "
                                                 "tests worse than the current one.")
    which = promote_parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="model version number")
    which.add_argument("--run", help="run id or run name (= DVC experiment name); its newest version")
    which.add_argument("--best", action="store_true",
                       help="the run the table lists first (best test top-1, FINISHED); its newest version")
    promote_parser.add_argument("--experiment", default=None,
                                help="experiment to look run names up in (default: params)")
    promote_parser.add_argument("--force", action="store_true",
                                help="promote even if test top-1 is below the champion's")
    promote_parser.set_defaults(command=promote_cli)
    champion_parser = registry_command("export-champion", "Download the champion (classifier.onnx, "
                                                          "saliency.onnx, model_card.json) for serving.")
    champion_parser.add_argument("--out", type=Path, required=True, help="directory to write (replaced)")
    champion_parser.set_defaults(command=export_champion_cli)
    source_parser = registry_command("serve-source", "Print the folder `make serve` serves: the champion "
                                                     "(downloaded) if there is one, else the latest export.")
    source_parser.add_argument("--champion-out", type=Path, default=Path("artifacts/champion"),
                               help="where to write the champion (replaced)")
    source_parser.add_argument("--export", type=Path, default=Path("artifacts/export"), help="the latest export")
    source_parser.set_defaults(command=serve_source_cli)
    return parser


def compare_cli(args: argparse.Namespace) -> int:
    """The table (and plot) of the experiment's runs."""
    experiment = args.experiment or load_params(args.params).mlflow.experiment
    client = open_client()
    runs = select_runs(fetch_runs(client, experiment, include_all=args.all), args.runs, args.last)
    if not runs:
        raise CompareError(f"no {'' if args.all else 'FINISHED '}runs in experiment {experiment!r}")
    runs = sort_runs(runs, args.sort, ascending=args.asc)
    if all(args.sort not in r.data.metrics for r in runs) and args.sort != "start_time":
        keys = sorted({k for r in runs for k in r.data.metrics})
        raise CompareError(f"--sort {args.sort!r}: no run has that metric (have: {', '.join(keys)})")
    header, rows = table_rows(runs, differing_params(runs), with_status=args.all)
    print(format_table(header, rows, markdown=args.md))
    if args.plot:
        plot_curves(client, runs, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def promote_cli(args: argparse.Namespace) -> int:
    """``promote``: move the champion alias; exit 1 when refused."""
    params = load_params(args.params)
    model_name = args.model_name or params.export.registered_model
    client = open_client()
    experiment = args.experiment or params.mlflow.experiment
    run = best_run_id(client, experiment) if args.best else args.run
    model_version = resolve_version(client, model_name, args.version, run, experiment)
    done, message = promote(client, model_name, model_version, args.alias, args.force)
    print(message, file=sys.stdout if done else sys.stderr)
    return 0 if done else 1


def export_champion_cli(args: argparse.Namespace) -> int:
    """``export-champion``: the champion's deployable, laid out like ``artifacts/export``."""
    model_name = args.model_name or load_params(args.params).export.registered_model
    card = export_champion(open_client(), model_name, args.out, args.alias)
    print(f"{model_name} version {card.version} ({args.alias}, run {card.mlflow_run_id}) -> {args.out}")
    return 0


def serve_source_cli(args: argparse.Namespace) -> int:
    """``serve-source``: the folder on stdout, why on stderr."""
    model_name = args.model_name or load_params(args.params).export.registered_model
    folder, why = serving_source(model_name, args.champion_out, args.export, args.alias)
    print(why, file=sys.stderr)
    print(folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.compare [promote|export-champion] ...`` (console script ``cnn-compare``)."""
    from mlflow.exceptions import MlflowException

    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    status = {}

    def body() -> None:
        try:
            status["code"] = args.command(args)
        except MlflowException as err:  # the store refused: its message says why
            raise CompareError(f"MLflow: {tracking.redact(err.message)}") from None

    return run_command(body) or status.get("code", 0)


def promote_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cnn-promote``: same as ``python -m pipeline.compare promote``."""
    return main(["promote", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
