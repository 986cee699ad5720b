"""pipeline.common.images: formats, orientation, channels, bit depth, limits and the JPEG fast path."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.common import images


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def ramp(height: int, width: int) -> np.ndarray:
    """A smooth, asymmetric RGB pattern (red grows left→right, green top→bottom): JPEG-friendly."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 64 + 96], -1).astype(np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


SHAPES = [(40, 30, 16), (30, 40, 16), (17, 17, 32), (300, 90, 8)]  # width, height, output size


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("width", "height", "size"), SHAPES)
def test_output_is_uint8_channels_by_size_by_size(width: int, height: int, size: int, channels: int) -> None:
    out = images.preprocess(png(noise(height, width)), size, channels)
    assert out.shape == (channels, size, size)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_same_size_square_image_keeps_every_pixel() -> None:
    pixels = noise(24, 24)
    np.testing.assert_array_equal(images.preprocess(png(pixels), 24, 3), pixels.transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("WEBP", {"lossless": True})],
)
def test_lossless_formats_decode_to_the_source_pixels(fmt: str, options: dict) -> None:
    pixels = noise(24, 24)
    data = encode(Image.fromarray(pixels), fmt, **options)
    assert Image.open(io.BytesIO(data)).format == fmt
    np.testing.assert_array_equal(images.preprocess(data, 24, 3), pixels.transpose(2, 0, 1))


def test_grayscale_l_to_one_or_three_channels() -> None:
    gray = noise(20, 20)[..., 0]
    data = encode(Image.fromarray(gray, "L"), "PNG")
    np.testing.assert_array_equal(images.preprocess(data, 20, 1), gray[None])
    np.testing.assert_array_equal(images.preprocess(data, 20, 3), np.stack([gray] * 3))


def test_rgb_to_one_channel_is_luminance() -> None:
    pixels = noise(20, 20).astype(np.float64)
    luma = pixels @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as Pillow's convert("L")
    out = images.preprocess(png(pixels.astype(np.uint8)), 20, 1)
    assert np.abs(out[0] - luma).max() <= 1.0


def test_rgba_alpha_is_composited_over_white() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # black everywhere...
    rgba[:, :8] = (255, 0, 0, 255)  # ...left half opaque red
    rgba[:, 8:12, 3] = 0  # fully transparent black
    rgba[:, 12:, 3] = 128  # half transparent black
    out = images.preprocess(png(rgba), 16, 3)
    assert (out[:, :, :8] == np.array([255, 0, 0])[:, None, None]).all()
    assert (out[:, :, 8:12] == 255).all()
    assert (np.abs(out[:, :, 12:].astype(int) - 127) <= 1).all()


def test_palette_image_without_transparency_matches_its_rgb() -> None:
    paletted = Image.fromarray(ramp(24, 24)).quantize(16)
    assert paletted.mode == "P"
    expected = np.asarray(paletted.convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(images.preprocess(encode(paletted, "PNG"), 24, 3), expected)


def test_palette_transparency_becomes_white() -> None:
    index = np.zeros((16, 16), dtype=np.uint8)
    index[:, 8:] = 1  # colour 1 = blue, declared transparent below
    img = Image.fromarray(index, "P")
    img.putpalette([255, 0, 0, 0, 0, 255])
    out = images.preprocess(encode(img, "PNG", transparency=1), 16, 3)
    assert (out[:, :, :8] == np.array([255, 0, 0])[:, None, None]).all()
    assert (out[:, :, 8:] == 255).all()


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.repeat(np.array([0, 1000, 32768, 65535], dtype=np.uint16), 6)
    img = Image.fromarray(np.tile(values, (24, 1)))
    assert img.mode == "I;16"
    out = images.preprocess(encode(img, "PNG"), 24, 1)[0]
    assert set(out[:, :6].ravel()) == {0}
    assert set(out[:, 6:12].ravel()) == {4}  # 1000/257; clipping would give 255
    assert set(out[:, 12:18].ravel()) <= {127, 128}
    assert set(out[:, 18:].ravel()) == {255}


def test_gif_uses_the_first_frame() -> None:
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = images.preprocess(data, 16, 3)
    assert (out == np.array([255, 0, 0])[:, None, None]).all()


def test_exif_orientation_is_applied() -> None:
    pixels = ramp(48, 72)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    jpeg = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = images.preprocess(jpeg, 32, 3)
    upright = images.preprocess(png(np.rot90(pixels, k=-1)), 32, 3)
    assert mean_abs_diff(out, upright) < 2  # JPEG noise only
    for wrong in (pixels, pixels.transpose(1, 0, 2), np.rot90(pixels, k=1)):
        assert mean_abs_diff(out, images.preprocess(png(wrong), 32, 3)) > 20


def test_channels_other_than_1_or_3_are_refused() -> None:
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 2"):
        images.preprocess(png(noise(8, 8)), 8, 2)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (4, 4)), True),
        (lambda: Image.new("LA", (4, 4)), True),
        (lambda: Image.new("I;16", (4, 4)), True),
        (lambda: Image.new("RGB", (4, 4)), False),
        (lambda: Image.new("RGBA", (4, 4)), False),
        (lambda: Image.new("L", (4, 4)).convert("P"), True),  # gray palette
        (lambda: Image.fromarray(noise(4, 4)).quantize(4), False),  # colour palette
    ],
)
def test_is_grayscale(make: Callable[[], Image.Image], expected: bool) -> None:
    assert images.is_grayscale(make()) is expected


def test_decompression_bomb_is_refused_before_decoding(fake_png: Callable[[int, int], bytes]) -> None:
    with pytest.raises(images.ImageError) as err:
        images.preprocess(fake_png(100_000, 100_000), 8, 1)  # 10 gigapixels in 57 bytes
    assert err.value.reason == "too_many_pixels"


def test_max_pixels_limit() -> None:
    data = png(noise(20, 20))
    assert images.preprocess(data, 8, 3, max_pixels=400).shape == (3, 8, 8)
    with pytest.raises(images.ImageError, match="20x20 exceeds the pixel limit of 399") as err:
        images.preprocess(data, 8, 3, max_pixels=399)
    assert err.value.reason == "too_many_pixels"


def test_bad_inputs_give_their_reason(bad_files: dict[str, tuple[bytes, str]], tmp_path: Path) -> None:
    for name, (data, reason) in bad_files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(images.ImageError) as err:
            images.preprocess(path, 8, 3)
        assert err.value.reason == reason, name
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("upscale", "size", "drafted", "tolerance"),
    [
        (4, 224, (640, 427), 1.5),  # a smooth 4.4 MP photo, decoded at 1/4 scale
        (1, 100, (160, 107), 4.0),  # worst case: full detail, drafted to just above the output size
    ],
)
def test_jpeg_draft_nearly_matches_full_decode(
    upscale: int, size: int, drafted: tuple[int, int], tolerance: float
) -> None:
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0])  # 640×427
    photo = photo.resize((photo.width * upscale, photo.height * upscale), Image.Resampling.BICUBIC)
    jpeg = encode(photo, "JPEG", quality=90)
    assert images.decode(jpeg, size, 3).size == drafted  # the fast path was taken
    full = Image.open(io.BytesIO(jpeg))
    full.load()
    upright = images.convert_channels(ImageOps.exif_transpose(full), 3)
    reference = images.to_array(images.crop_resize(upright, size))
    fast = images.preprocess(jpeg, size, 3)
    assert fast.shape == reference.shape == (3, size, size)
    assert mean_abs_diff(fast, reference) < tolerance
