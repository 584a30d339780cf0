"""The model notice: the latest manifest, retained at QoS 1 on ``<prefix>/<model>/models/latest``.

Devices subscribed to the topic hear of a new version at once; one that
connects later gets the retained manifest straight away. The notice follows
the registry's ``latest`` file rather than the exporter, so a version
published by ``sprout export``, a rollback by ``sprout models rollback`` in
another process, and whatever was latest while the broker was unreachable
are all announced: it polls the file (a stat a second) and publishes each
new document until the broker acknowledges it. A notice is only a hint to
look: devices verify the manifest's signature before they trust it.

While a version rolls out in stages (daemon/registry/rollout.py) the notice names it, so that the
devices of its cohort fetch it at once; the others ask and are answered ``latest``, which they have
(a conditional GET, 304). When the rollout ends or halts, the notice names ``latest`` again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from daemon.common.lifecycle import left
from daemon.registry import rollout as staged
from daemon.registry.layout import MANIFEST_FILE, RegistryError

log = logging.getLogger("sprout.notice")

Publish = Callable[[str, bytes], bool]  # (topic, payload) -> True once the broker acknowledged it


class Notice:
    name = "notice"

    def __init__(self, latest_file: Path, topic: str, publish: Publish, poll_s: float = 1.0):
        self._thread = threading.Thread(target=self.run, name="sprout-notice", daemon=True)
        self.latest_file = latest_file
        self.topic = topic
        self._publish = publish
        self.poll_s = poll_s
        self.announced: bytes | None = None  # the document the broker last acknowledged
        self.announcements = 0
        self.error: BaseException | None = None  # why the thread ended, when it ended by an exception
        self._stop_event = threading.Event()
        self._seen: tuple[int, ...] | None = None

    def run(self) -> None:
        failing: str | None = None
        try:
            while not self._stop_event.is_set():
                try:
                    self._look()
                    failing = None
                except OSError as err:  # an unreadable latest file (permissions, I/O): said once, tried again
                    if str(err) != failing:
                        log.error(
                            "cannot read %s to announce it: %s; trying again every %.0fs",
                            self.latest_file,
                            err,
                            self.poll_s,
                        )
                    failing = str(err)
                self._stop_event.wait(self.poll_s)
        except Exception as err:
            self.error = err
            log.exception("the model notice failed")

    def _look(self) -> None:
        try:
            st = self.latest_file.stat()
        except FileNotFoundError:
            return  # nothing published yet
        rollout_file = self.latest_file.with_name(staged.ROLLOUT)
        try:
            rst = rollout_file.stat()
            stamp: tuple[int, ...] = (st.st_mtime_ns, st.st_size, rst.st_mtime_ns, rst.st_size)
        except FileNotFoundError:
            stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._seen or self.announced is None:
            document = self._document()
            if document != self.announced and self._publish(self.topic, document):
                self.announced = document
                self.announcements += 1
                log.info("announced the latest model on %s", self.topic)
            if document == self.announced:
                self._seen = stamp

    def _document(self) -> bytes:
        """The manifest to announce: the version rolling out, else ``latest`` (each replaced whole by rename)."""
        try:
            rolling = staged.read(self.latest_file.parent)
        except RegistryError as err:
            log.warning("%s: announcing latest", err)
            rolling = None
        if rolling is not None and rolling.rolling:
            try:
                return (self.latest_file.parent / str(rolling.version) / MANIFEST_FILE).read_bytes()
            except FileNotFoundError:
                pass  # deleted since: latest is what every device gets
        return self.latest_file.read_bytes()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deadline: float) -> bool:
        """End after the announcement in hand (a publish waits 10 s for the broker at most)."""
        self._stop_event.set()
        if self._thread.ident is not None:
            self._thread.join(left(deadline))
        return not self.alive()
