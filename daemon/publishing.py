"""One export: snapshot the learner's last checkpoint, convert, verify, gate, and publish or record the rejection.

``sprout export`` runs this on demand, beside a running daemon or not: it
reads the checkpoint and the store, never writes them. The candidate is
published only when it runs on the target interpreter, no output is NaN, its
holdout top-1 there is within ``export.max_drop_pts`` of the float model's,
and not below the published model's minus ``export.tolerance_pts``.
Otherwise the registry's log records it with its reasons.

This slice exports float32 (``quantization: none``); int8 joins once its
recipe passes these gates (docs/benchmarks.md, "Export").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon import checkpoint
from daemon.exporter import RuntimeReport, convert, float_probabilities, snapshot, verify_litert
from daemon.imaging import load_rgb
from daemon.learner import Learner
from daemon.registry import Registry
from daemon.settings import Settings
from daemon.store import StoreReader

log = logging.getLogger("sprout.export")

MODE = "none"


class NothingToExport(Exception):
    """No checkpoint or no holdout examples yet; the message says what to wait for."""


@dataclass
class Outcome:
    published: dict[str, Any] | None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def export_once(settings: Settings) -> Outcome:
    started = time.perf_counter()
    reader = StoreReader(settings.state_dir / "examples.db")
    try:
        learner = _restored_learner(settings, reader)
        size = settings.model.input_size
        images, labels = _holdout(learner, reader, size)
        model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
        reference = float_probabilities(model, images)
        float_top1 = float((reference.argmax(1) == labels).mean())
        tflite = convert(model, MODE, size)
        report = verify_litert(tflite, images, labels, reference)
    finally:
        reader.close()
    registry = Registry.from_settings(settings)
    metrics = {
        "holdout_top1_float": float_top1,
        "holdout_top1": {report.runtime: report.top1},
        "agreement_with_float": {report.runtime: report.agreement},
        "latency_ms": {report.runtime: report.latency_ms},
        "holdout_examples": len(labels),
        "examples_trained": learner.trained,
        "high_water_mark": learner.high_water_mark,
    }
    reasons = gate(report, float_top1, registry.latest(), settings)
    fields = {
        "base": learner.spec.name,
        "labels": list(learner.labels),
        "input": {"shape": [1, size, size, 3], "layout": "NHWC", "dtype": "float32", "range": [0, 255]},
        "quantization": MODE,
        "metrics": metrics,
        "runtimes_verified": [{"name": report.runtime, "version": report.version}],
    }
    outcome = Outcome(None, reasons, metrics)
    if reasons:
        registry.record_rejection(fields, reasons)
        log.warning("export rejected: %s", "; ".join(reasons))
    else:
        outcome.published = registry.publish(tflite, fields)  # the very bytes that were verified
        log.info("published version %d (top-1 %.3f on %s)", outcome.published["version"], report.top1, report.runtime)
    outcome.seconds = time.perf_counter() - started
    return outcome


def gate(report: RuntimeReport, float_top1: float, latest: dict[str, Any] | None, settings: Settings) -> list[str]:
    """Why the candidate must not ship; empty when it may."""
    reasons = []
    if report.nonfinite:
        reasons.append(f"{report.runtime} returned NaN or infinite outputs")
    top1 = report.top1 or 0.0
    drop = 100 * (float_top1 - top1)
    if drop > settings.export.max_drop_pts:
        reasons.append(
            f"holdout top-1 on {report.runtime} is {100 * top1:.1f}%, {drop:.1f} points below the float model "
            f"(limit {settings.export.max_drop_pts})"
        )
    if latest is not None:
        previous = (latest.get("metrics", {}).get("holdout_top1") or {}).get(report.runtime)
        if previous is not None and 100 * (previous - top1) > settings.export.tolerance_pts:
            reasons.append(
                f"holdout top-1 {100 * top1:.1f}% is below the published version {latest['version']}'s "
                f"{100 * previous:.1f}% by more than {settings.export.tolerance_pts} points"
            )
    return reasons


def _restored_learner(settings: Settings, reader: StoreReader) -> Learner:
    payload = checkpoint.load(settings.state_dir / "checkpoints")
    if payload is None:
        raise NothingToExport("no checkpoint yet: let the daemon learn first (it checkpoints every "
                              f"{settings.training.checkpoint_every_s:.0f} s)")
    learner = Learner(settings.model, settings.training, settings.state_dir, reader)
    if not learner.restore(payload):
        raise NothingToExport("the checkpoint was made for another backbone, input size or mode than this config")
    if not learner.labels:
        raise NothingToExport("the model knows no class yet")
    return learner


def _holdout(learner: Learner, reader: StoreReader, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The recent holdout examples of known classes, as uint8 RGB at the model's input size."""
    known = {label: i for i, label in enumerate(learner.labels)}
    pairs = [(seq, label) for seq, label in learner.holdout_index if label in known]
    images, labels = [], []
    for e in reader.by_seq([seq for seq, _ in pairs]):
        rgb = load_rgb(e.image, size)
        if rgb is not None:
            images.append(rgb)
            labels.append(known[e.label])
    if not images:
        raise NothingToExport("no holdout examples of the known classes yet: the gates need some to score the model")
    return np.stack(images), np.array(labels)

