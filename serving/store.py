"""The exported model in BentoML's model store, and where the service finds its model.

    python -m serving.store import-export artifacts/export [--tag-version V]

``import-export`` copies a deployable folder (``classifier.onnx``, ``saliency.onnx``,
``model_card.json`` and, since monitoring, ``reference.npz``: the output of ``python -m
pipeline.export`` or of ``python -m pipeline.compare export-champion``) into a ``cnn-classifier`` model in the store
(``$BENTOML_HOME``, default ``~/bentoml``), labelled from its model card, and prints the tag.
Importing the same deployable again reuses the stored one. ``bentoml build`` packs it.

At serve time :func:`resolve_model_dir` turns ``SERVING_MODEL`` into a deployable folder whose
files match its card. This module imports bentoml and the contract only: the service uses it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.contract import CARD_FILE, CLASSIFIER_FILE, EXAMPLES_FILE, SALIENCY_FILE, ContractError, ModelCard

MODEL_NAME = "cnn-classifier"
DEFAULT_SPEC = f"{MODEL_NAME}:latest"
DEPLOYABLE_FILES = (CLASSIFIER_FILE, SALIENCY_FILE, CARD_FILE)
# Names that mean an MLflow alias, not a store tag or a folder (see resolve_alias).
MLFLOW_ALIASES = frozenset({"champion", "candidate"})


class ModelNotFound(LookupError):
    """``SERVING_MODEL`` names nothing usable; the message says what was tried."""


def deployable_files(card: ModelCard) -> list[str]:
    """What makes up the deployable: :data:`DEPLOYABLE_FILES` and every other file the card hashes
    (``reference.npz``, the monitoring reference, when the export wrote one)."""
    return [*DEPLOYABLE_FILES, *sorted(set(card.files) - set(DEPLOYABLE_FILES))]


def read_deployable(path: Path) -> ModelCard:
    """The card of the deployable folder ``path``, after checking both ONNX files against it."""
    try:
        card = ModelCard.read(path)
        card.verify_files(path)
    except ContractError as err:
        raise ModelNotFound(str(err)) from None
    return card


def check_model_dir(path: Path) -> Path:
    """Return ``path`` if it is a complete, consistent deployable, else raise :class:`ModelNotFound`."""
    read_deployable(path)
    return path


def resolve_alias(alias: str) -> str:
    """Map an MLflow alias (``champion``, ``candidate``) to a model-store tag.

    MLflow is not importable at serve time, so aliases travel as a store label that
    ``python -m serving.store import-export DIR --alias champion`` records. The newest import
    carrying the label wins. ``make serve-champion`` does not rely on it: it serves the exact
    tag it has just imported from the registry.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        imported = bentoml.models.list(MODEL_NAME)
    except NotFound:  # nothing imported yet
        imported = []
    labelled = [m for m in imported if m.info.labels.get("alias") == alias]
    if not labelled:
        raise ModelNotFound(
            f"SERVING_MODEL={alias!r}: no model in the store carries the MLflow alias {alias!r}; run "
            f"`python -m pipeline.compare export-champion --out artifacts/{alias}` and "
            f"`python -m serving.store import-export artifacts/{alias}` (or `make serve-champion`)"
        )
    return str(max(labelled, key=lambda m: m.info.creation_time).tag)


def model_spec(spec: str | None = None) -> str:
    """``spec``, else ``$SERVING_MODEL``, else ``cnn-classifier:latest``."""
    return spec or os.environ.get("SERVING_MODEL") or DEFAULT_SPEC


def store_tag(spec: str | None = None) -> str | None:
    """The model-store tag that ``spec`` (see :func:`model_spec`) names; None for a folder or an alias."""
    spec = model_spec(spec)
    if spec in MLFLOW_ALIASES or os.sep in spec or spec.startswith((".", "~")) or Path(spec).is_dir():
        return None
    return spec


def resolve_model_dir(spec: str | None = None) -> Path:
    """The folder holding ``classifier.onnx`` and ``saliency.onnx``.

    Args:
        spec: a folder path, a model-store tag (``cnn-classifier:abc``; ``cnn-classifier`` =
            latest) or an MLflow alias; ``None`` reads ``SERVING_MODEL`` and falls back to
            ``cnn-classifier:latest``.
    Returns:
        The folder (inside the model store for a tag).
    Raises:
        ModelNotFound: neither an existing folder nor a tag in the store.
    """
    spec = model_spec(spec)
    if spec in MLFLOW_ALIASES:
        spec = resolve_alias(spec)
    tag = store_tag(spec)
    if tag is None:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ModelNotFound(f"SERVING_MODEL={spec!r}: no such folder")
        return check_model_dir(path)
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(tag)
    except (BentoMLException, ValueError) as err:  # NotFound, or a malformed tag
        raise ModelNotFound(
            f"SERVING_MODEL={spec!r}: not a folder and not in the model store ({err}); "
            f"import one with `python -m serving.store import-export artifacts/export`"
        ) from None
    return check_model_dir(Path(model.path))


def import_export(export_dir: str | Path, alias: str = "", tag_version: str | None = None) -> str:
    """Put a deployable folder into the model store; reuse the stored copy if it is already there.

    Args:
        export_dir: ``classifier.onnx``, ``saliency.onnx`` and ``model_card.json``.
        alias: the MLflow alias the deployable was fetched under (``champion``), as a label.
        tag_version: the store version; default a fresh unique one.
    Returns:
        The tag, e.g. ``cnn-classifier:3xk5...``.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    export_dir = Path(export_dir)
    card = read_deployable(export_dir)
    labels = card.store_labels(alias)
    try:
        stored = bentoml.models.list(MODEL_NAME)
    except NotFound:
        stored = []
    for model in stored:  # the same files and labels: nothing to add
        if model.info.metadata.get("files") == card.files and model.info.labels == labels and \
                (tag_version is None or model.tag.version == tag_version):
            return str(model.tag)
    name = f"{MODEL_NAME}:{tag_version}" if tag_version else MODEL_NAME
    with bentoml.models.create(name=name, labels=labels, metadata=card.model_dump(exclude_none=True)) as model:
        # the ONNX files and, for a model exported with monitoring, reference.npz: every file the card hashes
        for file in deployable_files(card):
            shutil.copy2(export_dir / file, Path(model.path) / file)
        if (export_dir / EXAMPLES_FILE).exists():  # optional: the web UI's bundled test images
            shutil.copy2(export_dir / EXAMPLES_FILE, Path(model.path) / EXAMPLES_FILE)
    return str(model.tag)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Put the exported ONNX model into BentoML's model store.")
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import-export", help="import an export folder as a new model version")
    importer.add_argument("export_dir", type=Path,
                          help="folder with classifier.onnx, saliency.onnx, model_card.json")
    importer.add_argument("--alias", default="", help="the MLflow alias it was fetched under (a store label)")
    importer.add_argument("--tag-version", help="store version (default: a fresh unique one)")
    args = parser.parse_args(argv)
    from bentoml.exceptions import BentoMLException

    try:
        print(import_export(args.export_dir, args.alias, args.tag_version))
    except (ModelNotFound, BentoMLException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
