"""Group commit: examples that arrive together share one durable transaction, then each is acked.

The order is the whole guarantee: commit (fsync) first, ack after. A crash
between the two only causes a redelivery, which the store's unique example id
absorbs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from daemon.feed import Delivery, Feed
from daemon.settings import StoreSettings
from daemon.store import Store
from daemon.wire import Example, Rejection

log = logging.getLogger("sprout.intake")


class Intake(threading.Thread):
    def __init__(self, feed: Feed, store: Store, settings: StoreSettings):
        super().__init__(name="sprout-intake", daemon=True)
        self.feed = feed
        self.store = store
        self.settings = settings
        self.stored = 0
        self.duplicates = 0
        self.rejected: dict[str, int] = {}
        self.commits = 0
        self.last_commit = time.monotonic()
        self.failing_since: float | None = None  # set while the store refuses writes (disk full, ...)
        self._stop_requested = threading.Event()

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def stop(self, timeout_s: float) -> bool:
        """Commit and ack what was received, then end; False if that took longer than timeout_s."""
        self._stop_requested.set()
        self.join(timeout_s)
        return not self.is_alive()

    def run(self) -> None:
        while True:
            batch = self._collect()
            if batch:
                self._commit(batch)
            elif self._stop_requested.is_set():
                return

    def _collect(self) -> list[Delivery]:
        q = self.feed.deliveries
        try:
            batch = [q.get(timeout=0.1)]
        except queue.Empty:
            return []
        limit = self.settings.commit_max_examples
        linger_until = time.monotonic() + self.settings.commit_linger_ms / 1000
        while len(batch) < limit:
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
        return batch

    def _commit(self, batch: list[Delivery]) -> None:
        examples = [d.item for d in batch if isinstance(d.item, Example)]
        rejections = [d.item for d in batch if isinstance(d.item, Rejection)]
        delay = 0.5
        while True:
            try:
                result = self.store.commit(examples, rejections)
                break
            except Exception as err:  # disk full, I/O error, locked database: nothing acked, keep the batch, retry
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                log.error(
                    "cannot commit %d examples to %s: %s; nothing acked, retrying in %.1fs (free disk space?)",
                    len(batch),
                    self.store.path,
                    err,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.failing_since = None
        for delivery in batch:
            self.feed.ack(delivery)
        for rejection in rejections:
            self.rejected[rejection.reason.value] = self.rejected.get(rejection.reason.value, 0) + 1
            log.info("rejected %s: %s", rejection.example_id or "(no id)", rejection.detail)
            self.feed.report_rejection(rejection)
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.commits += 1
        self.last_commit = time.monotonic()
