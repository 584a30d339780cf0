"""Group commit: examples that arrive together share one durable transaction, then each is acked.

The order is the whole guarantee: commit (fsync) first, ack after. A crash
between the two only causes a redelivery, which the store's unique example id
absorbs.

A full disk pauses intake instead: while the state directory has less than
``store.min_free_mb`` free beyond the commit's own size (or SQLite says
"database or disk is full"), nothing is committed or acked, so the broker
keeps the examples; the free space is checked again every few seconds and
intake resumes by itself. After each commit the store is pruned to
``store.max_mb`` (:meth:`daemon.store.examples.Store.prune`).

Before a batch is committed, the bodies of its images are decoded
(:func:`daemon.ingest.wire.check_body`) on a few threads: Pillow decodes without the
GIL, so the checks of one batch run on every core while the network thread
goes on receiving the next. An image that does not decode is a rejection,
counted and acked like any other.

Stopping (:meth:`Intake.stop`, the first part the daemon stops) pauses the
feed, so that new messages stay un-acked on the broker, then commits and acks
what had arrived, and ends.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from daemon.common.lifecycle import left
from daemon.common.settings import StoreSettings
from daemon.ingest.feed import Delivery, Feed
from daemon.ingest.wire import Example, Rejection, Unchecked, check_body
from daemon.store.errors import is_disk_full
from daemon.store.examples import CommitResult, Store
from daemon.store.field import FIELD_KEEP_S
from daemon.store.labelling import PhotoRules
from daemon.store.records import FieldPhoto, FieldReport

log = logging.getLogger("sprout.intake")

MB = 1024 * 1024
COMMIT_MAX_BYTES = 64 * MB  # of images in one commit: ~10 phone photos, hundreds of crops
# Longest wait between two looks at a full disk: a look is one statvfs, and resuming promptly
# drains the broker's queue sooner. Other store errors back off to 30 s.
DISK_RETRY_MAX_S = 5.0


class Intake:
    name = "intake"

    def __init__(self, feed: Feed, store: Store, settings: StoreSettings, photo_rules: PhotoRules | None = None):
        self._thread = threading.Thread(target=self.run, name="sprout-intake", daemon=True)
        self.feed = feed
        self.store = store
        self.settings = settings
        self.stored = 0
        self.duplicates = 0
        self.reports = 0  # devices' reports counted (daemon/ingest/telemetry.py)
        self.resent_reports = 0  # and those a device had sent before, counted once already
        self.photo_rules = photo_rules  # how devices' photos for labelling are queued (None: not taken)
        self.photos_queued = 0  # devices' photos for labelling queued (daemon/store/labelling.py)
        self.photos_resent = 0
        self.photos_dropped = 0  # the oldest queued, dropped past field.max_queued_photos
        self.reports_forgotten_at = 0.0  # when counters past FIELD_KEEP_S were last forgotten (wall clock)
        self.rejected: dict[str, int] = {}
        self.commits = 0
        self.last_commit = time.monotonic()
        self.failing_since: float | None = None  # set while the store refuses writes (disk full, ...)
        self.disk_full_since: float | None = None  # set while paused for a full disk: waiting, not hung
        self._stop_requested = threading.Event()
        self.error: BaseException | None = None  # why the thread ended, when it ended by an exception
        # One decoder per core: a batch's checks then take 1/cores of the time the network thread saved.
        self._checkers = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="sprout-check")

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reconfigure(self, settings: StoreSettings, photo_rules: PhotoRules | None = None) -> None:
        """Commit, prune and check free space by ``settings`` (and queue photos by ``photo_rules``, where they are
        taken) from the next batch on (a reload)."""
        self.settings = settings
        if photo_rules is not None and self.photo_rules is not None:
            self.photo_rules = photo_rules

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        """Pause the feed, commit and ack what it had received, then end; False if not done by ``deadline``."""
        if self._thread.ident is None:  # never started: nothing received, nothing to commit
            self._checkers.shutdown(wait=False)
            return True
        if not self._stop_requested.is_set():
            self.feed.pause()  # new messages stay un-acked in the broker's session
            self._stop_requested.set()
            if self.alive():
                log.info("stopping: committing %d received examples", self.feed.deliveries.qsize())
        self._thread.join(left(deadline))
        return not self.alive()

    def run(self) -> None:
        try:
            while True:
                batch = self._collect()
                if batch:
                    self._commit(self._checked(batch))
                elif self._stop_requested.is_set():
                    return
        except Exception as err:  # nothing acked is lost: what was not committed comes back from the broker
            self.error = err
            log.exception("intake failed")
        finally:
            self._checkers.shutdown(wait=False)

    def _checked(self, batch: list[Delivery]) -> list[Delivery]:
        """The batch with every Unchecked image decoded: an Example, or the Rejection ``parse`` would give."""
        todo = [i for i, d in enumerate(batch) if isinstance(d.item, Unchecked)]
        if not todo:
            return batch
        results = self._checkers.map(check_body, [batch[i].item for i in todo])  # never raises
        out = list(batch)
        for i, item in zip(todo, results, strict=True):
            out[i] = replace(batch[i], item=item)
        return out

    def _collect(self) -> list[Delivery]:
        q = self.feed.deliveries
        try:
            batch = [q.get(timeout=0.1)]
        except queue.Empty:
            return []
        limit = self.settings.commit_max_examples
        linger_until = time.monotonic() + self.settings.commit_linger_ms / 1000
        held = batch[0].size
        # Phone photos: 512 of them would be gigabytes in one transaction, and a minute of decoding
        # before the first ack. A batch also ends at COMMIT_MAX_BYTES.
        while len(batch) < limit and held < COMMIT_MAX_BYTES:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                remaining = linger_until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(q.get(timeout=remaining))
                except queue.Empty:
                    break
            held += batch[-1].size
        return batch

    def _commit(self, batch: list[Delivery]) -> None:
        """Commit the batch, then ack each of its messages; when stopping before the store took it, ack none."""
        examples = [d.item for d in batch if isinstance(d.item, Example)]
        rejections = [d.item for d in batch if isinstance(d.item, Rejection)]
        reports = [d.item for d in batch if isinstance(d.item, FieldReport)]
        photos = [d.item for d in batch if isinstance(d.item, FieldPhoto)]
        result = self._commit_or_wait(batch, examples, rejections, reports, photos)
        if result is None:  # stopping: un-acked, the batch comes back from the broker
            self.feed.budget.give_back(sum(d.size for d in batch))
            return
        self._resumed()
        for delivery in batch:
            self.feed.ack(delivery)
        self.feed.budget.give_back(sum(d.size for d in batch))  # on disk now: the network thread may read more
        self._count(rejections + list(result.photos.refused), result)
        try:
            self._prune()
        except Exception as err:  # retention is retried after the next commit; intake goes on
            log.warning("retention: pruning %s failed: %s; retried after the next commit", self.store.where, err)

    def _commit_or_wait(
        self,
        batch: list[Delivery],
        examples: list[Example],
        rejections: list[Rejection],
        reports: list[FieldReport],
        photos: list[FieldPhoto],
    ) -> CommitResult | None:
        """The store's result once it took the batch (trying again while the disk is full or the store
        refuses it), or None when intake is told to stop first."""
        delay = 0.5
        while True:
            full = self._disk_full(examples, photos)
            if full is None:
                try:
                    return self.store.commit(examples, rejections, reports, photos, self.photo_rules)
                except Exception as err:  # disk full, I/O error, locked database: nothing acked, keep the batch, retry
                    if is_disk_full(err):
                        full = f"{self.store.where}: {err}"
                    else:
                        log.error(
                            "cannot commit %d examples to %s: %s; nothing acked, retrying in %.1fs",
                            len(batch),
                            self.store.where,
                            err,
                            delay,
                        )
            self._failing(full)
            if self._stop_requested.wait(delay):
                # Stopping: do not wait for the disk. Un-acked, these come back from the broker.
                log.warning(
                    "stopping: %d received examples not committed (%s); the broker redelivers them",
                    len(batch),
                    full or "the store refuses writes",
                )
                return None
            delay = min(delay * 2, 30.0 if full is None else DISK_RETRY_MAX_S)

    def _failing(self, full: str | None) -> None:
        """Note that a commit failed; ``full`` says why the disk is full, when it is, and intake pauses for it."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if full is not None and self.disk_full_since is None:
            self.disk_full_since = now
            log.error(
                "intake paused, disk full: %s; nothing is committed or acked (the broker keeps the examples). "
                "Free space %s, or lower store.max_mb so retention prunes the store (systemctl reload "
                "applies it); intake resumes by itself",
                full,
                f"under {self.store.path.parent}" if self.store.path is not None else "on the database server",
            )
        if full is not None:
            try:  # a lowered store.max_mb (reload) frees pages for this commit
                self._prune()
            except Exception as err:
                log.debug("pruning on a full disk failed: %s", err)

    def _resumed(self) -> None:
        """A commit went through: the store takes writes again (and says so after a pause for the disk)."""
        if self.disk_full_since is not None:
            log.info(
                "intake resumed: %s takes examples again after a pause of %.0fs for disk space",
                self.store.where,
                time.monotonic() - self.disk_full_since,
            )
            self.disk_full_since = None
        self.failing_since = None

    def _count(self, rejections: list[Rejection], result: CommitResult) -> None:
        for rejection in rejections:
            self.rejected[rejection.reason.value] = self.rejected.get(rejection.reason.value, 0) + 1
            log.info("rejected %s: %s", rejection.example_id or "(no id)", rejection.detail)
            self.feed.report_rejection(rejection)
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.reports += result.reports
        self.resent_reports += result.resent_reports
        self.photos_queued += result.photos.queued
        self.photos_resent += result.photos.resent
        self.photos_dropped += result.photos.dropped
        self.commits += 1
        self.last_commit = time.monotonic()

    def _prune(self) -> None:
        if (
            self.feed.telemetry_topic or self.feed.photos_topic
        ) is not None and time.time() - self.reports_forgotten_at >= 3600:
            self.reports_forgotten_at = time.time()
            if forgotten := self.store.forget_reports(time.time() - FIELD_KEEP_S):
                log.info("field: forgot %d counters of versions devices stopped reporting on 90 days ago", forgotten)
        max_mb = self.settings.max_mb
        if pruned := self.store.prune(max_mb * MB):
            log.info(
                "retention: pruned the %d oldest examples: the store had grown past store.max_mb = %d MB",
                pruned,
                max_mb,
            )

    def _free_bytes(self, folder: Path) -> int:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize

    def _disk_full(self, examples: list[Example], photos: list[FieldPhoto]) -> str | None:
        """Why this commit must wait for disk space, or None when there is room for it and the floor."""
        floor_mb = self.settings.min_free_mb
        need = sum(len(e.image) for e in examples) + sum(len(p.image) for p in photos)
        folder = self.store.image_folder
        if folder is None:
            return None  # a PostgreSQL store's disk is the server's: the commit says when it is full
        try:
            free = self._free_bytes(folder)
        except OSError:
            return None  # cannot tell: let the commit itself find out
        if free - need >= floor_mb * MB:
            return None
        return (
            f"{folder} has {free / MB:.1f} MB free, below store.min_free_mb = {floor_mb} MB "
            f"plus this commit's {need / MB:.1f} MB"
        )
