"""The one colormap for saliency maps: evaluation figures, the service's PNGs and the web UI.

numpy only (it ships in the Bento). Nine anchors of matplotlib's "inferno" (black → purple →
orange → pale yellow), linearly interpolated: perceptually ordered, readable in grey print, and
within 17/255 of matplotlib's 256-entry table everywhere (tests/test_render.py checks).
"""

from __future__ import annotations

import numpy as np

NAME = "inferno"
ANCHORS = np.array([[0, 0, 4], [33, 12, 74], [87, 16, 110], [138, 34, 106], [188, 55, 84],
                    [228, 90, 49], [249, 142, 9], [249, 203, 53], [252, 255, 164]], dtype=np.float64)


def colorize(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape; clipped) → the same shape + 3, uint8 RGB."""
    stops = np.linspace(0.0, 1.0, len(ANCHORS))
    clipped = np.clip(heat, 0.0, 1.0)
    rgb = [np.interp(clipped, stops, ANCHORS[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def table(entries: int = 256) -> np.ndarray:
    """``entries``×3 floats in [0, 1]: the colormap as a lookup table (matplotlib ``ListedColormap``)."""
    return colorize(np.linspace(0.0, 1.0, entries)).astype(np.float64) / 255.0


def css_gradient() -> str:
    """A CSS ``linear-gradient`` of the anchors, for the UI's colour legend."""
    stops = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f}) {100 * i / (len(ANCHORS) - 1):.1f}%"
                      for i, (r, g, b) in enumerate(ANCHORS))
    return f"linear-gradient(to right, {stops})"
