"""Decode stored images into the network's input: RGB, shorter side to the input size, centre crop.

Runs in the learner or its decoder processes (daemon/decoding.py), never on
the MQTT thread; normalisation follows on the learner's device. An image that passed the
header checks at intake can still fail to decode (a corrupt body); it is
skipped and counted, never a crash.
"""

from __future__ import annotations

# The decode-resize-crop step is shared with devices (edge/preprocess.py), so that training, export
# verification and on-device inference see identical pixels. Re-exported for daemon code.
from edge.preprocess import load_rgb, resize_and_crop

__all__ = ["load_rgb", "resize_and_crop"]
