"""Upload bytes → model pixels, refusing what is not an image or would cost more than its budget.

Cheap checks run before any pixel is decoded: the byte count (413), the header (format
allowlist 415, pixel count 413, side 422) and, for JPEGs, the number of scans (422): a
progressive JPEG may repeat its scans thousands of times in a few hundred KB, and each scan
costs a pass over every coefficient (a 224 KB 5000×5000 file with 3,000 scans decoded for
~45 s). Scans × pixels within ``SERVING_MAX_SCAN_PIXELS`` bound the work of every decode the
service starts, so a decode still running when its request's deadline has passed ends soon.
Every image then goes through :func:`pipeline.common.images.preprocess`, the function the
preprocess stage uses, so serving sees the pixels training saw.
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

import numpy as np

from pipeline.common.features import UploadFacts
from pipeline.common.images import ImageError, crop_resize, decode, open_image, preprocess, to_array
from serving.errors import ImageRejected, PayloadTooLarge
from serving.render import MAX_SIDE, display_side
from serving.settings import Settings

# ImageError.reason → status: 415 = not an image format we read, 413 = too big, 422 = broken or unusable.
REASON_STATUS = {
    "empty": HTTPStatus.BAD_REQUEST,
    "not_an_image": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    "too_many_pixels": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "unreadable": HTTPStatus.UNPROCESSABLE_ENTITY,
    "corrupt": HTTPStatus.UNPROCESSABLE_ENTITY,
    "zero_pixels": HTTPStatus.UNPROCESSABLE_ENTITY,
    "too_small": HTTPStatus.UNPROCESSABLE_ENTITY,
    "too_many_scans": HTTPStatus.UNPROCESSABLE_ENTITY,
}
# The formats decoded, handed to Pillow's own `formats=` so no other decoder ever sees an upload:
# the common web/camera formats. Pillow's rarer decoders (DDS, BLP, SPIDER, PSD, ...) are where
# fuzzed files raised errors past the handlers; nothing a client of an image classifier needs.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
SOS, EOI = 0xDA, 0xD9
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The number of scans (SOS markers) in a JPEG's marker structure, counting no further than ``stop_after``.

    Walks the segments by their lengths and skips each scan's entropy-coded data to the next
    marker (an 0xFF not followed by a stuffed 0x00 or a restart marker), so bytes inside
    metadata or pixel data are never mistaken for markers.
    """
    pos, scans, end = 2, 0, len(data)  # after SOI
    while pos + 4 <= end and scans <= stop_after:
        if data[pos] != 0xFF:
            break  # not a marker where one must be: the decoder will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == EOI:
            break
        if marker in STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker != SOS:
            continue
        scans += 1
        while (pos := data.find(b"\xff", pos)) != -1 and pos + 1 < end:
            following = data[pos + 1]
            if following == 0 or 0xD0 <= following <= 0xD7:
                pos += 2
                continue
            break
        if pos == -1:
            break
    return scans


def rejected(what: str, err: ImageError) -> ImageRejected:
    message = str(err).removeprefix("<bytes>: ").removeprefix("<input>: ")  # the name is `what`
    return ImageRejected(f"{what}: {err.reason}: {message}", error_code=REASON_STATUS[err.reason])


def prepare(data: bytes, what: str, image_size: int, channels: int, settings: Settings
            ) -> tuple[np.ndarray, UploadFacts]:
    """One upload checked and decoded in one call (one trip to a decoding thread): (uint8 C×H×W, its facts)."""
    facts = inspect_upload(data, what, settings)
    return decode_upload(data, what, image_size, channels, settings), facts


def inspect_upload(data: bytes, what: str, settings: Settings) -> UploadFacts:
    """What the upload is, from its header (no pixel decoding), or a 4xx exception.

    Refuses more bytes than ``max_bytes`` (413), what is not an allowed format (415), too many
    pixels (413), too small a side (422) and JPEGs whose scans × pixels exceed ``max_scan_pixels`` (422).
    """
    if len(data) > settings.max_bytes:
        raise PayloadTooLarge(f"{what}: {len(data)} bytes, over the limit of {settings.max_bytes}")
    try:
        header = open_image(data, settings.max_pixels, ALLOWED_FORMATS)
        width, height = header.size
        if min(width, height) < settings.min_side:
            raise ImageError("too_small", f"{width}x{height}: both sides must be >= {settings.min_side} px")
        most = settings.max_scan_pixels // (width * height)
        if header.format == "JPEG" and (scans := jpeg_scans(data, most)) > most:
            raise ImageError("too_many_scans", f"a {width}x{height} JPEG of more than {scans - 1} scans (progressive "
                                               f"passes): over the decoding budget of {settings.max_scan_pixels} "
                                               "scanned pixels (SERVING_MAX_SCAN_PIXELS)")
        return UploadFacts(len(data), header.format or "", width, height)
    except ImageError as err:
        raise rejected(what, err) from None
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on a hostile header is a bad image
        raise ImageRejected(f"{what}: corrupt: {type(err).__name__}: {err}"[:500]) from None


def decode_upload(data: bytes, what: str, image_size: int, channels: int, settings: Settings) -> np.ndarray:
    """Bytes that passed :func:`inspect_upload` → uint8 C×H×W, as the preprocess stage makes it."""
    try:
        return preprocess(data, image_size, channels, settings.max_pixels, ALLOWED_FORMATS)
    except ImageError as err:
        raise rejected(what, err) from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise many types on broken data (fuzz test)
        raise ImageRejected(f"{what}: corrupt: {type(err).__name__}: {err}"[:500]) from None


def decode_for_display(data: bytes, what: str, image_size: int, channels: int, settings: Settings
                       ) -> tuple[np.ndarray, np.ndarray]:
    """One decode → (the model input C×image_size×image_size, the centre square at display size for the PNG).

    The image is decoded once at the display size (JPEG draft at :data:`serving.render.MAX_SIDE`)
    and both arrays are resized from it; for uploads within that size both equal what
    :func:`decode_upload` and :func:`serving.render.upload_square` give.
    """
    try:
        image = decode(data, max(image_size, MAX_SIDE), channels, settings.max_pixels, ALLOWED_FORMATS)
        square = crop_resize(image, display_side(min(image.size), image_size))
        return to_array(crop_resize(image, image_size)), to_array(square)
    except ImageError as err:
        raise rejected(what, err) from None
    except Exception as err:  # noqa: BLE001 - as in decode_upload
        raise ImageRejected(f"{what}: corrupt: {type(err).__name__}: {err}"[:500]) from None


def read_file(path: Path, what: str, settings: Settings) -> bytes:
    """A file's bytes for an in-process caller, refused (413) before reading when over ``max_bytes``."""
    size = path.stat().st_size
    if size > settings.max_bytes:
        raise PayloadTooLarge(f"{what}: {size} bytes, over the limit of {settings.max_bytes}")
    return path.read_bytes()
