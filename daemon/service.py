"""The Daemon: one object that owns start-up, the main loop and an ordered, bounded shutdown.

Signal handlers only set flags; the loop notices. Shutdown stops intake first
(new messages stay un-acked on the broker), commits and acks what arrived,
then disconnects, so a stop loses nothing and re-reads nothing needlessly.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from daemon.feed import Feed
from daemon.intake import Intake
from daemon.notice import Notice
from daemon.registry import registry_root
from daemon.server import DownloadApi, HttpServer
from daemon.settings import ConfigError, Settings
from daemon.store import Store
from daemon.wire import Limits

log = logging.getLogger("sprout.daemon")

EX_OK = 0
EX_FAILURE = 1
EX_SOFTWARE = 70  # an internal part died; systemd's Restart=on-failure brings us back
SHUTDOWN_BOUND_S = 20.0


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.should_exit = threading.Event()
        self.force_exit = False
        self.http_address: str | None = None
        self.store: Store | None = None
        self.feed: Feed | None = None
        self.intake: Intake | None = None
        self.training = None  # daemon.training.Training when training.enabled
        self.exporting = None  # daemon.exporting.Exporting when export.enabled too
        self.http: HttpServer | None = None
        self.notice: Notice | None = None
        self._old_handlers: dict[int, object] = {}
        self._progress_at = 0.0
        self._progress_stored = 0

    # -- phases ------------------------------------------------------------------------------

    def run(self, on_tick: Callable[[Daemon], None] | None = None, install_signals: bool = True) -> int:
        if install_signals:
            self._install_signal_handlers()
        try:
            self.startup()
            code = self.main_loop(on_tick)
        finally:
            self.shutdown()
            if install_signals:
                self._restore_signal_handlers()
        return code

    def startup(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(s.state_dir / "examples.db")
        limits = Limits(
            max_image_bytes=s.store.max_image_bytes,
            max_image_pixels=s.store.max_image_pixels,
            max_label_chars=s.store.max_label_chars,
            holdout_fraction=s.store.holdout_fraction,
        )
        self.feed = Feed(s.mqtt, s.model.name, s.client_id, limits, s.store.backlog_max)
        self.intake = Intake(self.feed, self.store, s.store)
        if s.training.enabled and s.export.enabled:
            from daemon.verification import unavailable

            if problems := unavailable(s.export.runtimes, s.export.tflite_runtime_python):
                # Every export would be refused: say so now rather than after the first one.
                raise ConfigError(f"export.runtimes: {'; '.join(problems)}")
        if s.training.enabled:
            from daemon.checkpoint import CheckpointError  # these import torch: only when this node learns
            from daemon.training import Training

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
                from daemon.exporting import Exporting

                training = self.training
                self.exporting = Exporting(s, lambda: training.learner.trained, training.checkpoint_now)
                self.exporting.start()
        if s.server.enabled:
            try:
                token = s.server.resolved_token()
            except OSError as err:
                raise ConfigError(f"server.token_file: cannot read {s.server.token_file}: {err.strerror}") from None
            api = DownloadApi(registry_root(s.state_dir), token)
            self.http = HttpServer(s.server.host, s.server.port, self.health, api,
                                   s.server.tls_cert_file, s.server.tls_key_file)
            self.http_address = self.http.start()
            log.info("serving HTTP on %s://%s%s", self.http.scheme, self.http_address,
                     " (downloads need the bearer token)" if token else "")
        self.feed.start()
        # Announce whatever the registry's latest is, now and on every change, on the feed's session.
        self.notice = Notice(registry_root(s.state_dir) / s.model.name / "latest", s.mqtt.notice_topic(s.model.name),
                             self.feed.publish_retained)
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
        while not self.should_exit.wait(0.1):
            if self.intake is not None and not self.intake.is_alive():
                log.error("intake thread died; exiting so the service manager restarts Sprout")
                return EX_SOFTWARE
            if self.training is not None and not self.training.is_alive():
                log.error("learner thread died (%s); exiting so the service manager restarts Sprout", self.training.error)
                return EX_SOFTWARE
            if self.exporting is not None and not self.exporting.is_alive():
                log.error("export thread died (%s); exiting so the service manager restarts Sprout", self.exporting.error)
                return EX_SOFTWARE
            if self.http is not None and self.http.error is not None:
                log.error("HTTP server stopped: %s", self.http.error)
                return EX_SOFTWARE
            self._progress()
            if on_tick is not None:
                on_tick(self)
        return EX_OK

    def shutdown(self) -> None:
        started = time.monotonic()
        if self.feed is not None:
            self.feed.pause()
        if self.intake is not None and self.intake.is_alive():
            log.info("stopping: committing %d received examples", self.feed.deliveries.qsize() if self.feed else 0)
            if not self.intake.stop(timeout_s=0.1 if self.force_exit else SHUTDOWN_BOUND_S):
                log.warning("stopping: intake did not finish in time; un-acked examples come back on restart")
        if self.exporting is not None:
            self.exporting.stop()  # not awaited: a publish is atomic, and the next start exports again
        if self.training is not None and self.training.is_alive():
            log.info("stopping: finishing the learner's step and checkpointing")
            if not self.training.stop(timeout_s=0.1 if self.force_exit else SHUTDOWN_BOUND_S):
                log.warning("stopping: the learner did not finish in time; it resumes from its last checkpoint")
        if self.notice is not None:
            self.notice.stop()
        if self.feed is not None:
            self.feed.stop()
        if self.http is not None:
            self.http.stop()
        if self.store is not None:
            self.store.close()
        log.info("stopped in %.2fs", time.monotonic() - started)

    # -- state for health, progress and callers --------------------------------------------------

    def health(self) -> dict[str, bool]:
        parts = {
            "feed": bool(self.feed and self.feed.subscribed.is_set()),
            "intake": bool(self.intake and self.intake.is_alive() and self.intake.failing_since is None),
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
        stored = self.intake.stored
        log.info(
            "ingest: %d stored (%.1f/s), %d duplicates, %d rejected, backlog %d, broker %s",
            stored,
            (stored - self._progress_stored) / elapsed,
            self.intake.duplicates,
            self.intake.rejected_total,
            self.feed.deliveries.qsize(),
            "connected" if self.feed.connected.is_set() else "DISCONNECTED",
        )
        if self.training is not None:
            lr = self.training.learner
            rolling = lr.prequential.rolling
            log.info(
                "learn: step %d, %d learned, loss %s, prequential %s, holdout %s, %d classes, backlog %d",
                lr.step,
                lr.trained,
                f"{lr.last_loss:.3f}" if lr.last_loss is not None else "-",
                f"{rolling:.3f}" if rolling is not None else "-",
                f"{lr.holdout.accuracy:.3f}" if lr.holdout.accuracy is not None else "-",
                len(lr.labels),
                self.training.backlog,
            )
        self._progress_at = now
        self._progress_stored = stored

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._handle_exit)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def _handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit.is_set() and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit.set()
