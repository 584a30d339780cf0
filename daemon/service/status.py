"""Where the daemon stands, as one immutable snapshot: what every view of it reads.

The status line (``systemctl status``), the progress log, ``/metrics``, the
status page and the demo's progress and summary each format a
:class:`Status`, built by :func:`snapshot` from the daemon's parts, instead of
reaching into the learner or intake themselves, so they cannot disagree.

What survives a restart and what does not is said by where a figure lives:
totals (``examples``, ``rejected``) are the store's; the learner's figures,
its last holdout evaluation and the curves come from its checkpoint;
:class:`IntakeStatus` counts this process's intake only, since it started.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from daemon.distribution.fleet import FleetView
from daemon.learning.curves import Point
from daemon.learning.drift import Drift
from daemon.registry import rollout as staged
from daemon.registry.layout import RegistryError
from daemon.registry.versions import registry_root
from daemon.store.field import VersionInField


@dataclass(frozen=True, slots=True)
class IntakeStatus:
    """What this process's intake did since it started: a restart begins these at 0."""

    stored: int
    duplicates: int
    rejected: dict[str, int]  # by reason
    waiting: int  # received, not committed yet
    disk_full_for_s: float | None  # how long intake has waited for disk space, while it does

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(frozen=True, slots=True)
class LearningStatus:
    """The learner, as of its last step or evaluation (resumed from its checkpoint after a restart)."""

    backbone: str
    mode: str
    device: str  # torch's name for it: "cpu", "cuda:0"
    steps: int
    learned: int  # train examples learned, in every run
    high_water_mark: int  # the last example read from the store
    backlog: int  # stored examples not learned yet
    classes: tuple[str, ...]  # the outputs, in order
    loss: float | None  # of the last step
    prequential: float | None  # recent window
    prequential_overall: float | None
    holdout: float | None  # at the last evaluation
    holdout_per_class: dict[str, float]
    holdout_at_step: int
    average_forgetting: float | None
    nonfinite_skipped: int
    divergence_restores: int
    decoded_ahead: int
    decoder_fallbacks: int
    decoded_short_of_slots: int
    aliases: dict[str, str]  # label -> the class it is learned as (renamed or merged)
    retired: frozenset[str]
    label_changes_applied: int


@dataclass(frozen=True, slots=True)
class Status:
    examples: int  # stored now, in every run, less what retention deleted
    rejected: int  # messages rejected, in every run
    intake: IntakeStatus | None  # None before intake starts
    learning: LearningStatus | None  # None where training is off
    curves: tuple[Point, ...] = ()
    model: dict | None = None  # the latest published manifest
    rollout: dict | None = None  # the staged rollout (daemon/registry/rollout.py), as its file has it
    rollout_judged: str | None = None  # the rollout watch's last verdict and why (rollout.auto)
    broker: str = "connected"  # or "DISCONNECTED", "FAILED (why)"
    stalled: dict[str, str] = field(default_factory=dict)  # part -> why the watchdog is not pinged
    fleet: FleetView | None = None  # what devices run and fetch, where the model API is served
    in_field: tuple[VersionInField, ...] = ()  # the newest versions as devices' reports have them (all time)
    # Devices' reports taken by this process since it started: (via, outcome) -> count; via mqtt or http,
    # outcome counted, resent (counted before), rejected, failed (the store refused; the device retries).
    reports: dict[tuple[str, str], int] = field(default_factory=dict)
    # Devices' photos for labelling taken by this process since it started, as reports are: (via, outcome) -> count;
    # outcome queued, resent (stored before), capped (over the device's day), rejected (http), failed (http).
    photos: dict[tuple[str, str], int] = field(default_factory=dict)
    labelling: dict[str, int] = field(default_factory=dict)  # the queue's photos by state (all time); {}: not taken
    drift: Drift | None = None  # the last drift test of the field's sample photos (daemon/learning/drift.py)
    drift_waiting: str | None = None  # why there is none yet, where the test runs here

    @property
    def model_version(self) -> int | None:
        return self.model.get("version") if self.model else None


