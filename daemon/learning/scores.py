"""Honest learning metrics: prequential accuracy (predict, then learn) and holdout accuracy with forgetting.

Prequential: every new example is scored by the model as it was before the
example was learned, so the figure is never flattered by memorisation.
Forgetting of a class: its best holdout accuracy so far minus its current one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Prequential:
    """Rolling and per-class accuracy of predictions made before learning."""

    window: int = 1000
    seen: int = 0
    correct: int = 0
    per_class_seen: dict[str, int] = field(default_factory=dict)
    per_class_correct: dict[str, int] = field(default_factory=dict)
    _recent: deque = field(default_factory=deque)

    def update(self, label: str, predicted: str | None) -> None:
        hit = predicted == label
        self.seen += 1
        self.correct += hit
        self.per_class_seen[label] = self.per_class_seen.get(label, 0) + 1
        self.per_class_correct[label] = self.per_class_correct.get(label, 0) + hit
        self._recent.append(hit)
        if len(self._recent) > self.window:
            self._recent.popleft()

    @property
    def rolling(self) -> float | None:
        return sum(self._recent) / len(self._recent) if self._recent else None

    @property
    def overall(self) -> float | None:
        return self.correct / self.seen if self.seen else None

    def per_class(self) -> dict[str, float]:
        return {c: self.per_class_correct[c] / n for c, n in sorted(self.per_class_seen.items())}

    def relabel(self, name: Callable[[str], str | None]) -> None:
        """Per-class counts under the classes' names after a label change: a merged class's add to the
        one it joined, a retired one's (``name`` gives None) leave the per-class figures, not the totals."""
        seen: dict[str, int] = {}
        correct: dict[str, int] = {}
        for label, n in self.per_class_seen.items():
            if (to := name(label)) is not None:
                seen[to] = seen.get(to, 0) + n
                correct[to] = correct.get(to, 0) + self.per_class_correct.get(label, 0)
        self.per_class_seen, self.per_class_correct = seen, correct

    def state(self) -> dict:
        return {
            "window": self.window,
            "seen": self.seen,
            "correct": self.correct,
            "per_class_seen": dict(self.per_class_seen),
            "per_class_correct": dict(self.per_class_correct),
            "recent": [bool(x) for x in self._recent],
        }

    @classmethod
    def from_state(cls, state: dict) -> Prequential:
        p = cls(
            state["window"],
            state["seen"],
            state["correct"],
            dict(state["per_class_seen"]),
            dict(state["per_class_correct"]),
        )
        p._recent.extend(state["recent"])
        return p


@dataclass
class Holdout:
    """Holdout accuracy per class at each evaluation, and the best so far for forgetting."""

    accuracy: float | None = None
    per_class: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    evaluated_examples: int = 0
    at_step: int = 0

    def record(self, per_class_hits: dict[str, tuple[int, int]], step: int) -> None:
        """per_class_hits: label -> (correct, total)."""
        total = sum(n for _, n in per_class_hits.values())
        correct = sum(c for c, _ in per_class_hits.values())
        self.accuracy = correct / total if total else None
        self.per_class = {label: c / n for label, (c, n) in sorted(per_class_hits.items()) if n}
        for label, acc in self.per_class.items():
            self.best[label] = max(self.best.get(label, 0.0), acc)
        self.evaluated_examples = total
        self.at_step = step

    def relabel(self, name: Callable[[str], str | None]) -> None:
        """Per-class accuracies under the classes' names after a label change. Accuracies do not add up: a
        merged class's are dropped for those of the class it joined (until the next evaluation scores the
        two together), a renamed one's move, a retired one's (``name`` gives None) go."""

        def renamed(scores: dict[str, float]) -> dict[str, float]:
            return {
                to: value
                for label, value in scores.items()
                if (to := name(label)) is not None and (to == label or to not in scores)
            }

        self.per_class, self.best = renamed(self.per_class), renamed(self.best)

    def forgetting(self) -> dict[str, float]:
        return {label: self.best[label] - acc for label, acc in self.per_class.items()}

    @property
    def average_forgetting(self) -> float | None:
        f = self.forgetting()
        return sum(f.values()) / len(f) if f else None

    def state(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "per_class": dict(self.per_class),
            "best": dict(self.best),
            "evaluated_examples": self.evaluated_examples,
            "at_step": self.at_step,
        }

    @classmethod
    def from_state(cls, state: dict) -> Holdout:
        return cls(
            state["accuracy"],
            dict(state["per_class"]),
            dict(state["best"]),
            state["evaluated_examples"],
            state["at_step"],
        )
