"""How unlike the stored training photos the field's photos are: per photo (novelty) and as a whole (drift).

Both work on the backbone's embeddings, L2-normalised, with cosine distance; numpy only.

Novelty (:func:`novelty`): a photo's distance to its nearest stored photo, as a percentile of the stored
photos' own nearest-neighbour distances (each to the others). 0.5 is as near as stored photos are to each
other; 0.99 farther than 99 in 100 of them are. A rank, not a raw distance: it means the same for every
backbone, and adds to an uncertainty on the same 0-1 scale in the labelling queue's priority.

Drift (:func:`drift_test`): the kernel two-sample test of Gretton et al. (JMLR 2012), as alibi-detect's MMD
drift detector runs it: the unbiased squared maximum mean discrepancy between the recent field photos and a
sample of the stored ones, under a Gaussian kernel whose width is the median distance of the pooled
photos, and its p-value from permutations of the pooled set. It needs photos that stand for the field:
devices send a random share of what they classify (kind "sample"); photos sent back for being unsure are
unlike the training set by construction, and would always look drifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def novelty(photos: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Per photo, 0-1: the share of stored photos nearer to their own nearest neighbour than this photo is to
    its nearest stored one. With fewer than 2 stored photos nothing is known: 0.5 each.

    >>> rng = np.random.default_rng(0)
    >>> stored = np.eye(16)[0] + rng.normal(size=(200, 16)) * 0.1  # photos of one kind
    >>> near, far = stored[:1] + 0.001, np.eye(16)[1:2]  # one like them, one of another kind
    >>> [round(float(v), 2) for v in novelty(np.vstack([near, far]), stored)]
    [0.0, 1.0]
    """
    if len(stored) < 2 or len(photos) == 0:
        return np.full(len(photos), 0.5)
    s, p = normalised(stored), normalised(photos)
    within = 1.0 - s @ s.T
    np.fill_diagonal(within, np.inf)
    reference = np.sort(within.min(axis=1))
    nearest = (1.0 - p @ s.T).min(axis=1)
    return np.searchsorted(reference, nearest, side="left") / len(reference)


@dataclass(frozen=True, slots=True)
class Drift:
    """One test of the recent field photos against a sample of the stored ones."""

    mmd2: float  # unbiased squared MMD: about 0 (or below) when both come from one distribution
    p_value: float  # the share of permutations with an MMD as large: small means the field moved
    field_photos: int
    stored_photos: int
    at: float  # wall clock of the test

    def drifted(self, significance: float) -> bool:
        return self.p_value < significance


def _mmd2(k: np.ndarray, n: int) -> float:
    """Unbiased squared MMD of the first ``n`` rows against the rest, from the pooled kernel matrix ``k``."""
    m = len(k) - n
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def drift_test(field: np.ndarray, stored: np.ndarray, at: float, permutations: int = 500, seed: int = 0) -> Drift:
    """The MMD two-sample test (module docstring); at least 2 photos on each side.

    >>> rng = np.random.default_rng(1)
    >>> same = drift_test(rng.normal(size=(60, 8)), rng.normal(size=(80, 8)), at=0.0)
    >>> moved = drift_test(rng.normal(size=(60, 8)) + [2, 0, 0, 0, 0, 0, 0, 0], rng.normal(size=(80, 8)), at=0.0)
    >>> same.p_value > 0.05, moved.p_value < 0.01
    (True, True)
    """
    if len(field) < 2 or len(stored) < 2:
        raise ValueError("the test needs at least 2 photos on each side")
    pooled = normalised(np.vstack([field, stored]))
    squared = np.maximum(2.0 - 2.0 * pooled @ pooled.T, 0.0)  # squared distance of unit vectors
    upper = squared[np.triu_indices(len(pooled), k=1)]
    width = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    k = np.exp(-squared / width)
    n = len(field)
    observed = _mmd2(k, n)
    rng = np.random.default_rng(seed)
    larger = 0
    for _ in range(permutations):
        order = rng.permutation(len(pooled))
        larger += _mmd2(k[np.ix_(order, order)], n) >= observed
    return Drift(observed, (larger + 1) / (permutations + 1), n, len(stored), at)
