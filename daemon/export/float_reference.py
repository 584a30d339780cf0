"""The float model's probabilities on the holdout, the reference every runtime is held to, from kept embeddings.

In head mode the float backbone is frozen, so its embedding of a holdout
image is the same at every export: it is computed once per image and kept
(``<state>/export-cache/embeddings/float.npz``, tied to the frozen part's
fingerprint, conversions.frozen_fingerprint), and each export runs only the
head on it. Only images new to the holdout go through the backbone: the
float reference over 400 holdout images at 128 px was 1.4-10.1 s of every
export on 2 shared cores (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from daemon.export.conversions import frozen_fingerprint
from daemon.export.converter import Deployable
from daemon.export.head_verification import Embeddings

log = logging.getLogger("sprout.export")

_GROUP = "torch"


@torch.no_grad()
def float_reference(model: Deployable, seqs: Sequence[int], images: np.ndarray, state_dir: Path) -> np.ndarray:
    """softmax(head(backbone(image))) of each uint8 (N, H, W, 3) holdout image of ``seqs``."""
    kept = Embeddings(state_dir, "float")
    key = frozen_fingerprint(model, "float", int(images.shape[1]) if images.ndim == 4 else 0)
    known = kept.load(key).get(_GROUP, {})
    missing = [i for i, seq in enumerate(seqs) if seq not in known]
    for start in range(0, len(missing), 64):
        chunk = missing[start : start + 64]
        x = torch.from_numpy(images[chunk].astype(np.float32)).permute(0, 3, 1, 2)
        known.update(zip([seqs[i] for i in chunk], model.backbone(x * model.scale - model.shift).numpy(), strict=True))
    if not len(seqs):
        return np.zeros((0, 0), np.float32)
    embeddings = torch.from_numpy(np.stack([known[seq] for seq in seqs]).astype(np.float32))
    if missing:
        try:
            kept.save(key, {_GROUP: known}, seqs)
        except OSError as err:  # only a cache: the next export computes them again
            log.warning("could not keep the float model's holdout embeddings: %s", err)
    return torch.softmax(model.head(embeddings), dim=1).numpy()
