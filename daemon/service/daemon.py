"""The Daemon: one object that owns start-up, the main loop and an ordered, bounded shutdown.

Signal handlers only set flags; the loop notices. Shutdown stops intake first
(new messages stay un-acked on the broker), commits and acks what arrived,
then disconnects, so a stop loses nothing and re-reads nothing needlessly.
A second SIGINT cuts the waiting short. SIGHUP reloads the configuration
(:mod:`daemon.service.reload`).

Under systemd (``Type=notify``) the loop also reports: READY=1 once the
model is loaded and the feed subscribed, a one-line STATUS every few
seconds, WATCHDOG=1 only while every part makes progress
(:mod:`daemon.service.liveness`), RELOADING=1 ... READY=1 around a reload, and
STOPPING=1 when shutdown begins.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from daemon.common import logs, state_owner
from daemon.common.exits import Exit
from daemon.common.settings import ConfigError, Settings
from daemon.distribution.http import DownloadApi, HttpServer
from daemon.distribution.notice import Notice
from daemon.ingest import mqttfast, wire
from daemon.ingest.feed import Feed
from daemon.ingest.intake import Intake
from daemon.registry.versions import registry_root
from daemon.service import preflight
from daemon.service.liveness import Liveness, export_stall_after_s
from daemon.service.reload import Plan as ReloadPlan
from daemon.service.reload import plan as plan_reload
from daemon.service.status import Status, fraction, snapshot
from daemon.service.systemd import Notifier
from daemon.store.examples import Store

log = logging.getLogger("sprout.daemon")

# The whole shutdown, intake's last commit first, then the learner's step and checkpoint; systemd's
# TimeoutStopSec (30 s in systemd/sprout.service) must exceed it, or SIGKILL ends a clean stop.
SHUTDOWN_BOUND_S = 20.0
STATUS_EVERY_S = 2.0  # how often `systemctl status` gets a fresh line (one datagram; nothing to save)


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None):
        self.settings = settings
        self.should_exit = threading.Event()
        self.force_exit = False
        self.reload_requested = threading.Event()
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.ready = False  # READY=1 sent: the model is loaded and the feed subscribed
        # Without a watchdog, no part is ever judged stalled (there is nobody to tell).
        self.liveness = Liveness(self.notifier.watchdog_s or float("inf"), _export_bound(settings))
        self.withholding: dict[str, str] = {}  # part -> why the watchdog is not pinged, while it is not
        self.http_address: str | None = None
        self.store: Store | None = None
        self.feed: Feed | None = None
        self.intake: Intake | None = None
        self.training = None  # daemon.training.Training when training.enabled
        self.exporting = None  # daemon.exporting.Exporting when export.enabled too
        self.http: HttpServer | None = None  # the model API (and the operator's pages while it is loopback)
        self.admin: HttpServer | None = None  # the operator's pages, when `server.http` faces the network
        self.api: DownloadApi | None = None  # the model API: its fleet counts go to /metrics and the page
        self.admin_address: str | None = None
        self.notice: Notice | None = None
        self._old_handlers: dict[int, object] = {}
        self._progress_at = 0.0
        self._progress_stored = 0
        self._status_due = 0.0
        self._ping_due = 0.0

    # -- phases ------------------------------------------------------------------------------

    def run(self, on_tick: Callable[[Daemon], None] | None = None, install_signals: bool = True) -> int:
        if install_signals:
            self._install_signal_handlers()
        try:
            self.startup()
            code = self.main_loop(on_tick)
        finally:
            self.shutdown()
            self.notifier.close()
            if install_signals:
                self._restore_signal_handlers()
        return code

    def startup(self) -> None:
        s = self.settings
        preflight.check(s)  # what `sprout check-config` checks too: files, the signing key, the runtimes
        s.state_dir.mkdir(parents=True, exist_ok=True)
        state_owner.claim(s.state_dir, s.model.name)  # another model's folder is refused, naming both
        self.store = Store(s.state_dir / "examples.db")
        # Once, at start-up, for the whole process: paho's property decoder was the intake's hot spot
        # (daemon/ingest/mqttfast.py checks the paho release it patches and says so when it differs).
        mqttfast.install()
        self.feed = Feed(
            s.mqtt, s.model.name, s.client_id, wire.limits(s), s.store.backlog_max, s.store.backlog_max_mb * 1024 * 1024
        )
        self.intake = Intake(self.feed, self.store, s.store)
        if s.training.enabled:
            from daemon.learning.checkpoint import CheckpointError  # these import torch: only when this node learns
            from daemon.learning.training import Training

            try:
                self.training = Training(s, intake_backlog=self.feed.deliveries.qsize)
            except (ValueError, FileNotFoundError, CheckpointError) as err:
                # A weights file that does not fit the backbone, an unreadable checkpoint: restarting
                # cannot help, so this is a configuration error (exit 78), not a crash.
                raise ConfigError(f"model / training: {err}") from None
            learner = self.training.learner
            log.info(
                "learner: %s at %d px, mode %s on %s, %d classes, resuming after example %d",
                learner.spec.name,
                s.model.input_size,
                learner.mode,
                learner.device,
                len(learner.labels),
                learner.high_water_mark,
            )
        self.intake.start()
        if self.training is not None:
            self.training.start()
            if s.export.enabled:
                from daemon.export.schedule import Exporting

                training = self.training
                self.exporting = Exporting(s, lambda: training.learner.trained, training.checkpoint_now)
                self.exporting.start()
        if s.server.enabled:
            try:
                token = s.server.resolved_token()
            except OSError as err:
                raise ConfigError(f"server.token_file: cannot read {s.server.token_file}: {err.strerror}") from None
            api = self.api = DownloadApi(registry_root(s.state_dir), token)
            from daemon.service import metrics, status_page  # the page and /metrics read this object's status()

            scrape = metrics.registry_for(self)
            operator = dict(
                health=self.health,
                metrics=lambda: metrics.exposition(scrape),
                status=lambda: status_page.render(self.status(), self.settings),
            )
            tls = dict(
                tls_cert_file=s.server.tls_cert_file,
                tls_key_file=s.server.tls_key_file,
                request_timeout_s=s.server.request_timeout_s,
            )
            if s.server.admin_apart:
                # `http` faces the network (the phones): the status page's class names, the metrics and
                # the health of each part stay on the operator's own address.
                self.http = HttpServer(s.server.host, s.server.port, None, api, **tls)
                self.admin = HttpServer(s.server.admin_host, s.server.admin_port, api=None, **operator, **tls)
                self.admin_address = self.admin.start()
            else:
                self.http = HttpServer(s.server.host, s.server.port, api=api, **operator, **tls)
            self.http_address = self.http.start()
            self.admin_address = self.admin_address or self.http_address
            log.info(
                "serving the model API on %s://%s%s, the status page, /metrics and /healthz on %s://%s",
                self.http.scheme,
                self.http_address,
                " (downloads need the bearer token)" if token else "",
                self.http.scheme,
                self.admin_address,
            )
        self.feed.start()
        # Announce whatever the registry's latest is, now and on every change, on the feed's session.
        self.notice = Notice(
            registry_root(s.state_dir) / s.model.name / "latest",
            s.mqtt.notice_topic(s.model.name),
            self.feed.publish_retained,
        )
        self.notice.start()
        log.info(
            "model %s, state %s, broker %s, client id %s",
            s.model.name,
            s.state_dir,
            s.mqtt.broker,
            s.client_id,
        )
        self._progress_at = time.monotonic()

    def main_loop(self, on_tick: Callable[[Daemon], None] | None) -> int:
        self.notifier.status(f"connecting to {self.settings.mqtt.broker}")
        while not self.should_exit.wait(0.1):
            if self.feed is not None and (problem := self.feed.problem()) is not None:
                log.error("feed failed (%s); exiting so the service manager restarts Sprout", problem)
                return Exit.SOFTWARE
            if self.intake is not None and not self.intake.is_alive():
                log.error("intake thread died (%s); exiting so the service manager restarts Sprout", self.intake.error)
                return Exit.SOFTWARE
            if self.notice is not None and not self.notice.is_alive():
                log.error("notice thread died (%s); exiting so the service manager restarts Sprout", self.notice.error)
                return Exit.SOFTWARE
            if self.training is not None and not self.training.is_alive():
                log.error(
                    "learner thread died (%s); exiting so the service manager restarts Sprout", self.training.error
                )
                return Exit.SOFTWARE
            if self.exporting is not None and not self.exporting.is_alive():
                log.error(
                    "export thread died (%s); exiting so the service manager restarts Sprout", self.exporting.error
                )
                return Exit.SOFTWARE
            for server in (self.http, self.admin):
                if server is not None and server.error is not None:
                    log.error("HTTP server stopped: %s", server.error)
                    return Exit.SOFTWARE
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            self._progress()
            self._report(time.monotonic())
            if on_tick is not None:
                on_tick(self)
        return Exit.OK

    def leave(self, code: int) -> int:
        """``code``, once the export thread has ended (its stop request killed any export process)."""
        if self.exporting is not None:
            self.exporting.join(2.0)
        if self.exporting is not None and self.exporting.is_alive():
            # Waiting on the learner for a checkpoint, say; it holds nothing durable: a daemon thread ends with us.
            log.info("exiting while the export thread waits; the export is redone after the next start")
        return code

    def shutdown(self) -> None:
        started = time.monotonic()
        deadline = started + SHUTDOWN_BOUND_S
        waiting = self.feed.deliveries.qsize() if self.feed else 0
        self.notifier.stopping(f"stopping: committing {waiting} received examples, then checkpointing")
        if self.feed is not None:
            self.feed.pause()
        if self.intake is not None and self.intake.is_alive():
            log.info("stopping: committing %d received examples", waiting)
            self.intake.stop(timeout_s=0)
            if not self._await(self.intake, deadline):
                log.warning("stopping: intake did not finish in time; un-acked examples come back on restart")
        if self.exporting is not None:
            self.exporting.stop()  # kills an export in flight: a publish is atomic, the next start exports again
        if self.training is not None and self.training.is_alive():
            log.info("stopping: waiting for the learner to finish its step and checkpoint")
            self.training.stop(timeout_s=0)
            if not self._await(self.training, deadline):
                log.warning("stopping: the learner did not finish in time; it resumes from its last checkpoint")
        if self.notice is not None:
            self.notice.stop()
        if self.feed is not None:
            self.feed.stop()
        for server in (self.http, self.admin):
            if server is not None:
                server.stop()
        if self.store is not None:
            self.store.close()
        log.info("stopped in %.2fs%s", time.monotonic() - started, " (forced)" if self.force_exit else "")

    def _await(self, part: threading.Thread, deadline: float) -> bool:
        """Wait for a stopping part until the deadline, or not at all once a second SIGINT forces the exit."""
        while part.is_alive():
            left = deadline - time.monotonic()
            if left <= 0 or self.force_exit:
                return False
            part.join(min(0.1, left))  # short joins: the signal handler runs between them
        return True

    # -- reload (SIGHUP) ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration and apply what can change while running; False if it was refused."""
        if self.ready:
            self.notifier.reloading()
        try:
            return self._reload()
        finally:
            if self.ready:  # before READY=1 the first READY=1 ends the reload as well
                self.notifier.ready(self.status_line())

    def _reload(self) -> bool:
        try:
            wanted = self.settings.reread()
            change = plan_reload(self.settings, wanted)
            self._check_runtimes(change)
        except ConfigError as err:
            for line in str(err).splitlines():  # one record per field: journald splits lines anyway
                log.error("reload refused, still running on the previous configuration: %s", line)
            return False
        self._apply(change.settings)
        for c in change.applied:
            log.info("reload: %s", c)
        for c in change.needs_restart:
            log.warning("reload: %s needs a restart to take effect; still running with the old value", c.field)
        if not change.applied and not change.needs_restart:
            log.info("reload: %s has no changes", self.settings.config_file or "the configuration")
        return True

    def _check_runtimes(self, change: ReloadPlan) -> None:
        export = change.settings.export
        if self.exporting is None or not any(
            c.field in ("export.runtimes", "export.tflite_runtime_python") for c in change.applied
        ):
            return
        from daemon.export.verification import unavailable

        if problems := unavailable(export.runtimes, export.tflite_runtime_python):
            raise ConfigError(f"export.runtimes: {'; '.join(problems)}")

    def _apply(self, applied: Settings) -> None:
        """Hand each running part its new section; only fields in daemon.service.reload.RELOADABLE differ."""
        before, self.settings = self.settings, applied
        if applied.logging != before.logging:
            logs.configure(applied.logging.level, applied.logging.format)
        if self.feed is not None and applied.store != before.store:
            self.feed.limits = wire.limits(applied)
            if self.intake is not None:
                self.intake.settings = applied.store
        if self.exporting is not None:
            self.exporting.settings = applied
        self.liveness.export_stall_after_s = _export_bound(applied)
        if self.training is not None and applied.training != before.training:
            learner = self.training.learner

            def hand_over() -> None:
                learner.settings = applied.training
                log.info("reload: the learner uses the new training settings from this step on")

            # On the learner's own thread, between two steps. Not awaited (timeout 0): the request stays
            # queued and runs after the current step, however long that takes.
            self.training.on_learner_thread(hand_over, timeout_s=0)

    # -- state for health, progress and callers --------------------------------------------------

    def status(self) -> Status:
        """Where every part stands now: what the status line, the progress log, /metrics, the page and the demo show."""
        return snapshot(self)

    def health(self) -> dict[str, bool]:
        parts = {
            # Subscribed and still receiving: a failed callback or a dead network thread is not a feed.
            "feed": bool(self.feed and self.feed.receiving()),
            "intake": bool(self.intake and self.intake.is_alive() and self.intake.failing_since is None),
            # False while intake waits for disk space (store.min_free_mb): says why intake is false.
            "disk": not (self.intake and self.intake.disk_full_since is not None),
            "notice": bool(self.notice is None or self.notice.is_alive()),
        }
        if self.settings.training.enabled:
            parts["learner"] = bool(self.training and self.training.is_alive())
            if self.settings.export.enabled:
                parts["exporter"] = bool(self.exporting and self.exporting.is_alive())
        return parts

    def _progress(self) -> None:
        now = time.monotonic()
        elapsed = now - self._progress_at
        if elapsed < self.settings.logging.progress_every_s or self.intake is None or self.feed is None:
            return
        status = self.status()
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
        self.liveness.observe(now, self.intake, self._uncommitted(), self.exporting)
        if not self.ready:
            if self.feed is None or not self.feed.subscribed.is_set():
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
            stalls = self.liveness.stalls(now, self.intake, self.training, self.exporting, self.feed)
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
        if self.feed is None or self.intake is None:
            return 0
        done = self.intake.stored + self.intake.duplicates + self.intake.rejected_total
        return max(0, self.feed.received - done)

    def status_line(self) -> str:
        """One line for `systemctl status`: what is stored, learned and published, and what is wrong."""
        status = self.status()
        intake = status.intake
        # This run's intake beside the store's total: "since start" tells the two apart, and a restart
        # that stores nothing new still shows what the store holds.
        parts = [f"{intake.stored if intake else 0} stored since start ({status.examples} in the store)"]
        if (lr := status.learning) is not None:
            parts.append(f"{lr.learned} learned (backlog {lr.backlog}), holdout {fraction(lr.holdout)}")
        version = status.model_version
        parts.append(f"model v{version}" if version is not None else "no model published")
        if status.broker != "connected":
            parts.append(f"broker {self.settings.mqtt.broker} {status.broker}")
        if intake is not None and intake.disk_full_for_s is not None:
            parts.append(f"DISK FULL: intake paused for {intake.disk_full_for_s:.0f}s")
        if status.stalled:
            parts.append("STALLED: " + "; ".join(status.stalled.values()))
        return ", ".join(parts)

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._handle_exit)
        self._old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._handle_reload)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def _handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit.is_set() and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit.set()

    def _handle_reload(self, sig: int, frame: FrameType | None) -> None:
        self.reload_requested.set()


def _export_bound(s: Settings) -> float:
    return export_stall_after_s(len(s.export.quantization), s.export.verify_timeout_s)
