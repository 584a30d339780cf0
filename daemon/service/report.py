"""What the running daemon tells its operator and its service manager, on every tick of the main loop.

The log gets a progress line (ingest, and learning where it is on) every
``logging.progress_every_s``. systemd (``Type=notify``) gets READY=1 once the
feed has subscribed, a one-line STATUS every ``STATUS_EVERY_S`` and WATCHDOG=1
at half the watchdog interval, but only while every part makes progress
(:mod:`daemon.service.liveness`); while one does not, it gets a STATUS saying
which, and the log says so once per newly stalled part. Every figure comes
from the daemon's one status snapshot (:mod:`daemon.service.status`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from daemon.common.settings import LoggingSettings
from daemon.service.liveness import Liveness
from daemon.service.status import fraction
from daemon.service.systemd import Notifier

log = logging.getLogger("sprout.daemon")

STATUS_EVERY_S = 2.0  # how often `systemctl status` gets a fresh line (one datagram; nothing to save)


class Reporter:
    """Reports on ``daemon`` (a :class:`daemon.service.daemon.Daemon`, passed in, not imported: no cycle)."""

    def __init__(self, daemon: Any, notifier: Notifier, liveness: Liveness, settings: LoggingSettings):
        self.daemon = daemon
        self.notifier = notifier
        self.liveness = liveness
        self.settings = settings  # progress_every_s; a reload hands over the new section
        self.ready = False  # READY=1 sent: the model is loaded and the feed subscribed
        self.withholding: dict[str, str] = {}  # part -> why the watchdog is not pinged, while it is not
        self._progress_at = time.monotonic()
        self._progress_stored = 0
        self._status_due = 0.0
        self._ping_due = 0.0

    def begin(self) -> None:
        """The parts have started: the first progress line counts from now."""
        self._progress_at = time.monotonic()

    def tick(self, now: float) -> None:
        self._progress(now)
        self._report(now)

    def _progress(self, now: float) -> None:
        elapsed = now - self._progress_at
        d = self.daemon
        if elapsed < self.settings.progress_every_s or d.intake is None or d.feed is None:
            return
        status = d.status()
        intake = status.intake
        assert intake is not None
        # The ingest line counts this run's intake: its rate is what the broker delivers now.
        log.info(
            "ingest: %d stored (%.1f/s), %d duplicates, %d rejected, backlog %d, broker %s",
            intake.stored,
            (intake.stored - self._progress_stored) / elapsed,
            intake.duplicates,
            intake.rejected_total,
            intake.waiting,
            status.broker,
        )
        if (lr := status.learning) is not None:
            log.info(
                "learn: step %d, %d learned, loss %s, prequential %s, holdout %s, %d classes, backlog %d",
                lr.steps,
                lr.learned,
                fraction(lr.loss),
                fraction(lr.prequential),
                fraction(lr.holdout),
                len(lr.classes),
                lr.backlog,
            )
        self._progress_at = now
        self._progress_stored = intake.stored

    def _report(self, now: float) -> None:
        """Tell systemd: READY=1 once, then STATUS every few seconds and WATCHDOG=1 while all makes progress."""
        d = self.daemon
        self.liveness.observe(now, d.intake, self._uncommitted(), d.exporting)
        if not self.ready:
            if not d.started:
                return
            self.ready = True
            status = self.status_line()
            self.notifier.ready(status)
            log.info("ready: %s", status)
            self._status_due = now + STATUS_EVERY_S
            self._ping_due = now
        if now >= self._status_due:
            status = self.status_line()
            self.notifier.status(status)
            log.debug("status: %s", status)
            self._status_due = now + STATUS_EVERY_S
        watchdog_s = self.notifier.watchdog_s
        if watchdog_s and now >= self._ping_due:
            self._ping_due = now + watchdog_s / 2  # sd_watchdog_enabled(3): ping at half the interval
            stalls = self.liveness.stalls(now, d.intake, d.training, d.exporting, d.feed)
            if stalls.keys() - self.withholding.keys():  # once per newly stalled part, not every ping
                log.warning(
                    "watchdog: not pinging: %s; systemd restarts Sprout once %.0fs pass without a ping",
                    "; ".join(stalls.values()),
                    watchdog_s,
                )
            elif self.withholding and not stalls:
                log.info("watchdog: every part makes progress again; pinging")
            self.withholding = stalls
            if stalls:
                self.notifier.status(self.status_line())
            else:
                self.notifier.watchdog()

    def _uncommitted(self) -> int:
        """Examples received and not yet committed: in the feed's queue or in intake's batch in hand."""
        feed, intake = self.daemon.feed, self.daemon.intake
        if feed is None or intake is None:
            return 0
        done = intake.stored + intake.duplicates + intake.rejected_total
        return max(0, feed.received - done)

    def status_line(self) -> str:
        """One line for `systemctl status`: what is stored, learned and published, and what is wrong."""
        status = self.daemon.status()
        intake = status.intake
        # This run's intake beside the store's total: "since start" tells the two apart, and a restart
        # that stores nothing new still shows what the store holds.
        parts = [f"{intake.stored if intake else 0} stored since start ({status.examples} in the store)"]
        if (lr := status.learning) is not None:
            parts.append(f"{lr.learned} learned (backlog {lr.backlog}), holdout {fraction(lr.holdout)}")
        version = status.model_version
        parts.append(f"model v{version}" if version is not None else "no model published")
        if status.broker != "connected":
            parts.append(f"broker {self.daemon.settings.mqtt.broker} {status.broker}")
        if intake is not None and intake.disk_full_for_s is not None:
            parts.append(f"DISK FULL: intake paused for {intake.disk_full_for_s:.0f}s")
        if status.stalled:
            parts.append("STALLED: " + "; ".join(status.stalled.values()))
        return ", ".join(parts)
