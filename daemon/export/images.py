"""The stored images an export scores and calibrates on, read once per export at the model's input size.

The holdout is what every gate scores (daemon/export/gates.py); calibration
is what int8's activation ranges are measured on (daemon/export/converter.py).
Both read up to the checkpoint's ``high_water_mark``, so an export scores the
examples its model could have learned from, no later ones.
"""

from __future__ import annotations

import numpy as np

from daemon.export.outcome import NothingToExport
from daemon.store.reader import StoreReader
from edge.preprocess import load_rgb


def holdout(
    reader: StoreReader, labels: list[str], high_water_mark: int, size: int, most: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The most recent holdout examples of known ``labels``: their seqs, uint8 RGB at ``size``, label indices."""
    known = {label: i for i, label in enumerate(labels)}
    pairs = [(seq, label) for seq, label in reader.labels_up_to(high_water_mark, "holdout") if label in known][-most:]
    seqs, images, indices = [], [], []
    for e in reader.by_seq([seq for seq, _ in pairs]):
        rgb = load_rgb(e.image, size)
        if rgb is not None:
            seqs.append(e.seq)
            images.append(rgb)
            indices.append(known[e.label])
    if not images:
        raise NothingToExport("no holdout examples of the known classes yet: the gates need some to score the model")
    return seqs, np.stack(images), np.array(indices)


def calibration(
    reader: StoreReader, high_water_mark: int, size: int, most: int, seed: int
) -> tuple[list[int], list[np.ndarray]]:
    """A class-balanced sample of stored training examples, their seqs and uint8 RGB: what int8 ranges are
    measured on.

    Balanced, so a class with few examples still sets the ranges its features need; each class's chosen by a
    hash of their seq salted with ``seed``, so that it is spread across the whole history, two exports of the
    same checkpoint calibrate alike, and the sample stays put as the store grows (a new example enters only in
    place of one whose hash is larger): the float embeddings kept for it (float_reference.py) stay of use.
    """
    by_label: dict[str, list[int]] = {}
    for seq, label in reader.labels_up_to(high_water_mark, "train"):
        by_label.setdefault(label, []).append(seq)
    per_label = max(1, most // max(1, len(by_label)))
    chosen: list[int] = []
    for label in sorted(by_label):
        chosen += sorted(by_label[label], key=lambda seq: _rank(seq ^ seed))[:per_label]
    pairs = [(e.seq, rgb) for e in reader.by_seq(sorted(chosen)) if (rgb := load_rgb(e.image, size)) is not None]
    if not pairs:
        raise NothingToExport("no stored training examples to calibrate the int8 model on yet")
    return [seq for seq, _ in pairs], [rgb for _, rgb in pairs]


def distillation_sample(reader: StoreReader, high_water_mark: int, most: int) -> list[int]:
    """Up to ``most`` stored training examples, class-balanced, each class's chosen by a hash of their seq: a
    sample that stays put as the store grows (a new example enters only in place of one whose hash is larger),
    so the embeddings kept for it (int8_head.py) stay of use from one export to the next."""
    if most <= 0:
        return []
    by_label: dict[str, list[int]] = {}
    for seq, label in reader.labels_up_to(high_water_mark, "train"):
        by_label.setdefault(label, []).append(seq)
    per_label = max(1, most // max(1, len(by_label)))
    chosen: list[int] = []
    for label in sorted(by_label):
        chosen += sorted(by_label[label], key=_rank)[:per_label]
    return sorted(chosen)


def decoded(reader: StoreReader, seqs: list[int], size: int) -> dict[int, np.ndarray]:
    """seq -> uint8 RGB at ``size`` of the stored examples ``seqs``; one that no longer decodes is left out."""
    return {e.seq: rgb for e in reader.by_seq(seqs) if (rgb := load_rgb(e.image, size)) is not None}


def _rank(seq: int) -> int:
    # Fibonacci hashing: a fixed, well-spread order of the seqs, cheap for a store of millions.
    return (seq * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
