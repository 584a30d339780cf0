"""Replay: the train examples already learned, by class, and the class-balanced sample each step mixes in.

A step holds a batch of new examples, often of one or two classes; replayed
older examples of every class keep the model from forgetting them. The index
holds 8 bytes per learned example (months of stream fit in memory), sorted by
seq within each class: retention deletes the oldest train examples first
(daemon/store/examples.py), so a sample that meets a deleted one forgets it
and every older one by bisection. The sampler's ``random.Random`` is part of
the checkpoint: a resumed learner draws the samples it would have drawn.

>>> replay = Replay(seed=0)
>>> replay.add([StoredExample(1, "cat", "train", b""), StoredExample(2, "cat", "train", b"")])
>>> [e.label for e in replay.sample(3, lambda picks: picks)]
['cat', 'cat', 'cat']
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Callable, Iterable
from itertools import chain

from daemon.store.reader import StoredExample


class Replay:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.index: dict[str, array] = {}  # seqs of learned train examples per class, ascending

    def sample(
        self, count: int, with_images: Callable[[list[StoredExample]], list[StoredExample]]
    ) -> list[StoredExample]:
        """Class-balanced: a uniformly chosen known class, then a uniformly chosen stored example of it.

        ``with_images``: the picks with what the step needs of them (image bytes or a cached embedding), leaving
        out those the store no longer holds."""
        classes = [c for c, seqs in self.index.items() if seqs]
        if count <= 0 or not classes:
            return []
        picks = []
        for _ in range(count):
            label = self.rng.choice(classes)
            picks.append(StoredExample(self.rng.choice(self.index[label]), label, "train", b""))
        found = with_images(picks)
        if len(found) < len(picks):
            # Every train example up to the newest one missing is gone too: forget them all at once, in every class.
            gone = max({e.seq for e in picks} - {e.seq for e in found})
            for seqs in self.index.values():
                del seqs[: bisect.bisect_right(seqs, gone)]
        return found

    def add(self, learned: Iterable[StoredExample]) -> None:
        for e in learned:
            self.index.setdefault(e.label, array("q")).append(e.seq)

    def rebuild(self, stored: Iterable[tuple[int, str]], known: set[str]) -> None:
        """The index of the store's train examples (seq, label) up to a resumed position, for the known classes."""
        self.index = {}
        for seq, label in stored:
            if label in known:
                self.index.setdefault(label, array("q")).append(seq)

    def relabel(self, resolve: Callable[[str], str | None]) -> None:
        """Every class under its name after a label change: a merged class's examples join the one it merged into
        (kept sorted), a retired class's go."""
        parts: dict[str, list[array]] = {}
        for label, seqs in self.index.items():
            if (name := resolve(label)) is not None:
                parts.setdefault(name, []).append(seqs)
        self.index = {name: p[0] if len(p) == 1 else array("q", sorted(chain(*p))) for name, p in parts.items()}
