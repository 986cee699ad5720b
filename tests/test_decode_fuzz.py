"""A seeded mutation fuzzer on the service's decode path: nothing escapes but the declared image errors.

Thousands of byte-mutated files grown from small valid PNG, JPEG, GIF, BMP, WebP and TIFF
seeds, and hand-made malformed files of formats outside the allowlist (DDS, BLP, AVIF, SPIDER,
PSD, ICO ...), go through ``inspect_upload`` + ``decode_upload`` exactly as an upload does. Each
must give an array or an ``ImageRejected``/``PayloadTooLarge`` with a 4xx status.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from serving.errors import ImageRejected, PayloadTooLarge
from serving.settings import Settings
from serving.uploads import decode_upload, inspect_upload

# Pillow warns on many mutated files (corrupt EXIF, truncated tags): expected here, not news.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

SIZE, CHANNELS = 32, 1
SETTINGS = Settings(max_bytes=1_000_000, max_pixels=4_000_000, min_side=8, workers=1)
MUTATIONS_PER_SEED = 600  # × 6 seeds = 3,600 files, a few seconds


def encoded(fmt: str, mode: str = "RGB", side: int = 24, **options) -> bytes:
    rng = np.random.default_rng(len(fmt) * 31 + side)
    shape = (side, side + 5, 3) if mode == "RGB" else (side, side + 5)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, fmt, **options)
    return buffer.getvalue()


SEEDS = {
    "png": encoded("PNG"), "jpeg": encoded("JPEG", quality=80), "gif": encoded("GIF", mode="P"),
    "bmp": encoded("BMP"), "webp": encoded("WEBP", quality=70), "tiff": encoded("TIFF", compression="tiff_lzw"),
}


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits: byte flips, overwrites with boundary values, insertions,
    deletions, truncation, or a chunk copied elsewhere (the usual mutators of fuzzers)."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not out:
            break
        at = int(rng.integers(0, len(out)))
        kind = int(rng.integers(0, 6))
        if kind == 0:
            out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            out[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == 2:
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        elif kind == 3:
            del out[at:at + int(rng.integers(1, 32))]
        elif kind == 4:
            del out[at:]
        else:
            start = int(rng.integers(0, len(out)))
            chunk = out[start:start + int(rng.integers(1, 64))]
            out[at:at + len(chunk)] = chunk
    return bytes(out)


def outside_allowlist() -> dict[str, bytes]:
    """Small malformed files of formats the service does not decode (each raised past the
    handlers before the allowlist), and a float TIFF, which is in it."""
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 44 + struct.pack(
        "<2I4s", 32, 4, b"DXT9") + b"\0" * 40
    blp = b"BLP1" + struct.pack("<5I", 0, 8, 64, 64, 4) + b"\0" * 40
    avif = struct.pack(">I4s4sI4s4s", 24, b"ftyp", b"avif", 0, b"mif1", b"avif") + b"\0\0\0\x10meta" + b"\0" * 8
    spider_image = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), "F")
    spider = io.BytesIO()
    spider_image.save(spider, "SPIDER")
    float_tiff = io.BytesIO()
    values = np.full((16, 16), np.nan, dtype=np.float32)
    values[::2] = np.inf
    Image.fromarray(values, "F").save(float_tiff, "TIFF")
    psd = b"8BPS\0\1" + b"\0" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + b"\xff" * 16
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, 4000, 22)
    return {"dds": dds, "blp": blp, "avif": avif, "spider": spider.getvalue()[:-40],
            "spider_whole": spider.getvalue(), "float_tiff": float_tiff.getvalue(),
            "float_tiff_cut": float_tiff.getvalue()[:-60], "psd": psd, "ico": ico,
            "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "empty": b""}


def through_the_decoder(data: bytes) -> int:
    """200, or the status of the declared error; anything else propagates (the test fails)."""
    try:
        inspect_upload(data, "image", SETTINGS)
        array = decode_upload(data, "image", SIZE, CHANNELS, SETTINGS)
    except (ImageRejected, PayloadTooLarge) as err:
        status = int(err.error_code)
        assert 400 <= status < 500, f"{status}: {err}"
        assert str(err).startswith("image: "), str(err)  # names the field
        return status
    assert array.shape == (CHANNELS, SIZE, SIZE) and array.dtype == np.uint8
    return 200


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_mutated_files_give_an_array_or_a_declared_4xx(name: str) -> None:
    assert through_the_decoder(SEEDS[name]) == 200  # the seed itself is valid
    rng = np.random.default_rng(["png", "jpeg", "gif", "bmp", "webp", "tiff"].index(name))
    statuses: dict[int, int] = {}
    for _ in range(MUTATIONS_PER_SEED):
        status = through_the_decoder(mutate(SEEDS[name], rng))
        statuses[status] = statuses.get(status, 0) + 1
    assert set(statuses) <= {200, 400, 413, 415, 422}, statuses
    assert len(statuses) > 1, statuses  # the mutations did reach the error paths


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(outside_allowlist()))
def test_malformed_files_of_other_formats_are_refused(name: str) -> None:
    status = through_the_decoder(outside_allowlist()[name])
    if name.startswith("float_tiff"):
        assert status in (200, 422)  # TIFF is allowed: decoded, or refused as corrupt
    else:
        assert status in (400, 415), status  # never handed to a decoder outside the allowlist
