"""Whether a candidate's lower holdout top-1 is more than chance: McNemar's exact test on paired predictions.

The candidate and its reference (the float model, or the published version)
run on the same holdout images, so only the images where they disagree carry
evidence: ``lost`` (the reference right, the candidate wrong) and ``gained``
(the reverse). If the two were equally accurate, each disagreement would fall
either way with probability 1/2, and ``lost`` of ``lost + gained`` is a
binomial draw (McNemar 1947; Dietterich 1998 for comparing classifiers). The
one-sided p-value is the chance of losing at least that many under that
assumption: a gate that refuses only when it is at most ``alpha`` refuses a
candidate no worse than its reference with probability at most ``alpha``.

>>> round(Paired(lost=3, gained=0, images=260).p_value, 3)   # 3 images of 260: 1.2 points, yet chance
0.125
>>> round(Paired(lost=10, gained=1, images=260).p_value, 4)
0.0059
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    """Two models' hits on the same images, reduced to the images where they differ."""

    lost: int  # images the reference got right and the candidate wrong
    gained: int  # images the candidate got right and the reference wrong
    images: int

    @property
    def drop_pts(self) -> float:
        """The candidate's top-1 below the reference's, in points (negative: above)."""
        return 100.0 * (self.lost - self.gained) / self.images if self.images else 0.0

    @property
    def p_value(self) -> float:
        """P(at least ``lost`` of the disagreements go against the candidate | both equally accurate)."""
        return binomial_tail(self.lost, self.lost + self.gained)


def paired(reference_right: np.ndarray, candidate_right: np.ndarray) -> Paired:
    """Compare two boolean arrays of hits, one per holdout image, in the same order."""
    reference_right = np.asarray(reference_right, dtype=bool)
    candidate_right = np.asarray(candidate_right, dtype=bool)
    if reference_right.shape != candidate_right.shape:
        raise ValueError(f"paired hits differ in shape: {reference_right.shape} and {candidate_right.shape}")
    return Paired(
        lost=int(np.sum(reference_right & ~candidate_right)),
        gained=int(np.sum(candidate_right & ~reference_right)),
        images=int(reference_right.size),
    )


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact (in log space, so that n in the tens of thousands is fine)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_half_n = -n * math.log(2.0)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))