def snapshot(daemon: Any) -> Status:
    """The status of a :class:`daemon.service.daemon.Daemon` (passed in, not imported: no cycle), read now.

    Called from the main loop and the HTTP threads while the learner's and intake's threads go on: each
    figure is read once, so one view shows one set of numbers.
    """
    totals = daemon.store.totals() if daemon.store is not None else None
    feed, intake = daemon.feed, daemon.intake
    intake_status = None
    if intake is not None:
        since = intake.disk_full_since
        intake_status = IntakeStatus(
            intake.stored,
            intake.duplicates,
            dict(intake.rejected),
            feed.deliveries.qsize() if feed is not None else 0,
            None if since is None else time.monotonic() - since,
        )
    training = daemon.training
    learning, curves = None, ()
    if training is not None:
        learning = learning_status(training)
        curves = training.curves.points()
    broker = "connected"
    if feed is not None:
        if (problem := feed.problem()) is not None:
            broker = f"FAILED ({problem})"
        elif not feed.connected.is_set():
            broker = "DISCONNECTED"
    return Status(
        examples=totals.examples if totals else 0,
        rejected=totals.rejected if totals else 0,
        intake=intake_status,
        learning=learning,
        curves=curves,
        model=latest_manifest(daemon.settings),
        rollout=rollout_of(daemon.settings),
        rollout_judged=_judged(daemon),
        broker=broker,
        stalled=dict(daemon.withholding),
        fleet=daemon.api.fleet.view() if daemon.api is not None else None,
        in_field=tuple(daemon.field.current()) if daemon.field is not None else (),
        reports=_reports(daemon),
        photos=_photos(daemon),
        labelling=daemon.field.labelling() if daemon.field is not None else {},
        drift=daemon.scout.drift if daemon.scout is not None else None,
        drift_waiting=daemon.scout.drift_waiting if daemon.scout is not None else None,
    )


def _judged(daemon: Any) -> str | None:
    watch = daemon.rollout
    if watch is None or watch.last is None:
        return None
    return f"{watch.last.action}: {watch.last.reason}"


def _reports(daemon: Any) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    intake, feed, api = daemon.intake, daemon.feed, daemon.api
    if intake is not None and feed is not None and feed.telemetry_topic is not None:
        out["mqtt", "counted"] = intake.reports
        out["mqtt", "resent"] = intake.resent_reports
    if api is not None and api.reports is not None:
        out.update({("http", outcome): n for outcome, n in api.report_outcomes.items()})
    return out


def _photos(daemon: Any) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    intake, feed, api = daemon.intake, daemon.feed, daemon.api
    if intake is not None and feed is not None and feed.photos_topic is not None:
        out["mqtt", "queued"] = intake.photos_queued
        out["mqtt", "resent"] = intake.photos_resent
        out["mqtt", "capped"] = intake.rejected.get("photo_cap", 0)
    if api is not None and api.photos is not None:
        out.update({("http", outcome): n for outcome, n in api.photo_outcomes.items()})
    return out


def learning_status(training: Any) -> LearningStatus:
    """The learner of a :class:`daemon.learning.training.Training`."""
    lr = training.learner
    holdout, labels = lr.holdout, lr.reader.labels  # each replaced, not changed, by the learner's thread
    return LearningStatus(
        backbone=lr.spec.name,
        mode=lr.mode,
        device=str(lr.device),
        steps=lr.step,
        learned=lr.trained,
        high_water_mark=lr.high_water_mark,
        backlog=training.backlog,
        classes=tuple(lr.labels),
        loss=lr.last_loss,
        prequential=lr.prequential.rolling,
        prequential_overall=lr.prequential.overall,
        holdout=holdout.accuracy,
        holdout_per_class=dict(holdout.per_class),
        holdout_at_step=holdout.at_step,
        average_forgetting=holdout.average_forgetting,
        nonfinite_skipped=lr.nonfinite_skipped,
        divergence_restores=lr.divergence_restores,
        decoded_ahead=lr.inputs.read_ahead_decoded,
        decoder_fallbacks=lr.inputs.decode_pool.fallbacks,
        decoded_short_of_slots=lr.inputs.decode_pool.short,
        aliases=dict(labels.aliases),
        retired=frozenset(labels.retired),
        label_changes_applied=labels.last,
    )


def latest_manifest(settings: Any) -> dict | None:
    """The registry's latest manifest as served, or None before the first publish (or when unreadable)."""
    try:
        manifest = json.loads((registry_root(settings.state_dir) / settings.model.name / "latest").read_bytes())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def rollout_of(settings: Any) -> dict | None:
    """The model's staged rollout as a dict (with its ``percent``), or None: never had one, or unreadable."""
    try:
        rollout = staged.read(registry_root(settings.state_dir) / settings.model.name)
    except RegistryError:
        return None
    return rollout.as_dict() if rollout is not None else None


def pct(value: float | None) -> str:
    """An accuracy as the views print it: ``-`` when there is none yet.

    >>> pct(0.8125), pct(None)
    ('81.2%', '-')
    """
    return "-" if value is None else f"{100 * value:.1f}%"


def fraction(value: float | None) -> str:
    """An accuracy or loss as the log lines print it.

    >>> fraction(0.8125), fraction(None)
    ('0.812', '-')
    """
    return "-" if value is None else f"{value:.3f}"
