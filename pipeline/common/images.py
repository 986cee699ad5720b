"""Image preprocessing: the one place that turns an image file into model pixels.

The preprocess stage and the BentoML service both call :func:`preprocess`, so training and
serving can never disagree on a pixel. numpy and Pillow only: the service imports this
module without torch.

Steps: decode (first frame) → EXIF orientation → channels (1 = luminance, 3 = RGB; alpha is
composited over white) → centre crop to a square → antialiased resize → uint8 C×H×W.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Mode families: Pillow's names for one-channel images, including 16/32-bit and float.
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
DEFAULT_MAX_PIXELS = 50_000_000

# An encoded image: a file path, the file's bytes, or a binary stream.
EncodedImage = str | Path | bytes | BinaryIO


class ImageError(ValueError):
    """The input is not a usable image; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _as_file(source: EncodedImage) -> tuple[BinaryIO | str, str]:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty", "empty input (0 bytes)")
        return io.BytesIO(source), "<bytes>"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.stat().st_size == 0:
            raise ImageError("empty", f"{path}: empty file (0 bytes)")
        return str(path), str(path)  # Pillow closes files it opened itself once loaded
    return source, getattr(source, "name", "<stream>")


def open_image(
    source: EncodedImage, max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] | None = None
) -> Image.Image:
    """Open an image lazily (header only) and check its size.

    ``formats`` restricts the decoders Pillow may try (``Image.open(formats=...)``); None = all.

    Raises:
        ImageError: empty, not an image, 0 pixels, or over ``max_pixels`` (decompression bomb).
    """
    fp, name = _as_file(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=formats)
    except UnidentifiedImageError:
        allowed = f" among {', '.join(formats)}" if formats else ""
        raise ImageError("not_an_image", f"{name}: not an image Pillow can read{allowed}") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError("too_many_pixels", f"{name}: image exceeds the pixel limit") from None
    except OSError as err:
        raise ImageError("unreadable", f"{name}: unreadable image ({err})") from None
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageError("zero_pixels", f"{name}: image has 0 pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels", f"{name}: {width}x{height} exceeds the pixel limit of {max_pixels}"
        )
    return img


def is_grayscale(img: Image.Image) -> bool:
    """True when the image carries one channel of information (gray palettes included)."""
    if img.mode in GRAY_MODES:
        return True
    if img.mode == "P":
        palette = np.frombuffer(img.palette.tobytes(), dtype=np.uint8)
        if img.palette.mode == "RGB" and palette.size % 3 == 0:
            rgb = palette.reshape(-1, 3)
            return bool((rgb == rgb[:, :1]).all())
    return False


def _to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
    values = np.asarray(img, dtype=np.float64)
    scale = 257.0 if img.mode != "F" or values.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")


def convert_channels(img: Image.Image, channels: int) -> Image.Image:
    """Return an ``L`` (channels=1) or ``RGB`` (channels=3) image; alpha goes over white."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if img.mode in HIGH_DEPTH_MODES:
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def decode(
    source: EncodedImage, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode the first frame, apply EXIF orientation and convert channels.

    JPEGs much larger than ``image_size`` are decoded at a reduced scale (``draft``), which is
    several times faster and loses nothing after the resize.
    """
    img = open_image(source, max_pixels, formats)
    name = getattr(img, "filename", "") or "<input>"
    try:
        if img.format == "JPEG":
            # draft keeps both sides >= image_size, so the square crop still covers it.
            img.draft(img.mode, (image_size, image_size))
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return convert_channels(img, channels)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError("corrupt", f"{name}: corrupt or truncated image ({err})") from None


def crop_resize(img: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to ``side``×``side`` with antialiasing."""
    width, height = img.size
    square = min(width, height)
    left, top = (width - square) / 2, (height - square) / 2
    box = (left, top, left + square, top + square)
    # resize(box=...) crops and resamples in one pass; reducing_gap adds a fast box pre-shrink.
    return img.resize((side, side), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


def to_array(img: Image.Image) -> np.ndarray:
    """``L``/``RGB`` image → contiguous uint8 array C×H×W."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def preprocess(
    source: EncodedImage, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> np.ndarray:
    """Image file, bytes or stream → uint8 C×H×W model input.

    Args:
        source: a path, the file's bytes, or a binary stream.
        image_size: the model input side in pixels (the output is square).
        channels: 1 or 3.
        max_pixels: refuse larger images (decompression bombs).
        formats: the Pillow formats to accept (None: any Pillow reads).
    Returns:
        ``np.ndarray`` of shape (channels, image_size, image_size), dtype uint8.
    Raises:
        ImageError: with ``reason`` in empty, not_an_image, unreadable, zero_pixels,
            too_many_pixels, corrupt.
    """
    return to_array(crop_resize(decode(source, image_size, channels, max_pixels, formats), image_size))
