"""The learning curves: loss, prequential and holdout accuracy against examples learned, for the status page's chart.

The learner's thread records a point between two steps (:meth:`Curves.observe`),
at most one every ``every_s`` seconds and only when something changed, so an
idle daemon does not fill the chart and months of learning fit in ``keep``
points (the oldest go first). The points are saved in the learner's checkpoint
(:meth:`Curves.state`), so the chart goes on across restarts.

>>> c = Curves(every_s=5.0, keep=3)
>>> [c.observe(t, learned, 1.0, 0.5, None) for t, learned in [(0, 0), (1, 8), (6, 16), (12, 16), (20, 24), (30, 32)]]
[True, False, True, False, True, True]
>>> [p.learned for p in c.points()]
[16, 24, 32]
>>> Curves.from_state(c.state()).points() == c.points()
True
"""

from __future__ import annotations

from collections import deque
from dataclasses import astuple, dataclass

EVERY_S = 5.0
KEEP = 2000  # ~100 KB in a checkpoint; at one point per 5 s of learning, the last ~3 hours of it


@dataclass(frozen=True, slots=True)
class Point:
    t: float  # unix time
    learned: int
    loss: float | None
    prequential: float | None
    holdout: float | None


class Curves:
    """A bounded series of :class:`Point`; written by one thread, read by any (a copy is taken)."""

    def __init__(self, every_s: float = EVERY_S, keep: int = KEEP):
        self.every_s = every_s
        self._points: deque[Point] = deque(maxlen=keep)

    def observe(
        self,
        t: float,
        learned: int,
        loss: float | None,
        prequential: float | None,
        holdout: float | None,
        force: bool = False,
    ) -> bool:
        """Record where learning stands, if it moved and ``every_s`` passed since the last point (or ``force``)."""
        last = self._points[-1] if self._points else None
        if last is not None and (last.learned, last.holdout) == (learned, holdout):
            return False
        if last is not None and not force and t - last.t < self.every_s:
            return False
        self._points.append(Point(t, learned, loss, prequential, holdout))
        return True

    def points(self) -> tuple[Point, ...]:
        # tuple() of a deque copies it in C, holding the GIL: safe beside the learner's appends.
        return tuple(self._points)

    def state(self) -> list[list]:
        """Plain lists of numbers: what ``torch.load(weights_only=True)`` reads back."""
        return [list(astuple(p)) for p in self.points()]

    @classmethod
    def from_state(cls, state: list | None, every_s: float = EVERY_S, keep: int = KEEP) -> Curves:
        """The curves saved by :meth:`state`; ``None`` (a checkpoint without curves) gives empty ones."""
        curves = cls(every_s, keep)
        for row in state or ():
            curves._points.append(Point(float(row[0]), int(row[1]), *row[2:5]))
        return curves
