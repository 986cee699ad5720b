"""The saliency pictures: one colormap, and the PNG drawn over the upload at its own resolution."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pipeline.common import colormap, images
from serving import render, uploads
from serving.settings import Settings


def test_colormap_is_matplotlibs_inferno() -> None:
    values = np.linspace(0, 1, 256)
    reference = np.rint(matplotlib.colormaps["inferno"](values)[:, :3] * 255)
    ours = colormap.colorize(values).astype(float)
    assert ours.shape == (256, 3) and colormap.colorize(values).dtype == np.uint8
    assert np.abs(ours - reference).max() <= 17  # the docstring's promise
    np.testing.assert_array_equal(colormap.colorize(np.array([0.0, 1.0, -3.0, 7.0])),
                                  colormap.ANCHORS[[0, -1, 0, -1]])  # ends exact, out of range clipped
    assert colormap.table().shape == (256, 3) and 0 <= colormap.table().min() <= colormap.table().max() <= 1


def test_overlay_without_heat_is_the_image() -> None:
    gray = np.full((1, 4, 4), 100, dtype=np.uint8)
    cold = np.asarray(Image.open(io.BytesIO(render.overlay_png(gray, np.zeros((4, 4))))))
    assert cold.shape == (4, 4, 3) and (cold == 100).all()
    hot = np.asarray(Image.open(io.BytesIO(render.overlay_png(gray, np.ones((4, 4)), strength=1.0))))
    assert (hot == colormap.ANCHORS[-1]).all()  # full heat at full strength: the colormap's top colour


def test_display_heat_clips_the_top_percent() -> None:
    # One extreme pixel and a 10% region at a twentieth of it: scaled by the maximum the region
    # is nearly invisible, clipped at the 99th percentile it is at full heat.
    heat = np.zeros((20, 20), dtype=np.float32)
    heat[:2, :] = 0.05
    heat[10, 10] = 1.0
    shown = render.display_heat(heat)
    assert shown[:2].min() == 1 and shown[10, 10] == 1 and shown[5:].sum() == 1  # the rest stays cold
    assert (render.display_heat(np.zeros((4, 4))) == 0).all()  # an all-zero map stays zero


def encoded(pixels: np.ndarray, fmt: str = "PNG", orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, fmt, exif=exif)
    return buffer.getvalue()


def drawn(data: bytes, heat: np.ndarray, channels: int) -> bytes:
    """The service's path: one decode (serving.uploads), then the overlay over its display square."""
    settings = Settings(max_bytes=10**9, max_pixels=10**8)
    model_input, square = uploads.decode_for_display(data, "image", heat.shape[0], channels, settings)
    assert model_input.shape == (channels, heat.shape[0], heat.shape[0])
    return render.saliency_png(square, heat)


@pytest.mark.parametrize(("width", "height", "side"), [(300, 200, 200), (1000, 800, 512), (20, 24, 32)])
def test_png_is_the_upload_square_at_its_own_size(width: int, height: int, side: int) -> None:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encoded(pixels)
    png = Image.open(io.BytesIO(drawn(data, np.zeros((32, 32), np.float32), 1)))
    assert png.size == (side, side)  # min(shorter side, 512), never under the model's 32
    # No heat: exactly what preprocessing makes of the upload at that size (oriented, grey, centre crop).
    want = images.preprocess(data, side, 1)[0]
    np.testing.assert_array_equal(np.asarray(png.convert("RGB"))[..., 0], want)


def test_png_follows_exif_orientation_and_places_the_heat() -> None:
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)  # 200 wide, 100 high: left half white
    pixels[:, :100] = 255
    # Orientation 6: the viewer rotates 90° clockwise, so the white half ends up on top (200 high, 100 wide).
    data = encoded(pixels, "JPEG", orientation=6)
    heat = np.zeros((8, 8), np.float32)
    heat[4:, :] = 1.0  # the model's bottom half is hot
    png = np.asarray(Image.open(io.BytesIO(drawn(data, heat, 3))), dtype=float)
    assert png.shape == (100, 100, 3)
    top, bottom = png[:40], png[60:]
    assert top.min() > 230  # the white upper half, untouched by heat (cold keeps the image)
    # The bottom (black in the square) is where the heat is: coloured with the colormap's top.
    np.testing.assert_allclose(bottom.mean((0, 1)), render.STRENGTH * colormap.ANCHORS[-1], atol=3)
