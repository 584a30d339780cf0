"""An image as a Sprout model takes it: RGB, shorter side to the input size (bilinear), centre crop, uint8.

This is the one implementation: the learner decodes training images with it
(``daemon/imaging.py`` imports it), the exporter verifies every candidate on
images made by it, and ``sprout-edge classify`` feeds models with it. An app
in another language reproduces these steps (docs/devices.md); normalisation
is inside the model's graph, so plain 0-255 RGB is all it ever needs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def load_rgb(data: bytes, size: int) -> np.ndarray | None:
    """(size, size, 3) uint8 RGB, exactly what an app hands an exported model; None when it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is much larger
            rgb = img.convert("RGB")
    except Exception:  # Pillow raises many types for corrupt data; all mean "cannot use this image"
        return None
    return np.asarray(resize_and_crop(rgb, size), dtype=np.uint8)


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear), then the centre square: no distortion, edges trimmed."""
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
