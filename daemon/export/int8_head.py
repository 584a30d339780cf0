"""The int8 file's classifier distilled on its own int8 backbone's embeddings, towards the float head's outputs.

Bias correction (bias_correction.py) takes out the mean error the int8
backbone makes on the embedding; the rest of the error differs from image to
image. A classifier that sees the int8 embeddings of training examples and
learns to give the float head's probabilities on them (its float
embeddings) absorbs some of that too: the student starts from the
bias-corrected head and takes full-batch Adam steps on the cross-entropy
to the float head's softmax, held near the float weights by an L2 term.
Only the float model's outputs are the target, no labels: the file keeps
following the float model the gates compare it with.

The data are a stable sample of stored training examples (images.py
``distillation_sample``): their float embeddings are kept per frozen
backbone, their int8 ones per full conversion (``<state>/export-cache/
embeddings/distillation-float.npz``, ``distillation-int8.npz``). Both run at
full conversions only: the float backbone, the costly part (~15 ms an image
at 128 px on 2 cores), on at most a quarter of the sample each time, the
int8 file (~2 ms an image, in a probe process) on every example with a float
embedding. A patched export distils on what its conversion kept. docs/quantization.md records what it
gained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from daemon.export.bias_correction import int8_embeddings
from daemon.export.head_patch import Head
from daemon.export.head_verification import Embeddings

log = logging.getLogger("sprout.export")

STEPS = 200  # full-batch Adam steps; 50-200 gave the same top-1 on Fashion-MNIST and digits
LEARNING_RATE = 1e-3
L2 = 1e-3  # towards the float weights: without it the head drifts from the float model on few examples


@dataclass(frozen=True)
class DistillationSample:
    float_embeddings: np.ndarray  # (N, embedding_size) of the float backbone
    int8_embeddings: np.ndarray  # (N, embedding_size) of the int8 file's backbone, dequantised
    computed: int  # examples whose images were decoded and run now, on one backbone or both


def distilled(float_head: Head, start: Head, sample: DistillationSample) -> Head:
    """A classifier that gives, on ``sample``'s int8 embeddings, the probabilities ``float_head`` gives on its
    float embeddings; from ``start`` (the bias-corrected head), weights held near ``float_head``'s. The output
    range stays ``start``'s (the float logits of the calibration images, as PT2E sets it)."""
    w_float = torch.from_numpy(float_head.weight.astype(np.float32))
    floats = torch.from_numpy(sample.float_embeddings.astype(np.float32))
    quantized = torch.from_numpy(sample.int8_embeddings.astype(np.float32))
    with torch.no_grad():
        targets = torch.softmax(floats @ w_float.T + torch.from_numpy(float_head.bias.astype(np.float32)), dim=1)
    weight = torch.from_numpy(start.weight.astype(np.float32)).clone().requires_grad_(True)
    bias = torch.from_numpy(start.bias.astype(np.float32)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        log_probabilities = torch.log_softmax(quantized @ weight.T + bias, dim=1)
        loss = -(targets * log_probabilities).sum(dim=1).mean() + L2 * ((weight - w_float) ** 2).sum()
        loss.backward()
        optimizer.step()
    return Head(
        weight.detach().numpy().astype(np.float32),
        bias.detach().numpy().astype(np.float32),
        start.calibration_logits,
        start.calibration_embeddings,
    )


def distillation_sample(
    seqs: Sequence[int],
    load: Callable[[list[int]], dict[int, np.ndarray]],
    backbone: Callable[[np.ndarray], np.ndarray],
    frozen: str,
    tflite: bytes,
    base: str,
    state_dir: Path,
    runtime: str,
    pythons: dict[str, Path] | None,
    timeout_s: float,
    float_budget: int | None = None,
    int8_now: bool = True,
) -> DistillationSample | None:
    """Both embeddings of the training examples ``seqs``: kept ones read back (float ones for the ``frozen``
    backbone, int8 ones for the conversion whose sha256 is ``base``), missing ones computed from the images
    ``load`` decodes (seq -> uint8 (H, W, 3); a seq it leaves out is skipped) and kept: float ones for at most
    ``float_budget`` examples (None: all), int8 ones (``int8_now``) for every example with a float one. The
    kept examples with both, or None when there are none."""
    kept_float, kept_int8 = Embeddings(state_dir, "distillation-float"), Embeddings(state_dir, "distillation-int8")
    floats = kept_float.load(frozen).get("float", {})
    int8s = kept_int8.load(base).get(runtime, {})
    new_float = [s for s in seqs if s not in floats][:float_budget]
    new_int8 = [s for s in seqs if s not in int8s and (s in floats or s in new_float)] if int8_now else []
    images = load(sorted(set(new_float) | set(new_int8))) if new_float or new_int8 else {}
    if images:
        if ready := [s for s in new_float if s in images]:
            floats.update(zip(ready, backbone(np.stack([images[s] for s in ready])), strict=True))
        if ready := [s for s in new_int8 if s in images]:
            computed = int8_embeddings(tflite, [images[s] for s in ready], runtime, pythons, timeout_s)
            int8s.update(zip(ready, computed, strict=True))
        try:
            kept_float.save(frozen, {"float": floats}, seqs)
            kept_int8.save(base, {runtime: int8s}, seqs)
        except OSError as err:  # only a cache: the next export computes them again
            log.warning("could not keep the distillation sample's embeddings: %s", err)
    # Every kept pair, also of examples that have left today's sample since it was embedded (the sample moves a
    # little as the store grows): distillation needs no label, and a patched export would otherwise fall below
    # MIN_DISTILLATION_EXAMPLES for want of a few and ship the bias-corrected head until the next full conversion.
    usable = sorted(s for s in floats if s in int8s)
    if not usable:
        return None
    return DistillationSample(np.stack([floats[s] for s in usable]), np.stack([int8s[s] for s in usable]), len(images))
