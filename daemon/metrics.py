"""Prometheus metrics and the history behind the status page, read from the daemon's parts when asked.

Nothing in the hot paths updates a metric: intake, learner and exporter keep
their own counters, and the collector reads them at scrape time (the same
numbers the log and the demo print). The History samples the learning curves
every few seconds for the status page's chart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.registry import registry_root

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger("sprout.metrics")


class DaemonCollector(Collector):
    """Every metric, from a :class:`daemon.service.Daemon` (passed in, not imported: no cycle)."""

    def __init__(self, daemon: Any):
        self.daemon = daemon

    def collect(self):
        d = self.daemon
        intake, feed, training, exporting = d.intake, d.feed, d.training, d.exporting
        healthy = GaugeMetricFamily("sprout_part_healthy", "1 while the part works, 0 when it failed or stalled "
                                    "(what /healthz and the watchdog report).", labels=["part"])
        stalled = d.withholding
        for part, ok in sorted(d.health().items()):
            healthy.add_metric([part], float(ok and part not in stalled))
        yield healthy
        if d.api is not None:
            fleet = d.api.fleet.view()
            devices = GaugeMetricFamily("sprout_fleet_devices", "Devices heard from in the last day, by the version "
                                        "they report running (Sprout-Version header; 'none': nothing installed).",
                                        labels=["version"])
            for version, n in fleet.devices_by_version.items():
                devices.add_metric([version], n)
            yield devices
            downloads = CounterMetricFamily("sprout_model_downloads", "Downloads of each version's model file "
                                            "begun (resumes not counted again).", labels=["version"])
            for version, n in fleet.downloads_by_version.items():
                downloads.add_metric([str(version)], n)
            yield downloads
        if intake is not None:
            yield CounterMetricFamily("sprout_examples_stored", "Examples committed to the store (and acked).",
                                      value=intake.stored)
            yield CounterMetricFamily("sprout_examples_duplicate", "Redelivered examples already stored.",
                                      value=intake.duplicates)
            rejected = CounterMetricFamily("sprout_examples_rejected", "Messages rejected, by reason.",
                                           labels=["reason"])
            for reason, n in sorted(intake.rejected.items()):
                rejected.add_metric([reason], n)
            yield rejected
            yield GaugeMetricFamily("sprout_store_disk_full",
                                    "1 while intake waits for disk space (store.min_free_mb); nothing is acked.",
                                    value=float(intake.disk_full_since is not None))
        if d.store is not None:
            yield CounterMetricFamily("sprout_examples_pruned", "Examples deleted by retention (store.max_mb).",
                                      value=d.store.pruned)
            yield GaugeMetricFamily("sprout_store_bytes", "Bytes of the example store's pages in use.",
                                    value=d.store.used)
        if feed is not None:
            yield GaugeMetricFamily("sprout_intake_backlog", "Received examples waiting for their commit.",
                                    value=feed.deliveries.qsize())
            yield GaugeMetricFamily("sprout_intake_held_bytes",
                                    "Bytes of received images in memory until committed (store.backlog_max_mb).",
                                    value=feed.budget.used)
            yield GaugeMetricFamily("sprout_intake_held_bytes_peak", "The most bytes of images ever held at once.",
                                    value=feed.budget.peak)
            yield GaugeMetricFamily("sprout_broker_connected",
                                    "1 while the MQTT session is up, subscribed and receiving.",
                                    value=float(feed.receiving()))
            yield CounterMetricFamily("sprout_mqtt_callback_errors",
                                      "MQTT callbacks that failed (each marks the feed failed).",
                                      value=feed.callback_errors)
        if training is not None:
            lr = training.learner
            yield CounterMetricFamily("sprout_training_steps", "Optimizer steps taken.", value=lr.step)
            yield CounterMetricFamily("sprout_examples_learned", "Examples the learner has trained on.",
                                      value=lr.trained)
            yield CounterMetricFamily("sprout_training_steps_nonfinite", "Steps skipped for a non-finite loss.",
                                      value=lr.nonfinite_skipped)
            yield CounterMetricFamily("sprout_divergence_restores",
                                      "Returns to the last checkpoint (or the starting weights) after a divergence.",
                                      value=lr.divergence_restores)
            yield CounterMetricFamily("sprout_images_decoded_ahead",
                                      "Images decoded by decoder processes while an earlier step ran.",
                                      value=lr.read_ahead_decoded)
            yield CounterMetricFamily("sprout_decoder_fallbacks",
                                      "Batches decoded in the learner's thread because a decoder process died.",
                                      value=lr.decode_pool.fallbacks)
            yield CounterMetricFamily("sprout_images_decoded_short_of_slots",
                                      "Images decoded in the learner's thread because the decoder processes' "
                                      "shared memory was all taken.",
                                      value=lr.decode_pool.short)
            yield GaugeMetricFamily("sprout_learner_backlog", "Stored examples not learned yet.",
                                    value=training.backlog)
            yield GaugeMetricFamily("sprout_classes", "Classes the model knows.", value=len(lr.labels))
            for name, help_, value in (
                ("sprout_training_loss", "Loss of the last step.", lr.last_loss),
                ("sprout_prequential_accuracy", "Accuracy on examples before training on them (recent window).",
                 lr.prequential.rolling),
                ("sprout_holdout_accuracy", "Accuracy on the holdout examples at the last evaluation.",
                 lr.holdout.accuracy),
            ):
                if value is not None:
                    yield GaugeMetricFamily(name, help_, value=value)
            per_class = GaugeMetricFamily("sprout_holdout_accuracy_per_class", "Holdout accuracy by class.",
                                          labels=["label"])
            for label, acc in lr.holdout.per_class.items():
                per_class.add_metric([label], acc)
            yield per_class
            yield from _gpu_memory(lr.device)
        if exporting is not None:
            yield CounterMetricFamily("sprout_exports_published", "Versions published.", value=exporting.published)
            refused = CounterMetricFamily("sprout_exports_rejected", "Exports that published nothing.",
                                          value=exporting.rejected)
            yield refused
            reasons = CounterMetricFamily("sprout_export_rejection_reasons",
                                          "Reasons given for refused candidates, by kind (a mode and runtime each).",
                                          labels=["kind"])
            for kind, n in sorted(exporting.rejected_by_reason.items()):
                reasons.add_metric([kind], n)
            yield reasons
            yield CounterMetricFamily("sprout_export_seconds", "Time spent exporting (convert, verify, publish).",
                                      value=exporting.seconds_total)
            yield CounterMetricFamily("sprout_exports", "Exports run.", value=exporting.exports)
            yield CounterMetricFamily("sprout_exports_failed", "Exports whose process ended without an outcome "
                                      "(raised, crashed or was killed; its log says why).", value=exporting.failed)
            if exporting.last is not None:
                yield GaugeMetricFamily("sprout_export_last_seconds", "Duration of the last export.",
                                        value=exporting.last.seconds)
        version = _latest_version(d)
        if version is not None:
            yield GaugeMetricFamily("sprout_model_version", "The latest published model version.", value=version)


def _latest_version(d: Any) -> int | None:
    latest = latest_manifest(d.settings)
    return latest["version"] if latest else None


def latest_manifest(settings: Any) -> dict | None:
    """The registry's latest manifest as served, or None before the first publish."""
    try:
        return json.loads((registry_root(settings.state_dir) / settings.model.name / "latest").read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def _gpu_memory(device: Any):
    if getattr(device, "type", None) != "cuda":
        return
    import torch

    memory = GaugeMetricFamily("sprout_gpu_memory_bytes", "CUDA memory of the learner's device.", labels=["kind"])
    memory.add_metric(["allocated"], float(torch.cuda.memory_allocated(device)))
    memory.add_metric(["reserved"], float(torch.cuda.memory_reserved(device)))
    yield memory


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def registry_for(daemon: Any) -> CollectorRegistry:
    # Its own registry, not the process-global one: nothing else (no default process metrics of
    # another library) leaks in, and tests can build several.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DaemonCollector(daemon))
    return registry


@dataclass(frozen=True)
class Point:
    t: float  # unix time
    learned: int
    loss: float | None
    prequential: float | None
    holdout: float | None


class History(threading.Thread):
    """The learning curves, sampled every ``every_s`` seconds: the status page's chart."""

    def __init__(self, daemon: Any, every_s: float = 5.0, keep: int = 2000):
        super().__init__(name="sprout-history", daemon=True)
        self.daemon = daemon
        self.every_s = every_s
        self.points: deque[Point] = deque(maxlen=keep)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        training = self.daemon.training
        if training is None:
            return
        lr = training.learner
        point = Point(time.time(), lr.trained, lr.last_loss, lr.prequential.rolling, lr.holdout.accuracy)
        if not self.points or (self.points[-1].learned, self.points[-1].holdout) != (point.learned, point.holdout):
            self.points.append(point)  # only what changed: an idle daemon does not fill the chart

    def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a gap in the chart, never a dead thread: the next sample tries again
                log.exception("sampling the learning curves failed")
            if self._stop_event.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2.0)
