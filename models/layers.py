"""Pieces both networks are built from: the clamped ReLU6, conv-BN-activation, the inverted residual, the Backbone base.

Parameter names are ours (``conv``, ``bn``, ``expand``, ``depthwise``,
``project``); each network module maps its original weight file onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClampedReLU6(nn.Module):
    """ReLU6 written as ``clamp(relu(x), max=6)``: the same floats, a better int8 model.

    litert-torch's PT2E int8 quantizer fuses a conv only with a plain ReLU. With
    nn.ReLU6 the conv output is quantized over its full, wide range before the
    clamp; with a ReLU it is quantized after it. Measured: top-1 agreement of the
    int8 model with float went from 0.685 to 0.865 after this rewrite.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.relu(x), max=6.0)


class TFSamePad(nn.Module):
    """TensorFlow's 'SAME' padding for a strided conv: the extra row and column go at the bottom and right.

    Weights trained in TensorFlow saw this asymmetric padding; a symmetric
    ``padding=k//2`` shifts every strided conv by half a pixel (measured on
    EfficientNet-Lite0 and the coffee photo: espresso at p=0.96 with this
    padding, 0.93 with symmetric). Computed from the input's size, so any input
    size pads as TensorFlow would.
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._total(x.shape[-2])
        pad_w = self._total(x.shape[-1])
        return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])

    def _total(self, size: int) -> int:
        out = -(-size // self.stride)
        return max((out - 1) * self.stride + self.kernel_size - size, 0)


class ConvBNAct(nn.Module):
    """Conv (no bias), BatchNorm, and the clamped ReLU6 unless ``act`` is False."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        bn_eps: float = 1e-5,
        tf_padding: bool = False,
    ):
        super().__init__()
        asymmetric = tf_padding and stride > 1  # stride 1 with an odd kernel: 'SAME' is symmetric anyway
        self.pad = TFSamePad(kernel_size, stride) if asymmetric else nn.Identity()
        padding = 0 if asymmetric else kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.act = ClampedReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block, also EfficientNet-Lite's (no squeeze-excitation): expand 1x1, depthwise, linear project 1x1.

    The expand conv is left out when ``expand_ratio`` is 1; the input is added
    back when the shape is unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        bn_eps: float = 1e-5,
        tf_padding: bool = False,
    ):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden, bn_eps=bn_eps) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(
            hidden, hidden, kernel_size, stride, groups=hidden, bn_eps=bn_eps, tf_padding=tf_padding
        )
        self.project = ConvBNAct(hidden, out_channels, act=False, bn_eps=bn_eps)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class Backbone(nn.Module):
    """A feature extractor: normalised images in, one pooled embedding per image out.

    Subclasses fill ``features`` (stem, blocks, head conv, in input-to-output
    order) and set ``name`` and ``embedding_size``. No classifier and no
    dropout: the head that learns the user's labels sits on top of this.
    """

    name: str
    embedding_size: int

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def blocks(self) -> list[nn.Module]:
        """The feature stages in input-to-output order; fine-tuning the last k trains ``blocks()[-k:]``."""
        return list(self.features)
