"""An image as a Sprout model takes it: upright RGB, shorter side to the input size (bilinear), centre crop, uint8.

This is the one implementation: the learner decodes training images with it
(daemon/learning/decoding.py), the exporter verifies every candidate on
images made by it, and ``sprout-edge classify`` feeds models with it. An app
in another language reproduces these steps (docs/devices.md); normalisation
is inside the model's graph, so plain 0-255 RGB is all it ever needs.

HEIC/HEIF (iPhones' default) decodes through the pillow-heif package, registered
with Pillow here, on import, for the learner, the daemon's intake checks
(daemon/ingest/wire.py) and devices alike. Without it HEIC does not decode, and the
daemon rejects it saying which package to install.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

try:
    import pillow_heif
except ImportError:
    HEIF_SUPPORTED = False
else:
    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True


def load_rgb(data: bytes, size: int) -> np.ndarray | None:
    """(size, size, 3) uint8 RGB, upright, exactly what an app hands an exported model; None when it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG: decode at a reduced scale when it is much larger (before anything loads the image). Not
            # HEIF: there draft swaps in the embedded thumbnail, a separately encoded picture an edit can leave stale.
            if img.format != "HEIF":
                img.draft("RGB", (size, size))
            # Phones store photos as the sensor saw them, with an EXIF tag saying how to turn them upright.
            # pillow-heif has already applied HEIF's own rotation, and cleared the tag.
            ImageOps.exif_transpose(img, in_place=True)
            # Resized here, before closing frees the pixels: an RGB image (JPEG, HEIF) without a full-size
            # copy, which for a 12 MP HEIC is 36 MB.
            rgb = resize_and_crop(img if img.mode == "RGB" else img.convert("RGB"), size)
    except Exception:  # Pillow raises many types for corrupt data; all mean "cannot use this image"
        return None
    return np.asarray(rgb, dtype=np.uint8)


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear), then the centre square: no distortion, edges trimmed."""
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
