"""The exported model in BentoML's model store, and where the service finds its model.

    python -m serving.store import-export artifacts/export [--tag-version V]

``import-export`` copies ``classifier.onnx``, ``saliency.onnx`` and ``export.json`` (the output
of ``python -m pipeline.export``) into a new ``cnn-classifier`` model in the store
(``$BENTOML_HOME``, default ``~/bentoml``), labelled with what the pipeline knows about it,
and prints the tag. ``bentoml build`` packs that model into the Bento.

At serve time :func:`resolve_model_dir` turns ``SERVING_MODEL`` into a folder holding the two
ONNX files. This module imports bentoml (and onnxruntime, lazily) only: the service uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

MODEL_NAME = "cnn-classifier"
DEFAULT_SPEC = f"{MODEL_NAME}:latest"
MODEL_FILES = ("classifier.onnx", "saliency.onnx")
SUMMARY_FILE = "export.json"
# Names that mean an MLflow alias, not a store tag or a folder (see resolve_alias).
MLFLOW_ALIASES = frozenset({"champion", "candidate"})


class ModelNotFound(LookupError):
    """``SERVING_MODEL`` names nothing usable; the message says what was tried."""


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata props of an ONNX file (``classes``, ``image_size``, ...), read with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def check_model_dir(path: Path) -> Path:
    """Return ``path`` if it holds both ONNX files, else raise :class:`ModelNotFound`."""
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise ModelNotFound(f"{path}: missing {', '.join(missing)} (run `python -m pipeline.export` first)")
    return path


def resolve_alias(alias: str) -> str:
    """Map an MLflow alias (``champion``, ``candidate``) to a model-store tag.

    MLflow is not importable at serve time, so aliases travel as a store label:
    ``python -m pipeline.compare export-champion`` writes ``"alias"`` into ``export.json`` and
    :func:`import_export` records it. The newest import carrying the label wins.
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


def import_export(export_dir: str | Path, tag_version: str | None = None) -> str:
    """Copy an export folder into the model store as a new ``cnn-classifier`` version.

    Args:
        export_dir: the export stage's output (two ONNX files and ``export.json``).
        tag_version: the store version; default a fresh unique one.
    Returns:
        The new tag, e.g. ``cnn-classifier:3xk5...``.
    """
    import bentoml

    export_dir = check_model_dir(Path(export_dir))
    summary_path = export_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    meta = onnx_metadata(export_dir / MODEL_FILES[0])
    metrics = summary.get("metrics") or json.loads(meta.get("metrics") or "{}")
    labels = {  # short strings: `bentoml models list` shows them and filters on them
        "model": meta.get("model", ""),
        "registered_model": str(summary.get("registered_model", "")),
        "mlflow_version": str(summary.get("version", "")),
        "mlflow_run_id": str(summary.get("mlflow_run_id", meta.get("mlflow_run_id", ""))),
        "alias": str(summary.get("alias", "")),  # set by `pipeline.compare export-champion`
        **{k: f"{v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    metadata = {
        "classes": json.loads(meta.get("classes", "[]")),
        "image_size": int(meta.get("image_size", 0)),
        "channels": int(meta.get("channels", 0)),
        "git_commit": meta.get("git_commit", ""),
        "data_md5": meta.get("data_md5", ""),
        "metrics": metrics,
    }
    name = f"{MODEL_NAME}:{tag_version}" if tag_version else MODEL_NAME
    with bentoml.models.create(name=name, labels=labels, metadata=metadata) as model:
        for file in (*MODEL_FILES, SUMMARY_FILE):
            if (export_dir / file).is_file():
                shutil.copy2(export_dir / file, Path(model.path) / file)
    return str(model.tag)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Put the exported ONNX model into BentoML's model store.")
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import-export", help="import an export folder as a new model version")
    importer.add_argument("export_dir", type=Path, help="folder with classifier.onnx, saliency.onnx, export.json")
    importer.add_argument("--tag-version", help="store version (default: a fresh unique one)")
    args = parser.parse_args(argv)
    from bentoml.exceptions import BentoMLException

    try:
        print(import_export(args.export_dir, args.tag_version))
    except (ModelNotFound, BentoMLException, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
