"""MobileNetV2 (width 1.0) in plain torch, and the map from torchvision's ImageNet weights to our parameter names.

The weights are torchvision's own ``mobilenet_v2-b0353104.pth`` (BSD-3-Clause),
shipped in this package (models/weights/, with torchvision's licence in NOTICE) so that
``pip install`` brings them and nothing is downloaded at run time.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from torch import nn

from models.layers import Backbone, ConvBNAct, InvertedResidual

WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (expand ratio, out channels, repeats, first stride), the paper's table 2.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
NUM_BLOCKS = sum(stage[2] for stage in STAGES)

# torchvision numbers the layers inside each block; the first block has no expand conv, so its numbers shift.
_FIRST_BLOCK_LAYERS = {
    "conv.0.0": "depthwise.conv",
    "conv.0.1": "depthwise.bn",
    "conv.1": "project.conv",
    "conv.2": "project.bn",
}
_BLOCK_LAYERS = {
    "conv.0.0": "expand.conv",
    "conv.0.1": "expand.bn",
    "conv.1.0": "depthwise.conv",
    "conv.1.1": "depthwise.bn",
    "conv.2": "project.conv",
    "conv.3": "project.bn",
}
_CONV_BN_LAYERS = {"0": "conv", "1": "bn"}  # the stem (features.0) and the head conv (features.18)
_FEATURES_KEY = re.compile(r"features\.(\d+)\.([\w.]+)\.(\w+)")


class MobileNetV2(Backbone):
    """Stem, 17 inverted residual blocks, 1x1 head conv to 1280: torchvision's ``features``, layer for layer."""

    name = "mobilenet_v2"
    embedding_size = HEAD_CHANNELS

    def __init__(self) -> None:
        layers: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, 2)]
        channels = STEM_CHANNELS
        for expand, out, repeats, stride in STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out, 3, stride if i == 0 else 1, expand))
                channels = out
        layers.append(ConvBNAct(channels, HEAD_CHANNELS))
        super().__init__(nn.Sequential(*layers))


def weights_path() -> Path:
    """The shipped ImageNet weights (installed with the package; nothing is downloaded)."""
    return Path(str(resources.files("models") / "weights" / "mobilenet_v2-b0353104.pth"))


def map_key(key: str) -> tuple[str, str] | None:
    """One key of torchvision's file -> ("backbone", our key) or ("classifier", "weight" | "bias"); None if foreign."""
    if key in ("classifier.1.weight", "classifier.1.bias"):
        return "classifier", key.removeprefix("classifier.1.")
    m = _FEATURES_KEY.fullmatch(key)
    if m is None:
        return None
    index, layer, param = int(m[1]), m[2], m[3]
    if index == 0 or index == NUM_BLOCKS + 1:
        table = _CONV_BN_LAYERS
    elif index == 1:
        table = _FIRST_BLOCK_LAYERS
    elif index <= NUM_BLOCKS:
        table = _BLOCK_LAYERS
    else:
        return None
    return ("backbone", f"features.{index}.{table[layer]}.{param}") if layer in table else None
