"""The update: the optimizer, and one step of it behind one interface whatever the device.

``EagerStep`` runs the step as written, on any device (a CPU step is
compute-bound, and head mode's step is one small matmul). ``CapturedStep`` runs
the fixed-shape step of :mod:`daemon.learning.static_step`, captured as a CUDA
graph on CUDA, made again when the head or the optimizer changed. The learner
chooses one when it starts (:func:`make_step`) and calls it the same way::

    outcome = step(head, optimizer, examples, classes, balance, meanwhile)

Both return the logits of the examples that decoded, as the model was before
the update (the prequential score), and whether the loss was finite; neither
moves the weights when it was not (the captured step zeroes its gradients, so
its weights move by weight decay alone). ``meanwhile`` runs while the step
does: the next step's store reads and decoding (on CUDA, while the GPU runs
this one). ``state_finite`` says whether every trained weight and optimizer
moment is still finite after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daemon.common.settings import TrainingSettings
from daemon.learning.divergence import state_is_finite
from daemon.learning.head import GrowingHead
from daemon.learning.inputs import Inputs
from daemon.learning.placement import Placement
from daemon.learning.static_step import StaticStep
from daemon.store.reader import StoredExample

log = logging.getLogger("sprout.learner")


@dataclass(frozen=True)
class Outcome:
    logits: torch.Tensor  # of the examples that decoded, before the update
    ok: list[bool]  # which examples decoded
    loss: float
    finite: bool  # the loss was finite: the weights moved


# -- the optimizer ---------------------------------------------------------------------------------


def make_optimizer(
    head: nn.Module, trainable: list[nn.Parameter], settings: TrainingSettings, capturable: bool
) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": settings.learning_rate}]
    if trainable:
        # A pretrained backbone wants gentler steps than a fresh head.
        groups.append({"params": trainable, "lr": settings.learning_rate / 10})
    if capturable:
        # Step count and moments on the device, updated without a host sync: what a graph can replay.
        return torch.optim.AdamW(groups, weight_decay=settings.weight_decay, foreach=True, capturable=True)
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A checkpoint's optimizer state into a fresh optimizer, under that optimizer's own implementation flags.

    A checkpoint written on a GPU (capturable, foreach) may resume on a CPU, and the other way round.
    """
    flags = {k: optimizer.param_groups[0][k] for k in ("capturable", "foreach")}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(flags)
        for param in group["params"]:
            state_of = optimizer.state.get(param, {})
            if torch.is_tensor(state_of.get("step")):  # capturable keeps it on the device, otherwise the host
                state_of["step"] = state_of["step"].to(
                    "cpu" if not flags["capturable"] else param.device, torch.float32
                )


# -- the loss --------------------------------------------------------------------------------------


def targets_of(
    examples: Sequence[StoredExample], ok: list[bool], classes: dict[str, int], device: torch.device
) -> torch.Tensor:
    return torch.tensor([classes[e.label] for e, good in zip(examples, ok, strict=True) if good], device=device)


def example_weights(targets: torch.Tensor, num_classes: int, balance: bool) -> torch.Tensor:
    """Each example's weight in the loss: 1 / (examples of its class in the step), or 1 without balancing."""
    if not balance:
        return torch.ones(len(targets), device=targets.device)
    counts = torch.bincount(targets, minlength=num_classes).float()
    return 1.0 / counts[targets]


def balanced_loss(logits: torch.Tensor, targets: torch.Tensor, balance: bool) -> torch.Tensor:
    """Cross-entropy in which every class present in the step weighs the same (``training.balance_classes``).

    A step holds a batch of new examples, often of one or two classes, and a replay
    sample spread over all of them: unweighted, the new classes dominate the gradient
    and the head drifts towards them (recency bias), which is most of what
    class-incremental streams forget.
    """
    if not balance:
        return nn.functional.cross_entropy(logits, targets)
    weights = example_weights(targets, logits.shape[1], balance)
    per_example = nn.functional.cross_entropy(logits, targets, reduction="none")
    return (per_example * weights).sum() / weights.sum()


# -- the two steps ---------------------------------------------------------------------------------


