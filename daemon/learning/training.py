"""The learner's thread inside the daemon: follow the store, learn, evaluate, checkpoint.

It reads the store through its own connection and never holds up intake:
while intake has examples waiting (``YIELD_AT_BACKLOG``), the learner pauses
between steps. Intake's buffer is the broker's queue, which is bounded
and silently drops past its limit; the learner's buffer is the store, which is
durable. When the learner falls behind, the gap (the store's high-water mark
minus its own) is its backlog. It checkpoints every
``training.checkpoint_every_s``, on stop, and right after applying label
changes (``sprout labels``), which it looks for before every step: the
exporter and ``sprout labels list`` read the checkpoint. Between steps it
records the learning curves (:mod:`daemon.learning.curves`), which are checkpointed with
the learner, so the status page's chart and last holdout evaluation survive a
restart.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from daemon.common.lifecycle import left
from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.learning import checkpoint
from daemon.learning.curves import Curves, Point
from daemon.learning.learner import Learner
from daemon.store.location import StoreLocation
from daemon.store.reader import StoredExample, StoreReader

log = logging.getLogger("sprout.learner")

# Examples waiting for intake's commit at which the learner pauses. Measured (bench/ingest.py, 30 KB
# JPEGs, 2 cores): intake alone ~3,400/s; beside an unpaused learner ~2,100/s; pausing at 512 waiting
# ~2,600/s; pausing at 64 ~2,800/s. Low enough to catch a burst early, high enough that a trickle
# of examples does not stop learning.
YIELD_AT_BACKLOG = 64


class _Marks(NamedTuple):
    """What a checkpoint holds that the daemon shows, to tell whether the last one is out of date. Beside the
    step: a label change, a holdout evaluation asked for between steps (the demo's last one), a curve point
    recorded after the last step (the one at a stop)."""

    step: int
    label_change: int
    holdout: dict
    last_point: Point | None


class Training:
    """The learner of ``model``, trained by ``settings`` on the store in ``state_dir``; a part of the daemon."""

    name = "learner"

    def __init__(
        self,
        model: ModelSettings,
        settings: TrainingSettings,
        state_dir: Path,
        intake_backlog: Callable[[], int] | None = None,
        store: StoreLocation | None = None,
        cache_dir: Path | None = None,
    ):
        self._thread = threading.Thread(target=self.run, name="sprout-learner", daemon=True)
        self.settings = settings
        self.intake_backlog = intake_backlog
        self.yields = 0  # pauses made for intake
        self.checkpoints = state_dir / "checkpoints"
        # The store in the state folder unless told (store.url): tests and benchmarks give a folder only.
        self.reader = StoreReader(store or StoreLocation.of(state_dir, ""))
        # The embedding cache in the state folder unless told (each rank of a trainer group has its own).
        self.learner = Learner(model, settings, cache_dir or state_dir, self.reader)
        if removed := checkpoint.remove_stale_temporaries(self.checkpoints):
            log.info("removed %d checkpoint temporaries left by an interrupted write", removed)
        saved = checkpoint.load(self.checkpoints)
        self.curves = Curves()
        if saved is not None and self.learner.load_state(saved):
            # Only with the learner it belongs to: a fresh learner starts its chart at 0 learned.
            self.curves = Curves.from_state(saved.curves)  # None in checkpoints older than the curves
            log.info(
                "resumed at step %d, example %d, %d classes",
                self.learner.step,
                self.learner.high_water_mark,
                len(self.learner.labels),
            )
        self.store_high_water_mark = self.learner.high_water_mark
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()  # last time a step finished or the learner found nothing to do
        self._stop_requested = threading.Event()
        # Work other threads need done on this one (the learner and its connections are not shared).
        self._requests: queue.Queue[tuple[Callable[[], Any], threading.Event, list[Any]]] = queue.Queue()
        # Examples read from the store during the last step (reads_ahead), and the high-water mark they follow.
        self._upcoming: tuple[int, list[StoredExample]] = (-1, [])
        self._saved = self._checkpointed()
        self._saved_at = time.monotonic()

    @property
    def compiling_since(self) -> float | None:
        """When the step now waiting for torch.compile began (the watchdog allows it longer), else None."""
        return self.learner.compiling_since

    @property
    def backlog(self) -> int:
        """Stored examples not yet learned."""
        return max(0, self.store_high_water_mark - self.learner.high_water_mark)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        """Finish the current step, checkpoint, end; False if not done by ``deadline``."""
        if self._thread.ident is None:  # never started: release the decoders and the store's connection
            self.learner.close()
            self.reader.close()
            return True
        if not self._stop_requested.is_set():
            self._stop_requested.set()
            if self.alive():
                log.info("stopping: waiting for the learner to finish its step and checkpoint")
        self._thread.join(left(deadline))
        return not self.alive()

    def reconfigure(self, settings: TrainingSettings) -> None:
        """Learn by ``settings`` from the next step on: handed over on the learner's thread, between two steps.

        Not awaited: the request stays queued and runs after the current step, however long that takes.
        """

        def hand_over() -> None:
            self.settings = self.learner.settings = settings
            log.info("reload: the learner uses the new training settings from this step on")

        self.on_learner_thread(hand_over, timeout_s=0)

    def run(self) -> None:
        t = self.settings
        try:
            while not self._stop_requested.is_set():
                if self.learner.apply_label_changes():
                    self._upcoming = (-1, [])  # read under the old labels
                    self.save()
                while not self._requests.empty():
                    fn, done, result = self._requests.get_nowait()
                    result.append(fn())
                    done.set()
                if self.intake_backlog is not None and self.intake_backlog() >= YIELD_AT_BACKLOG:
                    self.yields += 1
                    self.last_progress = time.monotonic()
                    self._stop_requested.wait(0.05)
                    continue
                batch = self._next_batch(t.batch_size)
                self.store_high_water_mark = max(self.store_high_water_mark, self.reader.high_water_mark())
                if batch:
                    upcoming = self.reader.after(batch[-1].seq, t.batch_size) if self.learner.reads_ahead else []
                    self.learn(batch, upcoming)
                    self._upcoming = (batch[-1].seq, upcoming)
                else:
                    self._stop_requested.wait(0.2)
                self.observe()
                self.last_progress = time.monotonic()
                if time.monotonic() - self._saved_at >= t.checkpoint_every_s:
                    self.save()
                    if forgotten := self.learner.forget_pruned():
                        log.info("embedding cache: dropped %d vectors of examples retention deleted", forgotten)
            self.observe(force=True)  # the chart a restart shows ends where learning stopped
            self.save()
        except BaseException as err:  # the daemon notices the dead thread and exits for a restart
            self.error = err
            log.exception("learner stopped: %s", err)
        finally:
            self.learner.close()
            self.reader.close()

    def _next_batch(self, size: int) -> list[StoredExample]:
        """The examples after the learner's high-water mark: those read ahead during the last step (their
        images decoded already), topped up from the store when fewer than ``size`` were there then."""
        after, ahead = self._upcoming
        self._upcoming = (-1, [])
        if after != self.learner.high_water_mark or not ahead:
            return self.reader.after(self.learner.high_water_mark, size)
        return ahead + self.reader.after(ahead[-1].seq, size - len(ahead)) if len(ahead) < size else ahead

    def learn(self, batch: list[StoredExample], upcoming: list[StoredExample] | None = None) -> None:
        """One step; after a divergence, back to the last checkpoint before anything can save or score it."""
        self.learner.learn_many(batch, upcoming or ())
        if self.learner.diverged is not None:
            self.learner.recover(checkpoint.load(self.checkpoints))
        if self.learner.step % self.settings.holdout_every_steps == 0 and self.learner.holdout_index:
            self.learner.evaluate_holdout()

    def on_learner_thread(self, fn: Callable[[], Any], timeout_s: float = 60.0) -> tuple[bool, Any]:
        """Run ``fn`` on the learner's thread between two steps; (False, None) if it did not happen in time."""
        if not self.alive():
            return False, None
        done = threading.Event()
        result: list[Any] = []  # fn's return value, put there by the learner's thread
        self._requests.put((fn, done, result))
        if not done.wait(timeout_s):
            return False, None
        return True, result[0]

    def checkpoint_now(self, timeout_s: float = 60.0) -> bool:
        """A checkpoint written between two steps: a consistent snapshot for the exporter."""
        return self.on_learner_thread(self.save, timeout_s)[0]

    def observe(self, force: bool = False) -> None:
        """A point of the learning curves, when learning moved (on this thread: the learner changes only here)."""
        lr = self.learner
        self.curves.observe(
            time.time(), lr.trained, lr.last_loss, lr.prequential.rolling, lr.holdout.accuracy, force=force
        )

    def _checkpointed(self) -> _Marks:
        points = self.curves.points()
        return _Marks(
            self.learner.step, self.learner.label_change, self.learner.holdout.state(), points[-1] if points else None
        )

    def save(self) -> Path | None:
        if self._checkpointed() == self._saved:
            self._saved_at = time.monotonic()
            return None
        if not self.learner.finite():
            # The exporter exports from the checkpoint, and a restore goes back to it: a non-finite
            # state written there would poison both. The last good checkpoint stays.
            self._saved_at = time.monotonic()
            log.warning(
                "checkpoint at step %d not written: the weights or optimizer state are not finite; "
                "the last one written (step %d or earlier) stays",
                self.learner.step,
                self._saved.step,
            )
            return None
        started = time.monotonic()
        try:
            marks = self._checkpointed()
            path = checkpoint.save(self.checkpoints, replace(self.learner.state(), curves=self.curves.state()))
        except OSError as err:
            # A full disk, say: the write is atomic, so the last checkpoint stays whole. Learning goes
            # on and the save is tried again after checkpoint_every_s; a restart resumes from the old one.
            self._saved_at = time.monotonic()
            log.error(
                "checkpoint at step %d not written to %s: %s; the last one stays, retrying in %.0fs",
                self.learner.step,
                self.checkpoints,
                err,
                self.settings.checkpoint_every_s,
            )
            return None
        self._saved = marks
        self._saved_at = time.monotonic()
        log.info(
            "checkpoint at step %d, example %d (%.2fs)",
            self.learner.step,
            self.learner.high_water_mark,
            self._saved_at - started,
        )
        return path
