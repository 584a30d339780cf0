"""The fine-tuning step at fixed shapes, so that on CUDA it is captured once as a CUDA graph and replayed.

On a GPU, online learning in small batches is launch-bound: an H100 ran a
full AdamW step of EfficientNet-Lite0 at 362 images/s at batch 8 eagerly in
fp32, and at 1,495 images/s in bf16 and channels-last, captured as a CUDA
graph (issue figures, torch 2.11). A graph replays every kernel of a step with
one launch, but only for the shapes and memory it was captured with. So:

- every step has ``rows`` rows (new examples plus replay at most): a smaller
  step is padded, and padding rows weigh 0 in the loss;
- the class-balanced weights (daemon/learning/step.py ``balanced_loss``) are
  computed on the host and copied into a fixed buffer with the targets;
- a new class grows the head (new tensors): the step is captured again on
  its next use. Classes arrive a handful of times in a model's life; a
  capture costs a few warm-up steps, whose effect on the weights and the
  optimizer is undone, so no example is learned twice. The optimizer state
  carries over (daemon/learning/head.py grows it with the head);
- a graph cannot skip its optimizer step when the loss is not finite, so the
  step zeroes the gradients instead: the weights then move by weight decay
  alone, and the learner counts the step as skipped, as on the CPU;
- the divergence guard's check that every trained weight and optimizer moment
  is still finite runs inside the step too, as one fused multi-tensor kernel
  (the one torch.amp's GradScaler checks gradients with), instead of two small
  kernels per tensor and a read back each step in the learner
  (``EagerStep.state_finite``: ~600 tensors for EfficientNet-Lite0 in full mode, its
  149 trained weights with their two moments and step count each).

Without a graph (``graph=False``) the same function runs eagerly: that is how
it is tested on machines without CUDA. The CPU learner does not use it: on a
CPU a step is compute-bound and its eager path stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from daemon.learning.head import GrowingHead

WARMUP_STEPS = 3  # on a side stream before capture, as PyTorch's CUDA graph notes ask (cuDNN autotuning, allocator)


class StaticStep:
    def __init__(
        self,
        backbone: nn.Module,
        head: GrowingHead,
        optimizer: torch.optim.Optimizer,
        rows: int,
        input_size: int,
        device: torch.device,
        autocast: bool,
        graph: bool,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``forward``: what runs the backbone, when not the module itself (``torch.compile(backbone)``); it
        is first called during the warm-up steps, so a compilation is over before the capture."""
        self.backbone, self.head, self.optimizer = backbone, head, optimizer
        self.forward = forward if forward is not None else backbone
        self.rows = rows
        self.device = device
        self.autocast = autocast
        self.num_classes = head.num_classes
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.x = torch.zeros(rows, 3, input_size, input_size, device=device).to(memory_format=layout)
        self.targets = torch.zeros(rows, dtype=torch.long, device=device)
        self.weights = torch.zeros(rows, device=device)
        self.logits = torch.zeros(rows, self.num_classes, device=device)
        self.loss = torch.zeros((), device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.state_bad = torch.zeros(1, device=device)  # set by the step: a weight or moment is not finite
        self._one = torch.ones(1, device=device)
        self.state_finite = True  # as of the last run()
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0
        if graph:
            self._capture()

    def matches(self, head: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Still valid for this head and optimizer (a grown or shrunk head or a restored optimizer needs a new step)."""
        # The parameters themselves, not their count: a head that lost an output (daemon/store/labels.py) and then
        # grew one has as many classes as at capture, in tensors the graph never saw.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return (
            head is self.head
            and optimizer is self.optimizer
            and len(params) == len(self._params)
            and all(a is b for a, b in zip(params, self._params, strict=True))
        )

    def run(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """One step on ``n <= rows`` examples: (their logits before the update, the loss, whether it was finite).

        After it, ``state_finite`` says whether every trained weight and optimizer moment is finite."""
        return self.finish(self.launch(x, targets, weights))

    def launch(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> int:
        """Start the step and return at once on CUDA (the host prepares the next one meanwhile); ``finish``
        waits for it. Returns the number of examples, for ``finish``."""
        n = x.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} examples in a step sized for {self.rows}")
        self.x[:n].copy_(x, non_blocking=True)
        self.x[n:].zero_()
        self.targets[:n].copy_(targets, non_blocking=True)
        self.targets[n:].zero_()
        self.weights[:n].copy_(weights, non_blocking=True)
        self.weights[n:].zero_()
        if self._graph is not None:
            self._graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._step()
        return n

    def finish(self, n: int) -> tuple[torch.Tensor, float, bool]:
        """Wait for the launched step: (the logits of its ``n`` examples, the loss, whether it was finite)."""
        # One read back per step: the loss, its finiteness and the state's (the caller logs and counts).
        loss, finite, bad = torch.stack([self.loss, self.finite.float(), self.state_bad[0]]).tolist()
        self.state_finite = bad == 0
        return self.logits[:n], loss, bool(finite)

    def _step(self) -> None:
        # No autocast weight cache: cached casts made during capture would be freed after it (PyTorch's
        # CUDA graph notes ask for cache_enabled=False).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            logits = self.head(self.forward(self.x)).float()
        per_example = nn.functional.cross_entropy(logits, self.targets, reduction="none")
        loss = (per_example * self.weights).sum() / self.weights.sum().clamp_min(1e-12)
        loss.backward()
        finite = torch.isfinite(loss)
        for p in self._params:
            if p.grad is not None:
                p.grad.masked_fill_(~finite, 0.0)  # no host sync: the flag stays on the device
        self.optimizer.step()
        self._check_state()
        self.logits.copy_(logits.detach())
        self.loss.copy_(loss.detach())
        self.finite.copy_(finite)

    def _check_state(self) -> None:
        """``state_bad`` to 1 if any trained weight or optimizer moment holds a NaN or an infinity.

        torch's fused non-finite check (GradScaler's): one pass over every tensor, flag on the device,
        no host sync. It also multiplies each tensor by its scale, here 1: every value stays as it is."""
        watched = [p for p in self._params if p.requires_grad]
        watched += [
            v
            for state in self.optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
        ]
        self.state_bad.zero_()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in watched:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():  # the op takes one dtype at a time
            torch._amp_foreach_non_finite_check_and_unscale_(group, self.state_bad, self._one)

    def _capture(self) -> None:
        """Warm up on a side stream, capture, then put weights and optimizer back as they were before."""
        saved_params = [p.detach().clone() for p in self._params]
        saved_state = {
            p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # gradients then live in the graph's own memory
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        with torch.no_grad():
            for p, saved in zip(self._params, saved_params, strict=True):
                p.copy_(saved)
            for p, state in self.optimizer.state.items():
                before = saved_state.get(p, {})
                for k, v in state.items():
                    if torch.is_tensor(v) and k in before:
                        v.copy_(before[k])  # in place: the graph holds these addresses
                    elif torch.is_tensor(v):
                        v.zero_()  # state the warm-up created: as if no step had run
        self._graph = graph
        self.captures += 1
