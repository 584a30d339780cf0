"""Decode stored images into the network's input: RGB, shorter side to the input size, centre crop, normalised.

Runs in the learner (never on the MQTT thread). An image that passed the
header checks at intake can still fail to decode (a corrupt body); it is
skipped and counted, never a crash.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models.zoo import Preprocessing


class Decoder:
    def __init__(self, preprocessing: Preprocessing, input_size: int):
        self.size = input_size
        self.mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(preprocessing.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, data: bytes) -> np.ndarray | None:
        """(3, size, size) float32, or None when the bytes do not decode."""
        rgb = load_rgb(data, self.size)
        if rgb is None:
            return None
        pixels = rgb.astype(np.float32).transpose(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std


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
