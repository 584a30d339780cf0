"""The daemon's export thread: publish a new model every ``export.every_examples`` learned or ``every_seconds``.

Until the model's first version is published, it tries every ``export.first_model_examples`` instead.

It works from the learner's last checkpoint (a consistent snapshot that the
learner writes atomically), so it never holds up training or intake; it asks
the learner for a fresh checkpoint first. Each export runs in a child process
that exits after it (daemon/export/child.py: the converter's memory goes with
it, and its trace shares no state with the learner). A conversion takes tens
of seconds of CPU; on stop, the daemon kills the child instead of waiting:
publishing is atomic, and the next start simply exports again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from daemon.common.lifecycle import left
from daemon.export.child import ExportChild, ExportFailed, ExportStopped, remove_orphaned_temporaries
from daemon.export.job import ExportJob
from daemon.export.outcome import DiskFull, ExportOutcome, NothingExported
from daemon.export.published_scores import remove_temporaries
from daemon.learning import checkpoint
from daemon.registry.versions import Registry, RegistryError, registry_root

log = logging.getLogger("sprout.export")


# Upper bounds (s) of the export duration histogram: a tiny model exports in seconds, EfficientNet in int8
# on 2 cores in about a minute, a large backbone in minutes.
DURATION_BUCKETS_S = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Durations:
    """Counts of durations at or below each bound, their sum and count: a Prometheus histogram's data."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.total_s = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
                break
        self.total_s += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as Prometheus wants them, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((repr(bound), running))
        return [*out, ("+Inf", self.count)]


