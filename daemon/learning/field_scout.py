"""The part that looks at devices' photos with the backbone: how novel each is (the labelling queue's order) and
whether the field has drifted from the training set (daemon/learning/drift.py).

Every ``SCORE_EVERY_S`` it takes the queued photos not measured yet, embeds them and a sample of stored
training photos on the learner's thread (between two steps: the backbone is the learner's), and records each
photo's embedding and novelty in the store, which moves the most unlike photos up the queue. Every
``field.drift_every_s`` it tests the recent sample photos' embeddings against a fresh sample of stored ones.

Embeddings are kept as measured. In head mode (the default on a CPU) the backbone is frozen and they stay
comparable for ever; where the backbone trains they move with it, slowly, which the drift test's window
(``field.drift_window_s``) bounds. The stored photos' sample is drawn with a generator of its own: the
replay's is part of the checkpoint, and must draw what it would have drawn.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import numpy as np

from daemon.common.lifecycle import left
from daemon.common.settings import FieldSettings
from daemon.learning.drift import Drift, drift_test, novelty
from daemon.store.errors import StoreError, is_database_error
from daemon.store.examples import Store

log = logging.getLogger("sprout.field_scout")

SCORE_EVERY_S = 10.0
PHOTOS_PER_LOOK = 16  # embedded in one turn on the learner's thread: ~1.4 s on 2 cores (EfficientNet-Lite0, 224 px)
STORED_SAMPLE = 256  # stored photos the field's are compared with
FIELD_SAMPLE = 256  # the newest sample photos a drift test reads
LEARNER_WAIT_S = 120.0  # for a turn on the learner's thread (a step, a compile, a checkpoint may be under way)


class FieldScout:
    name = "field-scout"

    def __init__(self, store: Store, training: Any, settings: FieldSettings, seed: int = 0):
        self._thread = threading.Thread(target=self.run, name="sprout-field-scout", daemon=True)
        self.store = store
        self.training = training  # daemon.learning.training.Training: its learner and its thread
        self.settings = settings
        self.rng = random.Random(seed)
        self.drift: Drift | None = None  # the last test
        self.drift_waiting: str | None = "no test yet"  # why there is no test, while there is none
        self.scored = 0  # photos measured since start
        self.error: BaseException | None = None
        self._drift_due = time.monotonic() + SCORE_EVERY_S
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(left(deadline))
        return not self.alive()

    def run(self) -> None:
        try:
            while not self._stop.wait(SCORE_EVERY_S):
                try:
                    self.score()
                    if time.monotonic() >= self._drift_due:
                        self._drift_due = time.monotonic() + self.settings.drift_every_s
                        self.test_drift()
                except Exception as err:  # the store's server away: measured at the next look
                    if not (is_database_error(err) or isinstance(err, StoreError)):
                        raise
                    log.warning("field photos: cannot read or write the store (%s); looked at again later", err)
        except Exception as err:
            self.error = err
            log.exception("the field scout failed")

    def _on_learner(self, fn: Any) -> tuple[bool, Any]:
        return self.training.on_learner_thread(fn, timeout_s=LEARNER_WAIT_S)

    def score(self) -> int:
        """Measure the queued photos not measured yet; returns how many."""
        todo = self.store.unscored_photos(PHOTOS_PER_LOOK)
        if not todo:
            return 0
        learner = self.training.learner

        def embed() -> tuple[list[np.ndarray | None], np.ndarray]:
            return learner.embed_photos([image for _, image in todo]), learner.stored_embeddings(
                STORED_SAMPLE, self.rng
            )

        done, result = self._on_learner(embed)
        if not done:
            return 0  # the learner was busy for long: the next look
        vectors, stored = result
        found = [v for v in vectors if v is not None]
        scores = iter(novelty(np.stack(found), stored) if found else [])
        self.store.score_photos(
            [
                (photo_id, v.astype(np.float16).tobytes(), float(next(scores)))
                if v is not None
                else (photo_id, None, 0.0)
                for (photo_id, _), v in zip(todo, vectors, strict=True)
            ]
        )
        self.scored += len(todo)
        return len(todo)

    def test_drift(self) -> Drift | None:
        """Test the recent sample photos against stored ones; None (and ``drift_waiting`` says why) when there are
        too few of either."""
        s = self.settings
        field = self.store.field_embeddings(time.time() - s.drift_window_s, FIELD_SAMPLE)
        if len(field) < s.drift_min_photos:
            self.drift_waiting = (
                f"{len(field)} sample photos in the last {s.drift_window_s / 86400:g} days, field.drift_min_photos = "
                f"{s.drift_min_photos}: devices send a random share of their photos as kind 'sample'"
            )
            return None
        learner = self.training.learner
        done, stored = self._on_learner(lambda: learner.stored_embeddings(STORED_SAMPLE, self.rng))
        if not done:
            return None
        if len(stored) < s.drift_min_photos:
            self.drift_waiting = f"only {len(stored)} learned photos to compare with"
            return None
        vectors = np.stack([np.frombuffer(b, dtype=np.float16).astype(np.float32) for b in field])
        if vectors.shape[1] != stored.shape[1]:  # measured by another backbone (model.backbone changed)
            self.drift_waiting = "the sample photos were measured by another backbone: waiting for new ones"
            return None
        self.drift = drift_test(vectors, stored, time.time(), seed=self.rng.randrange(2**31))
        self.drift_waiting = None
        if self.drift.drifted(s.drift_significance):
            log.warning(
                "drift: the field's last %d sample photos are unlike the stored ones (MMD² %.4f, p = %.4f): label "
                "the queue's photos, and send examples of what the field shows now",
                self.drift.field_photos,
                self.drift.mmd2,
                self.drift.p_value,
            )
        return self.drift