class EagerStep:
    """The step as written: embeddings (cached in head mode), head, loss, backward, optimizer step."""

    compiling_since: float | None = None
    captures = 0

    def __init__(self, inputs: Inputs, trainable: list[nn.Parameter], placement: Placement):
        self.inputs, self.trainable, self.placement = inputs, trainable, placement

    def __call__(
        self,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        examples: Sequence[StoredExample],
        classes: dict[str, int],
        balance: bool,
        meanwhile: Callable[[], None],
    ) -> Outcome | None:
        """None when none of the examples decoded (each one counted in ``Inputs.undecodable``)."""
        device = self.placement.device
        meanwhile()
        embeddings, ok = self.inputs.embeddings(examples, grad=bool(self.trainable))
        if not any(ok):
            return None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.placement.autocast):
            logits = head(embeddings).float()
        loss = balanced_loss(logits, targets_of(examples, ok, classes, device), balance)
        finite = bool(torch.isfinite(loss))
        optimizer.zero_grad(set_to_none=True)
        if finite:
            loss.backward()
            optimizer.step()
        return Outcome(logits.detach(), ok, float(loss.detach()), finite)

    def state_finite(self, head: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        return state_is_finite(head, self.trainable, optimizer, self.placement.device)


class CapturedStep:
    """The fixed-shape step (daemon/learning/static_step.py): a CUDA graph on CUDA, the same function run
    eagerly elsewhere (how it is tested without a GPU). Captured again when the head grew or shrank or the
    optimizer was replaced (a restore): its next call captures anew."""

    def __init__(
        self,
        inputs: Inputs,
        backbone: nn.Module,
        placement: Placement,
        rows: int,
        input_size: int,
        compile_backbone: bool = False,
    ):
        self.inputs, self.backbone, self.placement = inputs, backbone, placement
        self.rows, self.input_size = rows, input_size
        # The backbone's shapes never change (the step's rows and the input size are fixed; a new class
        # grows the head only), so it compiles once per process and every later capture reuses it.
        self.compiled = torch.compile(backbone, dynamic=False) if compile_backbone else None
        self.static: StaticStep | None = None
        self.compiling_since: float | None = None  # monotonic time the first compiled capture began
        self.captures = 0

    def __call__(
        self,
        head: GrowingHead,
        optimizer: torch.optim.Optimizer,
        examples: Sequence[StoredExample],
        classes: dict[str, int],
        balance: bool,
        meanwhile: Callable[[], None],
    ) -> Outcome | None:
        """None when none of the examples decoded (each one counted in ``Inputs.undecodable``)."""
        static = self._static_for(head, optimizer)
        x, ok = self.inputs.decoded(examples)
        if x is None:  # none of them decoded
            return None
        targets = targets_of(examples, ok, classes, self.placement.device)
        n = static.launch(x, targets, example_weights(targets, len(classes), balance))
        meanwhile()  # the next step's store reads and decoding, while the GPU runs this one
        logits, loss, finite = static.finish(n)
        return Outcome(logits, ok, loss, finite)

    def state_finite(self, head: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Checked inside the step, on the device, as of its last run."""
        return self.static is None or self.static.state_finite

    def _static_for(self, head: GrowingHead, optimizer: torch.optim.Optimizer) -> StaticStep:
        if self.static is not None and self.static.matches(head, optimizer):
            return self.static
        started = time.monotonic()
        if self.compiled is not None and not self.captures:
            self.compiling_since = started  # its warm-up compiles the backbone, for minutes perhaps
            log.info("compiling the backbone (training.compile_backbone): the first step waits for it")
        try:
            self.static = StaticStep(
                self.backbone,
                head,
                optimizer,
                self.rows,
                self.input_size,
                self.placement.device,
                self.placement.autocast,
                graph=self.placement.device.type == "cuda",
                forward=self.compiled,
            )
        finally:
            self.compiling_since = None
        self.captures += 1
        log.info(
            "training step captured as a CUDA graph%s: %d rows, %d classes (capture %d, %.1fs)",
            " with the compiled backbone" if self.compiled is not None else "",
            self.rows,
            head.num_classes,
            self.captures,
            time.monotonic() - started,
        )
        return self.static


def make_step(
    placement: Placement,
    inputs: Inputs,
    backbone: nn.Module,
    trainable: list[nn.Parameter],
    rows: int,
    input_size: int,
    training: TrainingSettings,
) -> EagerStep | CapturedStep:
    """The step this placement runs, chosen once: captured on CUDA for a backbone that trains, eager elsewhere."""
    if training.compile_backbone and not placement.graphed:
        log.warning(
            "training.compile_backbone applies to the CUDA-graphed step only (CUDA, a backbone that "
            "trains, cuda_graphs): ignored here"
        )
    if placement.graphed:
        return CapturedStep(inputs, backbone, placement, rows, input_size, training.compile_backbone)
    return EagerStep(inputs, trainable, placement)
