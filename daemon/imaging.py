"""Decode stored images into the network's input: RGB, shorter side to the input size, centre crop, normalised.

Runs in the learner (never on the MQTT thread). An image that passed the
header checks at intake can still fail to decode (a corrupt body); it is
skipped and counted, never a crash.
"""

from __future__ import annotations

import numpy as np

# The decode-resize-crop step is shared with devices (edge/preprocess.py), so that training, export
# verification and on-device inference see identical pixels. Re-exported for daemon code.
from edge.preprocess import load_rgb, resize_and_crop
from models.zoo import Preprocessing

__all__ = ["Decoder", "load_rgb", "resize_and_crop"]


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
