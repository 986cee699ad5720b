"""The review folder: images a person says the model got wrong, with the right label.

The service's ``/feedback`` endpoint calls :func:`write_feedback`; ``python -m pipeline.monitor
feedback`` moves the reviewed images into ``data/``. One image is two files named by the
sha256 of its bytes: ``<sha256>.<ext>`` (the upload, unchanged) and ``<sha256>.json`` (label,
model version, time). Both are written atomically, the JSON last, so a reader that finds the
JSON finds the whole image; the same image sent again keeps one copy and its latest label.
Uploads are stored here only, never in the prediction log.

stdlib and Pillow only: it ships in the Bento.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from pipeline.common.files import write_atomic, write_json

# Pillow format → file suffix the preprocess stage reads back.
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
            "PPM": ".ppm"}
MAX_BYTES = 20 * 2**20


class FeedbackError(ValueError):
    """The feedback cannot be stored (unknown label, not an image, too large); the message says why."""


def image_suffix(image: bytes) -> str:
    """The file suffix for an uploaded image's format; FeedbackError when it is not a stored format."""
    try:
        with Image.open(io.BytesIO(image)) as img:
            kind = img.format or ""
    except Exception:  # noqa: BLE001 - Pillow raises many types for non-images
        raise FeedbackError("the upload is not an image Pillow can read") from None
    if kind not in SUFFIXES:
        raise FeedbackError(f"image format {kind or 'unknown'} cannot go into the dataset "
                            f"(one of {', '.join(SUFFIXES)})")
    return SUFFIXES[kind]


def write_feedback(review_dir: str | Path, image: bytes, label: str, classes: Sequence[str], model_version: str,
                   predicted: str | None = None) -> Path:
    """Store one corrected image for review; returns the path of its JSON.

    Args:
        review_dir: the review folder (created if missing).
        image: the uploaded file's bytes, stored unchanged.
        label: the right class, one of ``classes``.
        classes: the served model's class names (its card's).
        model_version: the version that answered.
        predicted: what the model said, if known.

    Raises:
        FeedbackError: the label is not a class, the image is empty, too large or not an image.
    """
    if label not in classes:
        raise FeedbackError(f"label {label!r} is not a class of this model (one of: {', '.join(classes)})")
    if not image:
        raise FeedbackError("the upload is empty")
    if len(image) > MAX_BYTES:
        raise FeedbackError(f"the upload has {len(image)} bytes; feedback takes at most {MAX_BYTES}")
    suffix = image_suffix(image)
    digest = hashlib.sha256(image).hexdigest()
    folder = Path(review_dir)
    name = f"{digest}{suffix}"
    if not (folder / name).is_file():
        write_atomic(folder / name, lambda tmp: tmp.write_bytes(image))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return write_json(folder / f"{digest}.json", {"image": name, "sha256": digest, "label": label,
                                                  "predicted": predicted, "model_version": str(model_version),
                                                  "time": when})


def read_feedback(path: str | Path) -> dict:
    """One review item's JSON; FeedbackError naming the file when it is unreadable or incomplete."""
    path = Path(path)
    try:
        item = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FeedbackError(f"{path}: unreadable review item ({err})") from None
    missing = [key for key in ("image", "sha256", "label") if not isinstance(item.get(key), str)]
    if missing:
        raise FeedbackError(f"{path}: review item without {', '.join(missing)}")
    return item