class Exporting:
    """The export thread, a part of the daemon. It takes the :class:`ExportJob` (the sections an export uses),
    which it hands each export's process; a reload hands it a new one."""

    name = "exporter"

    def __init__(self, job: ExportJob, learned: Callable[[], int], request_checkpoint: Callable[[], object]):
        self._thread = threading.Thread(target=self.run, name="sprout-export", daemon=True)
        self.job = job
        self.learned = learned  # examples learned so far (the learner's counter)
        self.request_checkpoint = request_checkpoint
        self.published = 0
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}  # RefusalKind value -> reasons given for refused candidates
        self.seconds_total = 0.0  # time spent exporting, for the mean export duration
        self.exports = 0
        self.failed = 0  # exports whose process ended without an outcome (raised, crashed, killed)
        self.last: ExportOutcome | None = None
        # Every export by how it ended (published, rejected, failed, disk_full, nothing_new): one counter
        # with an outcome label; and the durations of those that ran, in DURATION_BUCKETS_S.
        self.outcomes: dict[str, int] = {}
        self.durations = Durations(DURATION_BUCKETS_S)
        self.latest_published: dict | None = None  # the manifest this process last published
        self.busy = False  # an export is converting or verifying right now
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self._exported_at = time.monotonic()
        # From the registry, not the checkpoint: an export cut short by a kill or a stop left no trace
        # there, so the next start redoes it instead of waiting for more examples to arrive.
        self._exported_learned = self._registry_learned()
        self._has_published = Registry.open_readonly(registry_root(job.state_dir), job.model.name).latest() is not None
        self._retry_at = 0.0  # after an export failed (full disk, crash): not before then
        self.child = ExportChild()
        removed = remove_orphaned_temporaries() + remove_temporaries(job.state_dir)
        if removed:
            log.info("removed %d temporaries left by exports that were killed", removed)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        """Kill the export in flight (publishing is atomic: the next start exports again) and end.

        The thread may be waiting for the learner's checkpoint: it ends once the learner has written it.
        """
        if not self._stop_requested.is_set():
            self._stop_requested.set()
            pid = self.child.pid
            if self.child.stop():
                log.info(
                    "stopping: export process %d killed; the export is dropped and redone after the next start", pid
                )
        if self._thread.ident is not None:
            self._thread.join(left(deadline))
        return not self.alive()

    def due(self) -> bool:
        e = self.job.export
        new = self.learned() - self._exported_learned
        if new <= 0 or time.monotonic() < self._retry_at:
            return False
        # Before the first publish, a model of a few hundred examples beats no model: try at the shorter
        # cadence and let the gates refuse a candidate they cannot judge yet (no holdout, too few classes).
        every = e.every_examples if self._has_published else min(e.every_examples, e.first_model_examples)
        return new >= every or time.monotonic() - self._exported_at >= e.every_seconds

    def run(self) -> None:
        try:
            pause = 1.0
            while not self._stop_requested.wait(pause):
                pause = 1.0
                if self.due():
                    self.export()
                    # What was learned during it is often due already: a second of polling was a second
                    # more for every example to reach a phone.
                    pause = 0.05
        except BaseException as err:  # the daemon notices the dead thread and exits for a restart
            self.error = err
            log.exception("export thread stopped: %s", err)

    @property
    def exported_learned(self) -> int:
        """Examples learned as of the last export's checkpoint."""
        return self._exported_learned

    def export(self) -> ExportOutcome | None:
        self.busy = True
        try:
            return self._export()
        finally:
            self.busy = False

    def _export(self) -> ExportOutcome | None:
        self.request_checkpoint()
        learned = self._checkpoint_learned()
        log.info(
            "exporting: %d examples learned, %d since the last export (modes %s)",
            learned,
            learned - self._exported_learned,
            ", ".join(self.job.export.quantization),
        )
        began = time.monotonic()
        try:
            report = self.child.run(self.job)
        except ExportStopped:
            return None
        except ExportFailed as err:
            # A converter crash or a bug in one export is no reason to restart the learner: it is logged
            # and counted (sprout_exports_total{outcome="failed"}), and the export is tried again when the next one is due.
            self.failed += 1
            self._ended("failed")
            log.error("export failed: %s; retrying in %.0fs", err, self.job.export.every_seconds)
            self._retry_at = time.monotonic() + self.job.export.every_seconds
            return None
        if isinstance(report, NothingExported):
            log.info("export skipped: %s", report.why)
            self._ended("nothing_new")
            outcome = None
        elif isinstance(report, DiskFull):
            # Publishing writes a temporary folder and renames it, so nothing half-written is left
            # and latest still names a complete version. Tried again when the next export is due.
            self._ended("disk_full")
            log.error(
                "export failed, disk full: %s; the registry keeps its latest version, retrying when the "
                "next export is due (free space under %s)",
                report.error(),
                self.job.state_dir,
            )
            self._retry_at = time.monotonic() + self.job.export.every_seconds
            return None
        else:
            # The process's own start (Python, torch, litert-torch imports) is part of what an export costs.
            outcome = report.model_copy(update={"seconds": time.monotonic() - began})
            log.info(
                "export process: %.1fs in all, %.1fs before the export began (start and imports)",
                outcome.seconds,
                outcome.seconds - report.seconds,
            )
            self._count(outcome)
        self._exported_at = time.monotonic()
        self._exported_learned = max(self._exported_learned, learned)
        return outcome

    def _count(self, outcome: ExportOutcome) -> None:
        if outcome.published:
            self.published += 1
            self._has_published = True
            self.latest_published = outcome.published
        else:
            self.rejected += 1
        for reason in outcome.reasons:
            self.rejected_by_reason[reason.kind.value] = self.rejected_by_reason.get(reason.kind.value, 0) + 1
        self.exports += 1
        self.seconds_total += outcome.seconds
        self.last = outcome
        self._ended("published" if outcome.published else "rejected")
        self.durations.observe(outcome.seconds)

    def _ended(self, how: str) -> None:
        self.outcomes[how] = self.outcomes.get(how, 0) + 1

    def _registry_learned(self) -> int:
        """Examples learned as of the last export that finished: published, or refused by the gates."""
        # Opened for writing, as the registry's writer: that removes what a killed publish left behind
        # (a .tmp-* version folder) and repairs latest now, not at the next publish.
        registry = self.job.open_registry()
        learned = [0]
        for version in registry.versions():
            try:
                learned.append(registry.manifest(version)["metrics"]["examples_trained"])
            except (RegistryError, KeyError, TypeError):
                continue
        for event in registry.events():
            if event.get("event") == "rejected":
                trained = event.get("candidate", {}).get("metrics", {}).get("examples_trained")
                learned.append(trained if isinstance(trained, int) else 0)
        return max(learned)

    def _checkpoint_learned(self) -> int:
        try:
            saved = checkpoint.load(self.job.state_dir / "checkpoints")
        except checkpoint.CheckpointError:
            return 0
        return saved.trained if saved else 0
