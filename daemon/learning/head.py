"""The classifier head: a linear layer that grows one output per new label, without a restart.

Growing keeps every existing row of the weights and every existing entry of
the optimizer's state (AdamW's moments), so old classes predict exactly as
before and keep their learning history; the new row starts at zero logit
scale and zero moments. Removing an output (a class merged into another or
retired: daemon/store/labels.py) drops its row and its moments and keeps every
other one as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class GrowingHead(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int = 0):
        super().__init__()
        self.embedding_size = embedding_size
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        bound = 1 / math.sqrt(embedding_size)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(embeddings, self.weight, self.bias)

    def grow(self, extra: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Add ``extra`` outputs; carry the optimizer's per-parameter state over to the grown tensors."""
        if extra <= 0:
            return
        old_weight, old_bias = self.weight, self.bias
        bound = 1 / math.sqrt(self.embedding_size)
        new_rows = torch.empty(extra, self.embedding_size, device=old_weight.device, dtype=old_weight.dtype)
        nn.init.uniform_(new_rows, -bound, bound)
        self.weight = nn.Parameter(torch.cat([old_weight.detach(), new_rows]))
        self.bias = nn.Parameter(torch.cat([old_bias.detach(), old_bias.new_zeros(extra)]))
        if optimizer is not None:

            def pad(value: torch.Tensor) -> torch.Tensor:
                return torch.cat([value, value.new_zeros((extra, *value.shape[1:]))])

            _swap_param(optimizer, old_weight, self.weight, pad)
            _swap_param(optimizer, old_bias, self.bias, pad)

    def remove(self, index: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Drop output ``index``; the other outputs keep their weights and optimizer state, bit for bit."""
        if not 0 <= index < self.num_classes:
            raise IndexError(f"output {index} of {self.num_classes}")

        def without(value: torch.Tensor) -> torch.Tensor:
            return torch.cat([value[:index], value[index + 1 :]])

        old_weight, old_bias = self.weight, self.bias
        self.weight = nn.Parameter(without(old_weight.detach()))
        self.bias = nn.Parameter(without(old_bias.detach()))
        if optimizer is not None:
            _swap_param(optimizer, old_weight, self.weight, without)
            _swap_param(optimizer, old_bias, self.bias, without)


def _swap_param(
    optimizer: torch.optim.Optimizer,
    old: nn.Parameter,
    new: nn.Parameter,
    reshape: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Put ``new`` in ``old``'s place in the optimizer, its per-row state reshaped alike."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    optimizer.state[new] = {
        key: reshape(value) if torch.is_tensor(value) and value.shape == old.shape else value  # not AdamW's step count
        for key, value in state.items()
    }
