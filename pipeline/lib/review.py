"""Reviewed feedback into the dataset folder: new files only, named by content, classes checked.

Every item is checked before any file is copied, so a bad class name stops the import with
nothing half-added. An image lands in ``data/<class>/`` (``data/train/<class>/`` for a pre-split
dataset) as ``feedback-<sha256 prefix><suffix>``: the same image is never added twice, and
nothing that is already there is overwritten. ``dvc add data && dvc repro`` then trains with it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common.errors import UserError
from pipeline.common.feedback import FeedbackError, read_feedback
from pipeline.common.files import write_atomic
from pipeline.lib.dataset_folders import scan_dataset

PREFIX = "feedback-"
NAME_DIGITS = 16  # of the sha256 in a file name; the full digest is compared before skipping


@dataclass
class ImportResult:
    added: list[Path] = field(default_factory=list)
    already_present: int = 0


def _dataset_name(digest: str, suffix: str, folder: Path) -> tuple[Path, bool]:
    """(where the image goes, whether that file already holds it); a longer name on a prefix collision."""
    for digits in (NAME_DIGITS, 64):
        path = folder / f"{PREFIX}{digest[:digits]}{suffix}"
        if not path.exists():
            return path, False
        if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            return path, True
    raise UserError(f"{path}: exists with other content; refusing to overwrite")


def import_feedback(review_dir: str | Path, data_dir: str | Path, classes: Sequence[str]) -> ImportResult:
    """Copy every reviewed image of ``review_dir`` into the dataset at ``data_dir``.

    Args:
        review_dir: the folder :func:`pipeline.common.feedback.write_feedback` fills.
        data_dir: the dataset folder (``data``), in either layout.
        classes: the model's class names (its card's); every label must be one.

    Raises:
        UserError: naming the review file with a label that is not a class, an image that is
            missing or does not match its sha256, or a dataset folder that cannot be read.
    """
    review_dir = Path(review_dir)
    if not review_dir.is_dir():
        raise UserError(f"{review_dir}: review folder not found")
    items = []
    for path in sorted(review_dir.glob("*.json")):
        try:
            item = read_feedback(path)
        except FeedbackError as err:
            raise UserError(str(err)) from None
        if item["label"] not in classes:
            raise UserError(f"{path}: label {item['label']!r} is not a class of the model "
                            f"(one of: {', '.join(classes)})")
        image = review_dir / Path(item["image"]).name
        if not image.is_file() or hashlib.sha256(image.read_bytes()).hexdigest() != item["sha256"]:
            raise UserError(f"{path}: its image {image.name} is missing or does not match the sha256 it records")
        items.append((image, item))
    dataset = scan_dataset(data_dir)
    unlisted = sorted({item["label"] for _, item in items} - set(dataset.classes))
    if unlisted and dataset.classes_source != "folders":  # a fixed class list must name them too
        raise UserError(f"{data_dir}: class(es) {', '.join(unlisted)} of the feedback are not in the dataset's "
                        "class list (data/classes.txt or preprocess.classes)")
    result = ImportResult()
    for image, item in items:
        folder = dataset.class_folder(item["label"])
        target, present = _dataset_name(item["sha256"], image.suffix, folder)
        if present:
            result.already_present += 1
            continue
        write_atomic(target, lambda tmp, source=image: shutil.copyfile(source, tmp))
        result.added.append(target)
    return result
