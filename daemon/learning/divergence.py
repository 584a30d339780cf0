"""Divergence: telling that the model went non-finite, and the good state it goes back to.

A step whose loss is not finite is skipped (the weights stay as they were, or
move by weight decay alone in the captured step); a run of
``training.divergence_restore_after_steps`` of them, or weights or optimizer
moments that are not finite themselves, mark the learner ``diverged``. Its
thread (daemon/learning/training.py) then calls ``Learner.recover`` with the
last checkpoint: the network and its optimizer go back to it, or, with no
usable checkpoint, to the weights learning started from.
"""

from __future__ import annotations

import torch
from torch import nn

from daemon.common.settings import ModelSettings
from daemon.learning.checkpoint import Checkpoint
from models import zoo


def state_is_finite(
    head: nn.Module, trainable: list[nn.Parameter], optimizer: torch.optim.Optimizer, device: torch.device
) -> bool:
    """True when every learned weight and every optimizer moment is finite (frozen weights cannot change)."""
    tensors = [p.detach() for p in head.parameters()] + [p.detach() for p in trainable]
    tensors += [
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()
    ]
    # One flag per tensor and a single read back: one device sync per step, not one per tensor.
    # (AdamW keeps its step count on the CPU even when the weights are on the GPU.)
    flags = [t.isfinite().all().to(device) for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def fits(checkpoint: Checkpoint | None, config_digest: str, labels: list[str]) -> bool:
    """Whether a checkpoint can be gone back to: the same network and mode, and a label map this one extends."""
    return (
        checkpoint is not None
        and checkpoint.config_digest == config_digest
        and labels[: len(checkpoint.labels)] == list(checkpoint.labels)
    )


def reload_starting_backbone(backbone: nn.Module, model: ModelSettings, seed: int) -> None:
    """The weights the learner started from (``zoo.build_starting_network``), loaded in place: its trainable
    parameters stay the same objects."""
    start = zoo.build_starting_network(model.backbone, weights_file=model.weights_file, seed=seed)
    backbone.load_state_dict(start.state_dict())
