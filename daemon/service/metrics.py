"""Prometheus metrics, read from the daemon when scraped.

Nothing in the hot paths updates a metric: intake, learner and exporter keep
their own counters, and the collector reads them at scrape time through the
daemon's status snapshot (:mod:`daemon.service.status`: the same numbers the log, the
status page and the demo print); the feed's, exporter's and fleet's own
counters are read from those parts. Counters (``_total``) count since the
process started, as Prometheus expects of counters; what the store holds
across restarts is a gauge, ``sprout_store_examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from daemon import __version__ as daemon_version

if TYPE_CHECKING:
    from daemon.distribution.fleet import FleetView
    from daemon.export.schedule import Exporting
    from daemon.ingest.feed import Feed
    from daemon.learning.drift import Drift
    from daemon.service.status import IntakeStatus, LearningStatus
    from daemon.store.examples import Store
    from daemon.store.field import VersionInField

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector(Collector):
    """Every metric, from a :class:`daemon.service.daemon.Daemon` (passed in, not imported: no cycle)."""

    def __init__(self, daemon: Any):
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        # By subject, in the order a scrape has always listed them; a part not running has no metrics.
        d = self.daemon
        status = d.status()
        yield _part_health(d.health(), status.stalled)
        if status.fleet is not None:
            yield from _fleet(status.fleet)
        if d.field is not None:
            yield from _field(status.in_field, status.reports, d.settings.field.low_confidence_below)
            if status.labelling:
                yield from _labelling(status.photos, status.labelling)
        if d.scout is not None:
            yield from _drift(status.drift, d.settings.field.drift_significance)
        if status.intake is not None:
            yield from _intake(status.intake)
        if d.store is not None:
            yield from _store(d.store, status.examples)
        if d.feed is not None:
            yield from _feed(d.feed, status.intake)
        if status.learning is not None:
            yield from _learning_counts(status.learning)
            yield from _learning_figures(status.learning)
            yield from _gpu_memory(status.learning.device)
        if d.exporting is not None:
            yield from _exports(d.exporting)
        if (version := status.model_version) is not None:
            yield GaugeMetricFamily("sprout_model_version", "The latest published model version.", value=version)
        if (rollout := status.rollout) is not None:
            reach = GaugeMetricFamily(
                "sprout_rollout_percent",
                "Percent of devices offered the version of the last staged rollout: its stage while rolling, "
                "100 once complete, 0 once halted or superseded (rollout.stages).",
                labels=["version"],
            )
            share = {"rolling": rollout["percent"], "complete": 100.0}.get(rollout["state"], 0.0)
            reach.add_metric([str(rollout["version"])], share)
            yield reach


def _part_health(health: dict[str, bool], stalled: dict[str, str]) -> Metric:
    healthy = GaugeMetricFamily(
        "sprout_part_healthy",
        "1 while the part works, 0 when it failed or stalled (what /healthz and the watchdog report).",
        labels=["part"],
    )
    for part, ok in sorted(health.items()):
        healthy.add_metric([part], float(ok and part not in stalled))
    return healthy


def _fleet(fleet: FleetView) -> Iterator[Metric]:
    devices = GaugeMetricFamily(
        "sprout_fleet_devices",
        "Devices heard from in the last day, by the version "
        "they report running (Sprout-Version header; 'none': nothing installed).",
        labels=["version"],
    )
    for version, n in fleet.devices_by_version.items():
        devices.add_metric([version], n)
    yield devices
    downloads = CounterMetricFamily(
        "sprout_model_downloads",
        "Downloads of each version's model file begun (resumes not counted again), by kind: "
        "full (the whole file) or delta (from an earlier version the device held).",
        labels=["version", "kind"],
    )
    for (number, kind), n in fleet.downloads_by_kind.items():
        downloads.add_metric([str(number), kind], n)
    yield downloads


def _field(
    versions: tuple[VersionInField, ...], reports: dict[tuple[str, str], int], unsure_below: float
) -> Iterator[Metric]:
    taken = CounterMetricFamily(
        "sprout_field_reports",
        "Devices' reports taken by this process since it started, by way (mqtt, http) and outcome: counted, "
        "resent (counted before), rejected (http; MQTT's are among sprout_examples_rejected's reasons), "
        "failed (the store refused it; the device retries).",
        labels=["via", "outcome"],
    )
    for (via, outcome), n in sorted(reports.items()):
        taken.add_metric([via, outcome], n)
    yield taken
    # Gauges, not counters: the store's sums over every report, whichever process took it and when.
    figures: list[tuple[str, str, Callable[[VersionInField], float | None]]] = [
        ("devices", "Devices that reported on the version.", lambda v: v.devices),
        ("predictions", "Predictions devices reported making with the version.", lambda v: v.predictions),
        ("mean_confidence", "Mean top-1 score of the version's predictions on devices.", lambda v: v.mean_confidence),
        (
            "unsure_ratio",
            f"Share of the version's predictions whose top-1 score was below {unsure_below:.1f} "
            "(field.low_confidence_below).",
            lambda v: v.share_below(unsure_below),
        ),
        ("correction_ratio", "Share of the version's predictions users corrected.", lambda v: v.correction_share),
        ("load_failure_ratio", "Share of the version's loads on devices that failed.", lambda v: v.load_failure_share),
        ("latency_ms_mean", "Mean inference time of the version on devices, ms.", lambda v: v.mean_latency_ms),
    ]
    for name, doc, value in figures:
        family = GaugeMetricFamily(
            f"sprout_field_{name}", doc + " From devices' reports, newest versions.", labels=["version"]
        )
        for v in versions:
            if (x := value(v)) is not None:
                family.add_metric([str(v.version)], x)
        yield family


def _labelling(photos: dict[tuple[str, str], int], states: dict[str, int]) -> Iterator[Metric]:
    taken = CounterMetricFamily(
        "sprout_field_photos",
        "Devices' photos for labelling taken by this process since it started, by way (mqtt, http) and outcome: "
        "queued, resent (stored before), capped (over field.photos_per_device_per_day), rejected (http; MQTT's are "
        "among sprout_examples_rejected's reasons), failed (the store refused it; the device retries).",
        labels=["via", "outcome"],
    )
    for (via, outcome), n in sorted(photos.items()):
        taken.add_metric([via, outcome], n)
    yield taken
    queue = GaugeMetricFamily(
        "sprout_labelling_photos",
        "Photos devices sent back, by state: queued (waiting for an answer), labelled (training examples now), "
        "skipped, dropped (the oldest, past field.max_queued_photos). The store's, whoever took them.",
        labels=["state"],
    )
    for state, n in states.items():
        queue.add_metric([state], n)
    yield queue


def _drift(drift: Drift | None, significance: float) -> Iterator[Metric]:
    """The last drift test (daemon/learning/drift.py); no sample until one ran."""
    figures: list[tuple[str, str, Callable[[Drift], float]]] = [
        (
            "sprout_field_drift_mmd2",
            "Squared MMD between the field's recent sample photos and stored ones (backbone embeddings).",
            lambda d: d.mmd2,
        ),
        (
            "sprout_field_drift_p_value",
            "Permutation p-value of that MMD: small means the field moved away from the training set.",
            lambda d: d.p_value,
        ),
        (
            "sprout_field_drift_photos",
            "Sample photos from the field the last drift test read.",
            lambda d: d.field_photos,
        ),
        (
            "sprout_field_drifted",
            f"1 when the last drift test's p-value was below field.drift_significance = {significance}.",
            lambda d: float(d.drifted(significance)),
        ),
    ]
    for name, doc, value in figures:
        family = GaugeMetricFamily(name, doc)
        if drift is not None:
            family.add_metric([], value(drift))
        yield family


def _intake(intake: IntakeStatus) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "sprout_examples_stored",
        "Examples committed to the store (and acked) by this process's intake since it started.",
        value=intake.stored,
    )
    yield CounterMetricFamily(
        "sprout_examples_duplicate",
        "Redelivered examples already stored, since the start.",
        value=intake.duplicates,
    )
    rejected = CounterMetricFamily(
        "sprout_examples_rejected", "Messages rejected since the start, by reason.", labels=["reason"]
    )
    for reason, n in sorted(intake.rejected.items()):
        rejected.add_metric([reason], n)
    yield rejected
    yield GaugeMetricFamily(
        "sprout_store_disk_full",
        "1 while intake waits for disk space (store.min_free_mb); nothing is acked.",
        value=float(intake.disk_full_for_s is not None),
    )


def _store(store: Store, examples: int) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "sprout_store_examples",
        "Examples in the store now, from every run and `sprout store import`, less what retention deleted.",
        value=examples,
    )
    yield CounterMetricFamily(
        "sprout_examples_pruned", "Examples deleted by retention (store.max_mb).", value=store.pruned
    )
    yield GaugeMetricFamily("sprout_store_bytes", "Bytes of the example store's pages in use.", value=store.used)


def _feed(feed: Feed, intake: IntakeStatus | None) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "sprout_intake_backlog",
        "Received examples waiting for their commit.",
        value=intake.waiting if intake is not None else feed.deliveries.qsize(),
    )
    yield GaugeMetricFamily(
        "sprout_intake_held_bytes",
        "Bytes of received images in memory until committed (store.backlog_max_mb).",
        value=feed.budget.used,
    )
    yield GaugeMetricFamily(
        "sprout_intake_held_bytes_peak", "The most bytes of images ever held at once.", value=feed.budget.peak
    )
    yield GaugeMetricFamily(
        "sprout_broker_connected",
        "1 while the MQTT session is up, subscribed and receiving.",
        value=float(feed.receiving()),
    )
    yield CounterMetricFamily(
        "sprout_mqtt_callback_errors",
        "MQTT callbacks that failed (each marks the feed failed).",
        value=feed.callback_errors,
    )


def _learning_counts(lr: LearningStatus) -> Iterator[Metric]:
    # The learner's counters come from its checkpoint: they go on across restarts.
    yield CounterMetricFamily("sprout_training_steps", "Optimizer steps taken.", value=lr.steps)
    yield CounterMetricFamily("sprout_examples_learned", "Examples the learner has trained on.", value=lr.learned)
    yield CounterMetricFamily(
        "sprout_training_steps_nonfinite", "Steps skipped for a non-finite loss.", value=lr.nonfinite_skipped
    )
    yield CounterMetricFamily(
        "sprout_divergence_restores",
        "Returns to the last checkpoint (or the starting weights) after a divergence.",
        value=lr.divergence_restores,
    )
    yield CounterMetricFamily(
        "sprout_images_decoded_ahead",
        "Images decoded by decoder processes while an earlier step ran.",
        value=lr.decoded_ahead,
    )
    yield CounterMetricFamily(
        "sprout_decoder_fallbacks",
        "Batches decoded in the learner's thread because a decoder process died.",
        value=lr.decoder_fallbacks,
    )
    yield CounterMetricFamily(
        "sprout_images_decoded_short_of_slots",
        "Images decoded in the learner's thread because the decoder processes' shared memory was all taken.",
        value=lr.decoded_short_of_slots,
    )


def _learning_figures(lr: LearningStatus) -> Iterator[Metric]:
    yield GaugeMetricFamily("sprout_learner_backlog", "Stored examples not learned yet.", value=lr.backlog)
    yield GaugeMetricFamily("sprout_classes", "Classes the model knows.", value=len(lr.classes))
    for name, help_, value in (
        ("sprout_training_loss", "Loss of the last step.", lr.loss),
        (
            "sprout_prequential_accuracy_ratio",
            "Accuracy (0-1) on examples before training on them (recent window).",
            lr.prequential,
        ),
        (
            "sprout_holdout_accuracy_ratio",
            "Accuracy (0-1) on the holdout examples at the last evaluation.",
            lr.holdout,
        ),
    ):
        if value is not None:
            yield GaugeMetricFamily(name, help_, value=value)
    per_class = GaugeMetricFamily(
        "sprout_holdout_class_accuracy_ratio", "Holdout accuracy (0-1) by class.", labels=["label"]
    )
    for label, acc in lr.holdout_per_class.items():
        per_class.add_metric([label], acc)
    yield per_class


def _exports(exporting: Exporting) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        "sprout_exports",
        "Exports since the start, by how they ended: published, rejected (by the gates), failed (the "
        "export process raised, crashed or was killed), disk_full, nothing_new.",
        labels=["outcome"],
    )
    for how in ("published", "rejected", "failed", "disk_full", "nothing_new"):
        outcomes.add_metric([how], exporting.outcomes.get(how, 0))
    yield outcomes
    reasons = CounterMetricFamily(
        "sprout_export_rejection_reasons",
        "Reasons given for refused candidates, by kind (a mode and runtime each).",
        labels=["kind"],
    )
    for kind, n in sorted(exporting.rejected_by_reason.items()):
        reasons.add_metric([kind], n)
    yield reasons
    durations = exporting.durations
    yield HistogramMetricFamily(
        "sprout_export_duration_seconds",
        "How long exports that ran took (the process's start, convert, verify, publish).",
        buckets=durations.cumulative(),
        sum_value=durations.total_s,
    )


def _gpu_memory(name: str) -> Iterator[Metric]:
    if not name.startswith("cuda"):
        return
    import torch

    device = torch.device(name)
    memory = GaugeMetricFamily("sprout_gpu_memory_bytes", "CUDA memory of the learner's device.", labels=["kind"])
    memory.add_metric(["allocated"], float(torch.cuda.memory_allocated(device)))
    memory.add_metric(["reserved"], float(torch.cuda.memory_reserved(device)))
    yield memory


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def registry_for(daemon: Any) -> CollectorRegistry:
    # Its own registry, not the process-global one: nothing another library registers leaks in, and
    # tests can build several. The process's own figures (CPU seconds, resident memory, open files,
    # start time) and the Python build come from prometheus_client's collectors.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DaemonCollector(daemon))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(_BuildInfo())
    return registry


class _BuildInfo:
    """``sprout_build_info``: 1, labelled with what this daemon runs, so a dashboard can tell versions apart."""

    def collect(self) -> Iterator[Metric]:
        from importlib.metadata import PackageNotFoundError, version

        def of(distribution: str) -> str:
            try:
                return version(distribution)
            except PackageNotFoundError:
                return "none"

        info = GaugeMetricFamily(
            "sprout_build_info",
            "What this daemon runs: Sprout's version and its pinned parts'.",
            labels=["version", "torch", "litert_torch", "paho_mqtt"],
        )
        info.add_metric([daemon_version, of("torch"), of("litert-torch"), of("paho-mqtt")], 1)
        yield info
