"""Saliency maps as pictures: the heat colour-mapped and blended over the image.

The PNG answer of ``POST /saliency`` is drawn over the upload as preprocessing sees it (EXIF
orientation, the model's channels, the centre square) at the upload's own resolution, capped at
:data:`MAX_SIDE` pixels: a 32×32 model still gives a picture a person can read. The map itself
stays at the model's resolution (``format=json``) and is only resampled for the picture.
numpy and Pillow only; the colours come from :mod:`pipeline.common.colormap`, like the evaluation figures.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.common.colormap import colorize

MAX_SIDE = 512  # longest side of a PNG answer; smaller uploads keep their own size
STRENGTH = 0.7  # blend weight of the hottest pixels (cold ones show the image)


def reduce_map(maps: np.ndarray) -> tuple[np.ndarray, float]:
    """C×H×W or H×W saliency → H×W in [0, 1] (max |value| over channels), and the divisor used."""
    heat = np.abs(maps).max(axis=0) if maps.ndim == 3 else np.abs(maps)
    scale = float(heat.max())
    return (heat / scale if scale > 0 else heat).astype(np.float32), scale


def display_heat(heat: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """``heat`` (H×W in [0, 1]) rescaled for the eye: divided by its ``percentile`` and clipped.

    Gradient maps are spiky: a handful of pixels hold the maximum and, scaled by it, the rest
    of the map is invisible. Clipping the top 1% (as Captum's ``visualize_image_attr`` does with
    ``outlier_perc``) shows where the mass is. The JSON answer keeps the unclipped map.
    """
    ceiling = float(np.percentile(heat, percentile))
    return np.clip(heat / ceiling, 0, 1) if ceiling > 0 else heat


def overlay_png(image: np.ndarray, heat: np.ndarray, strength: float = STRENGTH) -> bytes:
    """``image`` (C×H×W uint8) with ``heat`` (H×W in [0, 1], same H×W) blended over it, as PNG.

    The blend weight follows the heat, so cold regions show the image and hot ones the colour.
    """
    base = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    base = base.transpose(1, 2, 0).astype(np.float64)
    weight = strength * np.clip(heat, 0, 1)[..., None]
    blended = (1 - weight) * base + weight * colorize(heat)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(blended).astype(np.uint8)).save(buffer, "PNG")  # H×W×3 uint8: RGB
    return buffer.getvalue()


def display_side(short_side: int, image_size: int, max_side: int = MAX_SIDE) -> int:
    """The PNG's side: the upload's shorter side, capped at ``max_side``, never below the model's input."""
    return max(image_size, min(short_side, max_side))


def resample_heat(heat: np.ndarray, side: int) -> np.ndarray:
    """An H×W map in [0, 1] bilinearly resampled to side×side (float32, still in [0, 1])."""
    if heat.shape == (side, side):
        return heat.astype(np.float32)
    image = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))  # mode F
    return np.clip(np.asarray(image.resize((side, side), Image.Resampling.BILINEAR)), 0, 1)


def saliency_png(square: np.ndarray, heat: np.ndarray) -> bytes:
    """The PNG answer: ``heat`` (the model-resolution map in [0, 1]) over ``square``, the upload's
    centre square at display size (C×S×S uint8, :func:`serving.uploads.decode_for_display`)."""
    return overlay_png(square, resample_heat(display_heat(heat), square.shape[-1]))
