"""Where and how the learner runs, chosen once when it starts: device, mode, autocast, the captured step.

As in nanoGPT's ``train.py``, these are settled at the top and the step's code
is the same in every mode:

- ``head``: the backbone is frozen; each example's embedding is computed once
  and cached (:mod:`daemon.learning.embeddings`).
- ``last_blocks`` / ``full``: the last k stages / every weight fine-tunes too
  (bf16 autocast on CUDA). BatchNorm statistics stay frozen: batches of 16-32
  are too small to re-estimate them.
- On CUDA a backbone that trains runs as one captured CUDA graph per step
  (:mod:`daemon.learning.static_step`), in channels-last layout.

>>> choose_mode("auto", torch.device("cpu"))
'head'
>>> Placement.of(torch.device("cpu"), "full", trains=True, cuda_graphs=True)
Placement(device=device(type='cpu'), mode='full', autocast=False, graphed=False)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from daemon.common.settings import ModelSettings
from models.layers import Backbone
from models.zoo import BackboneSpec


def choose_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device = 'cuda' but torch sees no CUDA device: use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_mode(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "full" if device.type == "cuda" else "head"
    return requested


def network_key(model: ModelSettings, spec: BackboneSpec) -> str:
    """What the cached embeddings depend on: backbone, its weights, input size."""
    weights = model.weights_file
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights else "shipped"
    return f"{spec.name}:{digest}:{model.input_size}"


def select_trainable(backbone: Backbone, mode: str, last_blocks: int) -> list[nn.Parameter]:
    """Freeze the backbone, then unfreeze what ``mode`` trains; returns those parameters (none in head mode)."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    if mode == "head":
        return []
    blocks = backbone.blocks()
    chosen = blocks if mode == "full" else blocks[-last_blocks:]
    params = [p for block in chosen for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


@dataclass(frozen=True)
class Placement:
    device: torch.device
    mode: str
    autocast: bool  # bf16 autocast: on CUDA, when the backbone trains
    graphed: bool  # the step captured as a CUDA graph: on CUDA, a backbone that trains, training.cuda_graphs

    @classmethod
    def of(cls, device: torch.device, mode: str, trains: bool, cuda_graphs: bool) -> Placement:
        cuda = device.type == "cuda"
        return cls(device, mode, autocast=cuda and mode != "head", graphed=cuda and trains and cuda_graphs)


def put_on(backbone: nn.Module, device: torch.device) -> None:
    """On the device, in eval mode (BatchNorm statistics stay frozen in every mode); channels-last on CUDA, the
    layout of cuDNN's fastest bf16 convolutions."""
    backbone.to(device).eval()
    if device.type == "cuda":
        # torch's stubs lack Module.to's memory_format keyword, which it documents and takes.
        backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
