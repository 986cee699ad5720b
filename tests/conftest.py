"""Shared fixtures: small synthetic image folders and broken image files."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One tint per class, so a model can tell the classes apart.
TINTS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]])


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 30, side: int = 12, start: int = 0, seed: int = 0
) -> Path:
    """Write ``root/c<k>/img_<i>.png`` for i in [start, start + per_class).

    Every image is distinct noise around its class tint; the content depends only on
    (seed, class, i), so calling again with a larger ``start`` adds new images.
    """
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            rng = np.random.default_rng([seed, k, i])
            noise = rng.integers(-40, 41, (side, side, 3))
            pixels = np.clip(TINTS[k % len(TINTS)] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{k}" / f"img_{i:03d}.png")
    return root


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """The :func:`write_image_folder` factory, for tests that need several folders."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``tmp_path/data``: 3 classes (c0, c1, c2) × 30 distinct 12×12 RGB PNGs."""
    return write_image_folder(tmp_path / "data")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width``×``height`` gray pixels (no real pixel data): cheap bombs, 0-pixel files."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.fixture
def fake_png() -> Callable[[int, int], bytes]:
    """The :func:`png_header` builder."""
    return png_header


def _encoded(fmt: str, **options: object) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name → (bytes, the ImageError reason they must give)."""
    png, jpeg = _encoded("PNG"), _encoded("JPEG", quality=90)
    # Pillow refuses to open a 0×N PNG or BMP, but a placeable WMF with an empty bounding box
    # opens (as a stub) with size 0×2: the one way to reach the "zero_pixels" check from a file.
    wmf = struct.pack("<IHhhhhHIH", 0x9AC6CDD7, 0, 0, 0, 0, 40, 1440, 0, 0)
    wmf += struct.pack("<HHHIHIH", 1, 9, 0x300, 0, 0, 0, 0)
    return {
        "truncated.png": (png[: len(png) // 2], "corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], "corrupt"),
        "empty.png": (b"", "empty"),
        "notes.txt": (b"not an image, just text\n", "not_an_image"),
        "zero_width.png": (png_header(0, 5), "not_an_image"),
        "zero_width.wmf": (wmf, "zero_pixels"),
    }
