"""The float model's probabilities on the holdout, the reference every runtime is held to, from kept embeddings.

In head mode the float backbone is frozen, so its embedding of a holdout
image is the same at every export: it is computed once per image and kept
(``<state>/export-cache/embeddings/float.npz``, tied to the frozen part's
fingerprint, conversions.frozen_fingerprint), and each export runs only the
head on it. Only images new to the holdout go through the backbone: the
float reference over 400 holdout images at 128 px was 1.4-10.1 s of every
export on 2 shared cores (docs/benchmarks.md).

The float embeddings of int8's calibration images, whose logits set the
classifier's output range and whose error the bias correction measures, are
kept alike (``float-calibration.npz``): a patched int8 export ran the float
backbone on ~100 of them, 2.0 of its 4.5 s on a quiet 2-core machine.
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


def float_reference(model: Deployable, seqs: Sequence[int], images: np.ndarray, state_dir: Path) -> np.ndarray:
    """softmax(head(backbone(image))) of each uint8 (N, H, W, 3) holdout image of ``seqs``."""
    if not len(seqs):
        return np.zeros((0, 0), np.float32)
    embeddings = torch.from_numpy(float_embeddings(model, seqs, images, state_dir, "float"))
    with torch.no_grad():
        return torch.softmax(model.head(embeddings), dim=1).numpy()


@torch.no_grad()
def float_embeddings(
    model: Deployable, seqs: Sequence[int], images: np.ndarray | Sequence[np.ndarray], state_dir: Path, name: str
) -> np.ndarray:
    """backbone(image) of each uint8 (H, W, 3) image of ``seqs``, (N, embedding_size); those kept under ``name``
    (``float``: the holdout; ``float-calibration``: int8's calibration images) for this frozen backbone are not
    computed again. Only ``seqs``' are kept afterwards: the sample moves on."""
    kept = Embeddings(state_dir, name)
    size = int(images[0].shape[0]) if len(images) else 0
    key = frozen_fingerprint(model, "float", size)
    known = kept.load(key).get(_GROUP, {})
    missing = [i for i, seq in enumerate(seqs) if seq not in known]
    if missing:
        computed = backbone_embeddings(model, [images[i] for i in missing])
        known.update(zip([seqs[i] for i in missing], computed, strict=True))
    if not len(seqs):
        return np.zeros((0, 0), np.float32)
    if missing or len(known) != len(seqs):
        try:
            kept.save(key, {_GROUP: known}, seqs)
        except OSError as err:  # only a cache: the next export computes them again
            log.warning("could not keep the float model's embeddings (%s): %s", name, err)
    return np.stack([known[seq] for seq in seqs]).astype(np.float32)


@torch.no_grad()
def backbone_embeddings(model: Deployable, pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """The float backbone's embeddings of uint8 (H, W, 3) images, (N, embedding_size), 64 at a time."""
    out = []
    for start in range(0, len(pixels), 64):
        x = torch.from_numpy(np.stack(list(pixels[start : start + 64])).astype(np.float32)).permute(0, 3, 1, 2)
        out.append(model.backbone(x * model.scale - model.shift).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
