"""The daemon's export thread: publish a new model every ``export.every_examples`` learned or ``every_seconds``.

It works from the learner's last checkpoint (a consistent snapshot that the
learner writes atomically), so it never holds up training or intake; it asks
the learner for a fresh checkpoint first. A conversion takes tens of seconds
of CPU; on stop, the daemon does not wait for one in flight: publishing is
atomic, and the next start simply exports again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from daemon import checkpoint
from daemon.publishing import NothingToExport, Outcome, export_once
from daemon.settings import Settings

log = logging.getLogger("sprout.export")


class Exporting(threading.Thread):
    def __init__(self, settings: Settings, learned: Callable[[], int], request_checkpoint: Callable[[], None]):
        super().__init__(name="sprout-export", daemon=True)
        self.settings = settings
        self.learned = learned  # examples learned so far (the learner's counter)
        self.request_checkpoint = request_checkpoint
        self.published = 0
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}  # Reason.kind -> reasons given for refused candidates
        self.seconds_total = 0.0  # time spent exporting, for the mean export duration
        self.exports = 0
        self.last: Outcome | None = None
        self.latest_published: dict | None = None  # the manifest this process last published
        self.busy = False  # an export is converting or verifying right now
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self._exported_at = time.monotonic()
        self._exported_learned = self._checkpoint_learned()

    def stop(self) -> None:
        self._stop_requested.set()

    def due(self) -> bool:
        e = self.settings.export
        new = self.learned() - self._exported_learned
        if new <= 0:
            return False
        return new >= e.every_examples or time.monotonic() - self._exported_at >= e.every_seconds

    def run(self) -> None:
        try:
            while not self._stop_requested.wait(1.0):
                if self.due():
                    self.export()
        except BaseException as err:  # the daemon notices the dead thread and exits for a restart
            self.error = err
            log.exception("export thread stopped: %s", err)

    @property
    def exported_learned(self) -> int:
        """Examples learned as of the last export's checkpoint."""
        return self._exported_learned

    def export(self) -> Outcome | None:
        self.busy = True
        try:
            return self._export()
        finally:
            self.busy = False

    def _export(self) -> Outcome | None:
        self.request_checkpoint()
        learned = self._checkpoint_learned()
        log.info("exporting: %d examples learned, %d since the last export (modes %s)", learned,
                 learned - self._exported_learned, ", ".join(self.settings.export.quantization))
        try:
            outcome = export_once(self.settings)
        except NothingToExport as err:
            log.info("export skipped: %s", err)
            outcome = None
        else:
            if outcome.published:
                self.published += 1
                self.latest_published = outcome.published
            else:
                self.rejected += 1
            for reason in outcome.reasons:
                kind = getattr(reason, "kind", "other")
                self.rejected_by_reason[kind] = self.rejected_by_reason.get(kind, 0) + 1
            self.exports += 1
            self.seconds_total += outcome.seconds
            self.last = outcome
        self._exported_at = time.monotonic()
        self._exported_learned = max(self._exported_learned, learned)
        return outcome

    def _checkpoint_learned(self) -> int:
        try:
            payload = checkpoint.load(self.settings.state_dir / "checkpoints")
        except checkpoint.CheckpointError:
            return 0
        return payload["trained"] if payload else 0
