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
import torch
from torch import nn

from daemon import checkpoint
from daemon.exporter import RuntimeReport, convert, float_probabilities, snapshot, verify_litert
from daemon.imaging import load_rgb
from daemon.head import GrowingHead
from daemon.registry import Registry
from daemon.settings import Settings
from daemon.store import StoreReader
from models import zoo

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
        snap = _restored(settings, reader)
        size = settings.model.input_size
        images, labels = _holdout(snap, reader, size, settings.training.holdout_max_examples)
        model = snapshot(snap.backbone, snap.head, snap.spec.preprocessing)
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
        "examples_trained": snap.trained,
        "high_water_mark": snap.high_water_mark,
    }
    reasons = gate(report, float_top1, registry.latest(), settings)
    fields = {
        "base": snap.spec.name,
        "labels": list(snap.labels),
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


@dataclass
class Snapshot:
    """The network of a checkpoint, rebuilt without a Learner (no optimizer, no cache, no global torch state)."""

    spec: zoo.BackboneSpec
    backbone: nn.Module
    head: GrowingHead
    labels: list[str]
    trained: int
    high_water_mark: int


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


def _restored(settings: Settings, reader: StoreReader) -> Snapshot:
    payload = checkpoint.load(settings.state_dir / "checkpoints")
    if payload is None:
        raise NothingToExport("no checkpoint yet: let the daemon learn first (it checkpoints every "
                              f"{settings.training.checkpoint_every_s:.0f} s)")
    if payload["backbone"] != settings.model.backbone or payload["input_size"] != settings.model.input_size:
        raise NothingToExport(
            f"the checkpoint is of {payload['backbone']} at {payload['input_size']} px; this config says "
            f"{settings.model.backbone} at {settings.model.input_size} px"
        )
    if not payload["labels"]:
        raise NothingToExport("the model knows no class yet")
    spec = zoo.get(payload["backbone"])
    # The same seed as the learner's, for a backbone without shipped weights (whose random init the
    # checkpoint does not store in head mode), inside fork_rng so the daemon's own RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.training.seed)
        backbone = zoo.load_backbone(spec.name, pretrained=spec.pretrained is not None)
    if settings.model.weights_file is not None:
        zoo.load_weights(backbone, settings.model.weights_file)
    if payload["backbone_state"] is not None:
        backbone.load_state_dict(payload["backbone_state"])
    head = GrowingHead(spec.embedding_size, len(payload["labels"]))
    head.load_state_dict(payload["head"])
    return Snapshot(spec, backbone.eval(), head.eval(), list(payload["labels"]), payload["trained"],
                    payload["high_water_mark"])


def _holdout(snap: Snapshot, reader: StoreReader, size: int, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The most recent holdout examples of known classes, as uint8 RGB at the model's input size."""
    known = {label: i for i, label in enumerate(snap.labels)}
    pairs = [(seq, label) for seq, label in reader.labels_up_to(snap.high_water_mark, "holdout") if label in known][-most:]
    images, labels = [], []
    for e in reader.by_seq([seq for seq, _ in pairs]):
        rgb = load_rgb(e.image, size)
        if rgb is not None:
            images.append(rgb)
            labels.append(known[e.label])
    if not images:
        raise NothingToExport("no holdout examples of the known classes yet: the gates need some to score the model")
    return np.stack(images), np.array(labels)
