"""The Daemon: one object that owns start-up, the main loop and an ordered, bounded shutdown.

Every part it runs shares one protocol (:class:`daemon.common.lifecycle.Part`:
start, stop by a deadline, alive, error). They start in dependency order:
the HTTP listeners, the feed (the MQTT session), the model notice, the
learner, the exporter, and last intake, whose consumption lets the feed's
messages flow. One loop watches them all: a part that dies ends the process
(exit 70) for the service manager to restart. They stop in reverse order
against one deadline (``SHUTDOWN_BOUND_S``): intake first, pausing the feed
(new messages stay un-acked on the broker) and committing, then acking, what
arrived; then the export in flight is killed, the learner finishes its step
and checkpoints, and the feed disconnects; the store closes last. So a stop
loses nothing and re-reads nothing needlessly. A second SIGINT cuts the
waiting short. SIGHUP reloads the configuration (:mod:`daemon.service.reload`),
handing each running part its new section.

Signal handlers only set flags; the loop notices. Under systemd
(``Type=notify``) the loop also reports (:mod:`daemon.service.report`): READY=1
once the model is loaded and the feed subscribed, a one-line STATUS every few
seconds, WATCHDOG=1 only while every part makes progress
(:mod:`daemon.service.liveness`); around a reload RELOADING=1 ... READY=1, and
STOPPING=1 when shutdown begins.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.common import logs, state_owner
from daemon.common.exits import Exit
from daemon.common.lifecycle import Part, describe
from daemon.common.settings import ConfigError, ServerSettings, Settings
from daemon.distribution.http import DownloadApi, HttpServer
from daemon.distribution.notice import Notice
from daemon.distribution.rollout_watch import RolloutWatch
from daemon.export.job import ExportJob
from daemon.ingest import mqttfast
from daemon.ingest.feed import Feed
from daemon.ingest.field_photos import PhotoLimits
from daemon.ingest.intake import Intake
from daemon.learning.field_scout import FieldScout
from daemon.registry.versions import Registry, registry_root
from daemon.service import preflight
from daemon.service.labelling_page import LabellingPage
from daemon.service.liveness import Liveness, export_stall_after_s
from daemon.service.reload import Plan as ReloadPlan
from daemon.service.reload import plan as plan_reload
from daemon.service.report import Reporter
from daemon.service.status import Status, snapshot
from daemon.service.systemd import Notifier
from daemon.store.examples import CommitResult, Store
from daemon.store.field import FieldFigures
from daemon.store.labelling import PhotoRules
from daemon.store.location import StoreLocation
from daemon.store.records import FieldPhoto, FieldReport, Rejection

if TYPE_CHECKING:  # they import torch: imported where used, only when this node learns
    from daemon.export.election import ElectedExporting
    from daemon.export.schedule import Exporting
    from daemon.learning.training import Training

log = logging.getLogger("sprout.daemon")

# The whole shutdown, intake's last commit first, then the learner's step and checkpoint; systemd's
# TimeoutStopSec (30 s in systemd/sprout.service) must exceed it, or SIGKILL ends a clean stop.
SHUTDOWN_BOUND_S = 20.0
STOP_SLICE_S = 0.1  # parts are stopped in waits this short: a second SIGINT is noticed between them
# What a part that has not stopped by the deadline leaves behind; the process exits without it.
LEFT_BEHIND = {
    "intake": "un-acked examples come back on restart",
    "exporter": "the export is redone after the next start",
    "learner": "it resumes from its last checkpoint",
}


P = TypeVar("P", bound=Part)
# What signal.signal returns and takes: a function, SIG_DFL / SIG_IGN, or None (set outside Python).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None):
        self.settings = settings
        self.should_exit = threading.Event()
        self.force_exit = False
        self.reload_requested = threading.Event()
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        # Without a watchdog, no part is ever judged stalled (there is nobody to tell).
        self.liveness = Liveness(self.notifier.watchdog_s or float("inf"), _export_bound(settings))
        self.reporter = Reporter(self, self.notifier, self.liveness, settings.logging)
        self.parts: list[Part] = []  # in start order; stopped in reverse
        self.store: Store | None = None
        self.feed: Feed | None = None
        self.intake: Intake | None = None
        self.training: Training | None = None  # when training.enabled
        self.exporting: Exporting | None = None  # when export.enabled too; on an exporter candidate, once elected
        self.election: ElectedExporting | None = None  # on an exporter candidate (role exporter)
        self.http: HttpServer | None = None  # the model API (and the operator's pages while it is loopback)
        self.admin: HttpServer | None = None  # the operator's pages, when `server.http` faces the network
        self.api: DownloadApi | None = None  # the model API: its fleet counts go to /metrics and the page
        self.notice: Notice | None = None
        self.field: FieldFigures | None = None  # devices' reports, as the metrics and the page show them
        self.labelling: LabellingPage | None = None  # the status site's /label, where devices' photos are taken
        self.scout: FieldScout | None = None  # measures devices' photos with the learner's backbone (novelty, drift)
        self.rollout: RolloutWatch | None = None  # moves a staged rollout on from those reports (rollout.auto)
        self._old_handlers: dict[int, SignalHandler] = {}

    @property
    def http_address(self) -> str | None:
        return self.http.address if self.http is not None else None

    @property
    def admin_address(self) -> str | None:
        return self.admin.address if self.admin is not None else self.http_address

    @property
    def started(self) -> bool:
        """What READY=1 waits for: the feed subscribed; on a trainer rank, which has none, the group's loop running."""
        if self.feed is not None:
            return self.feed.subscribed.is_set()
        return self.training is not None and self.training.alive()

    @property
    def ready(self) -> bool:
        """READY=1 sent: the model is loaded and the feed subscribed."""
        return self.reporter.ready

    @property
    def withholding(self) -> dict[str, str]:
        """Part -> why the watchdog is not pinged, while it is not."""
        return self.reporter.withholding

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
        # The store is no part (no thread of its own): opened before every part and closed after all have
        # stopped, as intake commits into it until its stop and the status reads it until the end.
        store = self.store = Store(StoreLocation.of_settings(s), s.store.migrate_on_start, f"sprout-{s.model.name}")
        if (s.field.telemetry or s.field.photos) and s.role != "trainer":
            self.field = FieldFigures(
                store.location, lambda: store.reports_counted + store.photos_changed, photos=s.field.photos
            )
        # Once, at start-up, for the whole process: paho's property decoder was the intake's hot spot
        # (daemon/ingest/mqttfast.py checks the paho release it patches and says so when it differs).
        mqttfast.install()
        self._build(s, store)  # every part before any starts: a weights file that does not fit starts nothing
        for part in self.parts:
            part.start()
        if self.http is not None:
            log.info(
                "serving the model API on %s://%s%s, the status page, /metrics and /healthz on %s://%s",
                self.http.scheme,
                self.http_address,
                " (downloads need the bearer token)" if self.api is not None and self.api.token else "",
                self.http.scheme,
                self.admin_address,
            )
        log.info("model %s, state %s, broker %s, client id %s", s.model.name, s.state_dir, s.mqtt.broker, s.client_id)
        self.reporter.begin()

    def _build(self, s: Settings, store: Store) -> None:
        """Every part, each given its own settings section, into ``self.parts`` in start order."""
        if s.role == "trainer":
            self._trainer_rank(s, store)
            return
        if s.role == "exporter":
            self._exporter_candidate(s, store)
            return
        intake_only = s.role == "intake"  # one member of an intake group: no learner, no registry to serve
        if s.server.enabled:
            self._servers(s.server, s.state_dir, models=not intake_only)
        feed = self.feed = self._add(
            Feed(s.mqtt, s.store, s.model.name, s.client_id, telemetry=s.field.telemetry, photos=_photo_limits(s))
        )
        if intake_only:
            log.info(
                "role intake: committing %s to %s, no learner or exporter here", " and ".join(feed.filters), store.where
            )
            self.intake = self._add(Intake(feed, store, s.store, _photo_rules(s)))
            return
        # Announce whatever the registry's latest is, now and on every change, on the feed's session.
        latest = registry_root(s.state_dir) / s.model.name / "latest"
        self.notice = self._add(Notice(latest, s.mqtt.notice_topic(s.model.name), feed.publish_retained))
        # The one process of this state folder: it judges the rollouts of what it, or `sprout export`, publishes.
        self._rollout_watch(s, store)
        if s.training.enabled:
            training = self.training = self._add(self._learner(s, feed, store))
            if s.field.photos:  # the queue's order by novelty, and the drift test: the learner's backbone does both
                self.scout = self._add(FieldScout(store, training, s.field, s.training.seed))
            if s.export.enabled:
                from daemon.export.schedule import Exporting

                self.exporting = self._add(
                    Exporting(ExportJob.from_settings(s), lambda: training.learner.trained, training.checkpoint_now)
                )
        # Last to start, first to stop: the feed's messages flow once intake takes them.
        self.intake = self._add(Intake(feed, store, s.store, _photo_rules(s)))

    def _exporter_candidate(self, s: Settings, store: Store) -> None:
        """One exporter candidate: downloads and the notice always; exports and publishes once elected."""
        from daemon.export.election import CheckpointProgress, ElectedExporting, lease_for

        if s.server.enabled:
            self._servers(s.server, s.state_dir)
        # The MQTT session carries the notice only: no examples come here.
        feed = self.feed = self._add(Feed(s.mqtt, s.store, s.model.name, s.client_id, subscribe=False))
        latest = registry_root(s.state_dir) / s.model.name / "latest"
        self.notice = self._add(Notice(latest, s.mqtt.notice_topic(s.model.name), feed.publish_retained))

        def elected(exporting: Exporting) -> None:
            self.exporting = exporting  # its figures go to /metrics and the page from now on

        lease = lease_for(store.location, s.state_dir, s.model.name)
        progress = CheckpointProgress(s.state_dir / "checkpoints")
        self.election = self._add(ElectedExporting(ExportJob.from_settings(s), lease, progress, elected))
        self._rollout_watch(s, store, may_act=lambda: self.exporting is not None)  # the elected one judges

    def _trainer_rank(self, s: Settings, store: Store) -> None:
        """One rank of a torchrun trainer group: the learner on the shared store; rank 0 serves the operator's pages."""
        from daemon.learning.checkpoint import CheckpointError
        from daemon.learning.group import GroupError, GroupTraining

        try:
            group = GroupTraining(s.model, s.training, s.state_dir, store.location, self.should_exit.set)
        except GroupError as err:
            raise ConfigError(f"role: {err}") from None
        except (ValueError, FileNotFoundError, CheckpointError) as err:
            raise ConfigError(f"model / training: {err}") from None
        if group.member.leads and s.server.enabled:
            self._servers(s.server, s.state_dir, models=False)
        self.training = self._add(group)
        learner = group.learner
        log.info(
            "role trainer: rank %d of %d, %s at %d px, mode %s on %s, reading %s, resuming after example %d",
            group.member.rank,
            group.member.world_size,
            learner.spec.name,
            s.model.input_size,
            learner.mode,
            learner.device,
            store.where,
            learner.high_water_mark,
        )

    def _rollout_watch(self, s: Settings, store: Store, may_act: Callable[[], bool] = lambda: True) -> None:
        """With rollout.stages and rollout.auto, where this process owns the registry (the one node, or the
        elected exporter: ``may_act``): the part that judges each stage."""
        if s.rollout.stages and s.rollout.auto:
            registry = lambda: Registry.from_settings(s, create_key=False)  # noqa: E731
            self.rollout = self._add(RolloutWatch(registry, store.location, s.rollout, may_act))

    def _add(self, part: P) -> P:
        self.parts.append(part)
        return part

    def _learner(self, s: Settings, feed: Feed, store: Store) -> Training:
        from daemon.learning.checkpoint import CheckpointError  # these import torch: only when this node learns
        from daemon.learning.training import Training

        try:
            training = Training(s.model, s.training, s.state_dir, feed.deliveries.qsize, store.location)
        except (ValueError, FileNotFoundError, CheckpointError) as err:
            # A weights file that does not fit the backbone, an unreadable checkpoint: restarting
            # cannot help, so this is a configuration error (exit 78), not a crash.
            raise ConfigError(f"model / training: {err}") from None
        learner = training.learner
        log.info(
            "learner: %s at %d px, mode %s on %s, %d classes, resuming after example %d",
            learner.spec.name,
            s.model.input_size,
            learner.mode,
            learner.device,
            len(learner.labels),
            learner.high_water_mark,
        )
        return training

    def _servers(self, server: ServerSettings, state_dir: Path, models: bool = True) -> None:
        """The HTTP listeners; ``models``: serve the registry's downloads too (not on an intake member)."""
        try:
            token = server.resolved_token()
        except OSError as err:
            raise ConfigError(f"server.token_file: cannot read {server.token_file}: {err.strerror}") from None
        field = self.settings.field
        reports = (self.settings.model.name, self._take_report) if field.telemetry else None
        photos = (self.settings.model.name, self._take_photo) if field.photos else None
        limits = _photo_limits(self.settings)
        api = self.api = DownloadApi(registry_root(state_dir), token, reports, photos, limits) if models else None
        from daemon.service import metrics, status_page  # the page and /metrics read this object's status()

        scrape = metrics.registry_for(self)
        labelling = self.labelling = self._labelling_page()

        def listener(host: str, port: int, api: DownloadApi | None, operator: bool, name: str = "http") -> HttpServer:
            """With ``operator``, the operator's pages too: health, /metrics and the status page."""
            return HttpServer(
                host,
                port,
                health=self.health if operator else None,
                api=api,
                tls_cert_file=server.tls_cert_file,
                tls_key_file=server.tls_key_file,
                metrics=(lambda: metrics.exposition(scrape)) if operator else None,
                status=(lambda: status_page.render(self.status(), self.settings)) if operator else None,
                request_timeout_s=server.request_timeout_s,
                name=name,
                operator_routes=labelling.routes() if operator and labelling is not None else None,
            )

        if server.admin_apart:
            # `http` faces the network (the phones): the status page's class names, the metrics and
            # the health of each part stay on the operator's own address.
            self.admin = self._add(listener(server.admin_host, server.admin_port, None, operator=True, name="admin"))
            self.http = self._add(listener(server.host, server.port, api, operator=False))
        else:
            self.http = self._add(listener(server.host, server.port, api, operator=True))

    def _labelling_page(self) -> LabellingPage | None:
        """The status site's /label page, where this process holds the store devices' photos go to."""
        s = self.settings
        if not s.field.photos or self.store is None or s.role in ("trainer", "exporter"):
            return None

        def known() -> list[str]:
            learning = self.status().learning
            return list(learning.classes) if learning is not None else []

        return LabellingPage(self.store, known, s.store.max_label_chars, s.model.name)

    def main_loop(self, on_tick: Callable[[Daemon], None] | None) -> int:
        self.notifier.status(f"connecting to {self.settings.mqtt.broker}")
        while not self.should_exit.wait(0.1):
            for part in self.parts:
                if not part.alive():
                    log.error(
                        "%s failed: %s; exiting so the service manager restarts Sprout", part.name, describe(part.error)
                    )
                    return Exit.SOFTWARE
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            self.reporter.tick(time.monotonic())
            if on_tick is not None:
                on_tick(self)
        return Exit.OK

    def shutdown(self) -> None:
        started = time.monotonic()
        deadline = started + SHUTDOWN_BOUND_S
        waiting = self.feed.deliveries.qsize() if self.feed else 0
        self.notifier.stopping(f"stopping: committing {waiting} received examples, then checkpointing")
        for part in reversed(self.parts):
            if not self._stop(part, deadline):
                left = LEFT_BEHIND.get(part.name, "it ends with the process")
                log.warning("stopping: the %s did not finish in time; %s", part.name, left)
        if self.field is not None:
            self.field.close()
        if self.store is not None:
            self.store.close()
        log.info("stopped in %.2fs%s", time.monotonic() - started, " (forced)" if self.force_exit else "")

    def _stop(self, part: Part, deadline: float) -> bool:
        """Stop one part by the deadline, in short waits: once a second SIGINT forces the exit, none at all."""
        while True:
            if self.force_exit:
                deadline = time.monotonic()  # still asked to stop, no longer waited for
            if part.stop(min(deadline, time.monotonic() + STOP_SLICE_S)):
                return True
            if time.monotonic() >= deadline:
                return False

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
        self.reporter.settings = applied.logging
        if applied.store != before.store:
            if self.feed is not None:
                self.feed.reconfigure(applied.store, _photo_limits(applied))
            if self.intake is not None:
                self.intake.reconfigure(applied.store)
        if self.exporting is not None:
            self.exporting.job = ExportJob.from_settings(applied)  # what each export's process is handed
        if self.election is not None:  # a candidate not yet elected exports with these once it is
            self.election.job = ExportJob.from_settings(applied)
        self.liveness.export_stall_after_s = _export_bound(applied)
        if self.training is not None and applied.training != before.training:
            if applied.role == "trainer":
                # Every rank would have to change at the same round, or their weights part: a restart of the
                # group (torchrun's, on the unit's restart) applies it to all at once.
                log.warning("reload: training settings of a trainer group apply when the group restarts")
            else:
                self.training.reconfigure(applied.training)  # between two steps, on the learner's thread

    # -- state for health, progress and callers --------------------------------------------------

    def _take_report(self, item: FieldReport | Rejection) -> bool:
        """A device's report POSTed to the model API, into the store (on an HTTP worker thread): True once counted,
        False for a resend or a rejection (counted among the rejections by reason)."""
        assert self.store is not None, "the store opens before the HTTP server starts"
        if isinstance(item, Rejection):
            self.store.commit([], [item])
            return False
        return self.store.commit([], [], [item]).reports == 1

    def _take_photo(self, item: FieldPhoto | Rejection) -> CommitResult:
        """A device's photo for labelling POSTed to the model API, into the store (on an HTTP worker thread)."""
        assert self.store is not None, "the store opens before the HTTP server starts"
        if isinstance(item, Rejection):
            return self.store.commit([], [item])
        return self.store.commit([], [], [], [item], _photo_rules(self.settings))

    def status(self) -> Status:
        """Where every part stands now: what the status line, the progress log, /metrics, the page and the demo show."""
        return snapshot(self)

    def health(self) -> dict[str, bool]:
        if self.settings.role == "trainer":
            return {"learner": bool(self.training and self.training.alive())}
        if self.settings.role == "exporter":  # a candidate standing by is healthy: it serves and announces
            return {
                "feed": bool(self.feed and self.feed.receiving()),
                "notice": bool(self.notice is not None and self.notice.alive()),
                "exporter": bool(self.election is not None and self.election.alive()),
                **({"rollout": self.rollout.alive()} if self.rollout is not None else {}),
            }
        parts = {
            # Subscribed and still receiving: a failed callback or a dead network thread is not a feed.
            "feed": bool(self.feed and self.feed.receiving()),
            "intake": bool(self.intake and self.intake.alive() and self.intake.failing_since is None),
            # False while intake waits for disk space (store.min_free_mb): says why intake is false.
            "disk": not (self.intake and self.intake.disk_full_since is not None),
            "notice": bool(self.notice is None or self.notice.alive()),
        }
        if self.settings.training.enabled:
            parts["learner"] = bool(self.training and self.training.alive())
            if self.settings.export.enabled:
                parts["exporter"] = bool(self.exporting and self.exporting.alive())
        if self.rollout is not None:
            parts["rollout"] = self.rollout.alive()
        return parts

    def status_line(self) -> str:
        """One line for `systemctl status`: what is stored, learned and published, and what is wrong."""
        return self.reporter.status_line()

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


def _photo_limits(s: Settings) -> PhotoLimits | None:
    """How devices' photos for labelling are checked (daemon/ingest/field_photos.py); None where not taken."""
    if not s.field.photos:
        return None
    return PhotoLimits(
        s.field.max_photo_bytes, s.store.max_image_pixels, s.store.max_full_decode_pixels, s.store.max_label_chars
    )


def _photo_rules(s: Settings) -> PhotoRules | None:
    """How they are queued (daemon/store/labelling.py); None where not taken."""
    return PhotoRules(s.field.photos_per_device_per_day, s.field.max_queued_photos) if s.field.photos else None
