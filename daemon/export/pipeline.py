"""One export: snapshot the learner's last checkpoint, convert, verify, gate, and publish or record the rejection.

``sprout export`` runs this on demand, beside a running daemon or not: it
reads the checkpoint and the store, never writes them. A candidate is
published only when on every runtime of ``export.runtimes`` it loads and
runs, no output is NaN, its holdout top-1 is within ``export.max_drop_pts``
of the float model's, and not below the published model's on that runtime
minus ``export.tolerance_pts``. Otherwise the registry's log records it with
its reasons, and the next mode of ``export.quantization`` is tried (int8,
then fp16 by default: the smallest model that is as good as the float one).

Label changes (``sprout labels``) the checkpoint predates are applied to the
snapshot, and the holdout is read under the same labels, so the published
labels.txt is the store's today; the registry's log records each change
before the version that carries it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from daemon.common.settings import Settings
from daemon.export.converter import convert, float_probabilities, input_dtype, snapshot
from daemon.export.lossy_modes import LossyModes
from daemon.export.metadata import describe, stamp_version
from daemon.export.published_scores import PublishedScores
from daemon.export.verification import RuntimeReport, verify
from daemon.learning import checkpoint
from daemon.learning.head import GrowingHead
from daemon.registry.versions import Registry
from daemon.store.examples import StoreReader
from daemon.store.labels import LabelMap, outputs_after
from edge.preprocess import load_rgb
from models import zoo

log = logging.getLogger("sprout.export")


class Reason(str):
    """Why a candidate was refused: the sentence for people, and a ``kind`` for metrics and alerts.

    Kinds: runtime_failed, nonfinite, accuracy_drop, regression, unverified.
    """

    kind: str

    def __new__(cls, text: str, kind: str) -> Reason:
        reason = super().__new__(cls, text)
        reason.kind = kind
        return reason


class NothingToExport(Exception):
    """No checkpoint or no holdout examples yet; the message says what to wait for."""


@dataclass
class Outcome:
    published: dict[str, Any] | None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: list[str] = field(
        default_factory=list
    )  # modes resting after an accuracy refusal (daemon/export/lossy_modes.py)


def export_once(settings: Settings) -> Outcome:
    """Try each mode of ``export.quantization`` in order; publish the first candidate that passes every gate."""
    started = time.perf_counter()
    cfg = settings.export
    lossy = LossyModes(settings.state_dir)
    modes = [m for m in cfg.quantization if m == cfg.quantization[-1] or not lossy.resting(m)]
    clock = _Stages()
    reader = StoreReader(settings.state_dir / "examples.db")
    try:
        changes = reader.label_changes()
        reader.labels = LabelMap.replay(changes)
        snap = _restored(settings, reader)
        size = settings.model.input_size
        seqs, images, labels = _holdout(snap, reader, size, cfg.verify_examples)
        calibration = (
            _calibration(snap, reader, size, cfg.calibration_examples, settings.training.seed)
            if "int8" in modes
            else []
        )
    finally:
        reader.close()
    clock.lap("data")
    model = snapshot(snap.backbone, snap.head, snap.spec.preprocessing)
    reference = float_probabilities(model, images)
    float_top1 = float((reference.argmax(1) == labels).mean())
    clock.lap("float")
    registry = Registry.from_settings(settings)
    registry.record_label_changes(changes)  # `sprout labels` records them too; one it could not is logged here
    baseline = _baseline(registry, settings, seqs, images, [snap.labels[i] for i in labels])
    clock.lap("published")
    outcome = Outcome(None)
    for mode in cfg.quantization:
        if mode not in modes:
            log.info(
                "%s skipped: refused for its accuracy drop at an earlier export, tried again in %d more "
                "(export.skip_lossy_mode_for)",
                mode,
                lossy.resting(mode) - 1,
            )
            lossy.skipped(mode)
            outcome.skipped.append(mode)
            continue
        fields, tflite, reports, reasons = _candidate(
            settings,
            snap,
            model,
            mode,
            images,
            labels,
            reference,
            float_top1,
            calibration if mode == "int8" else [],
            baseline,
        )
        outcome.metrics = fields["metrics"]
        clock.lap(mode)
        if reasons:
            registry.record_rejection(fields, reasons)
            outcome.reasons += [Reason(f"{mode}: {r}", r.kind) for r in reasons]
            # The gates at work, not a fault while another mode is left to try; refusing the last is news.
            last = mode == cfg.quantization[-1]
            log.log(
                logging.WARNING if last else logging.INFO,
                "%s export rejected: %s%s",
                mode,
                "; ".join(reasons),
                "" if last else "; trying the next mode",
            )
            if any(getattr(r, "kind", "") == "accuracy_drop" for r in reasons) and mode != cfg.quantization[-1]:
                lossy.refused_for_accuracy(mode, cfg.skip_lossy_mode_for)
            else:
                lossy.tried(mode)
            continue
        lossy.tried(mode)
        # The very bytes that were verified, with the registry's version number written over the metadata's
        # placeholder (stamp_version changes nothing else: same length, no tensor or op touched).
        outcome.published = registry.publish(tflite, fields, stamp=stamp_version)
        _remember(settings, outcome.published["version"], reports, seqs, snap.labels)
        log.info(
            "published version %d (%s, holdout top-1 %s; float %.1f%%)",
            outcome.published["version"],
            mode,
            ", ".join(f"{k} {100 * v:.1f}%" for k, v in fields["metrics"]["holdout_top1"].items()),
            100 * float_top1,
        )
        break
    try:
        lossy.save()
    except OSError as err:  # the outcome stands; a mode that should rest is tried at the next export
        log.warning("could not record which modes rest: %s", err)
    outcome.seconds = time.perf_counter() - started
    if outcome.metrics:
        outcome.metrics["stages_s"] = clock.laps
    log.info("export took %.1fs: %s", outcome.seconds, clock)
    return outcome


class _Stages:
    """Seconds per stage of an export, for its log line and metrics: where an export's time goes."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._at = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._at, 2)
        self._at = now

    def __str__(self) -> str:
        names = {
            "data": "holdout and calibration images",
            "float": "float reference",
            "published": "published version's predictions",
        }
        return ", ".join(f"{names.get(k, f'{k} convert and verify')} {v:.1f}s" for k, v in self.laps.items())


def _candidate(
    settings: Settings,
    snap: Snapshot,
    model: nn.Module,
    mode: str,
    images: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    float_top1: float,
    calibration: list[np.ndarray],
    baseline: Baseline | None,
) -> tuple[dict[str, Any], bytes, list[RuntimeReport], list[str]]:
    """Convert in ``mode`` and verify on every runtime: the manifest fields, the bytes, the reports, why not to ship."""
    cfg = settings.export
    size = settings.model.input_size
    converted = time.perf_counter()
    # With its TFLite Model Metadata (labels.txt, input description) before verification: every runtime
    # checks the file devices and platform classifiers get (daemon/export/metadata.py).
    tflite = describe(
        convert(model, mode, size, calibration),
        name=settings.model.name,
        labels=list(snap.labels),
        input_size=size,
        base=snap.spec.name,
        quantization=mode,
    )
    convert_s = time.perf_counter() - converted
    reports = verify(tflite, images, labels, reference, cfg.runtimes, _pythons(settings), cfg.verify_timeout_s)
    ran = [r for r in reports if r.error is None]
    metrics = {
        "holdout_top1_float": float_top1,
        "holdout_top1": {r.runtime: r.top1 for r in ran},
        "agreement_with_float": {r.runtime: r.agreement for r in ran},
        "latency_ms": {r.runtime: r.latency_ms for r in ran},
        "holdout_examples": len(labels),
        "calibration_examples": len(calibration),
        "examples_trained": snap.trained,
        "high_water_mark": snap.high_water_mark,
        "size_bytes": len(tflite),
        "convert_s": round(convert_s, 2),
    }
    if baseline is not None:
        metrics["published_top1_same_holdout"] = {"version": baseline.version, **baseline.top1}
        metrics["published_rescored_examples"] = baseline.rescored
    fields = {
        "base": snap.spec.name,
        "labels": list(snap.labels),
        "input": {"shape": [1, size, size, 3], "layout": "NHWC", "dtype": input_dtype(mode), "range": [0, 255]},
        "quantization": mode,
        "metrics": metrics,
        "runtimes_verified": [{"name": r.runtime, "version": r.version} for r in ran],
    }
    return fields, tflite, reports, gate(reports, float_top1, baseline, settings)


@dataclass(frozen=True)
class Baseline:
    """The published model scored on this export's holdout: a candidate is compared on the same images."""

    version: int
    top1: dict[str, float]  # runtime -> holdout top-1
    rescored: int = 0  # holdout examples the published version had not been run on before this export


def _baseline(
    registry: Registry, settings: Settings, seqs: list[int], images: np.ndarray, names: list[str]
) -> Baseline | None:
    """The latest published version's top-1 on the candidate's holdout images, on every runtime.

    Its top-1 at publish time was measured on the holdout of that day; the holdout grows and shifts (new
    classes, new examples), so only a score on the same images says whether the candidate is worse.
    A class the published model does not know counts as a miss for it. Its predictions are kept per
    example (daemon/export/published_scores.py): only holdout examples it has not seen yet are run.
    """
    latest = registry.latest()
    if latest is None:
        return None
    size = settings.model.input_size
    if list(latest["input"]["shape"][1:3]) != [size, size]:
        log.info(
            "published version %d takes %s input, this config %d px: no comparison with it",
            latest["version"],
            latest["input"]["shape"],
            size,
        )
        return None
    runtimes = list(settings.export.runtimes)
    scores = PublishedScores(settings.state_dir, latest["version"])
    at = {seq: i for i, seq in enumerate(seqs)}
    rescored: set[int] = set()
    failed: set[str] = set()
    # A second pass only when an interpreter reports another version than the one that made the kept
    # predictions (an upgrade): those are dropped and every example is run on it again.
    for _ in range(2):
        missing = sorted({s for r in runtimes if r not in failed for s in scores.missing(r, seqs)})
        if not missing:
            break
        reports = verify(
            registry.model_path(latest["version"]).read_bytes(),
            images[[at[s] for s in missing]],
            None,
            None,
            [r for r in runtimes if r not in failed],
            _pythons(settings),
            settings.export.verify_timeout_s,
        )
        rescored.update(missing)
        for r in reports:
            if r.error is not None or r.predicted is None:
                failed.add(r.runtime)
                log.warning(
                    "published version %d could not be scored on %s (%s): no comparison there",
                    latest["version"],
                    r.runtime,
                    r.error,
                )
                continue
            scores.add(r.runtime, r.version, missing, [latest["labels"][i] for i in r.predicted])
    try:
        scores.save()
    except OSError as err:  # a cache: the comparison stands, the next export scores these examples again
        log.warning("could not keep version %d's holdout predictions: %s", latest["version"], err)
    top1 = {r: t for r in runtimes if (t := scores.top1(r, seqs, names)) is not None}
    return Baseline(latest["version"], top1, len(rescored))


def _remember(
    settings: Settings, version: int, reports: list[RuntimeReport], seqs: list[int], labels: list[str]
) -> None:
    """The new version's predictions on the holdout it was just verified on: the next export's baseline."""
    scores = PublishedScores(settings.state_dir, version)
    for r in reports:
        if r.error is None and r.predicted is not None:
            scores.add(r.runtime, r.version, seqs, [labels[i] for i in r.predicted])
    try:
        scores.save()
    except OSError as err:  # published all the same; the next export scores this version itself
        log.warning("could not keep version %d's holdout predictions: %s", version, err)


def _pythons(settings: Settings) -> dict | None:
    python = settings.export.tflite_runtime_python
    return {"tflite-runtime": python} if python else None


@dataclass
class Snapshot:
    """The network of a checkpoint, rebuilt without a Learner (no optimizer, no cache, no global torch state)."""

    spec: zoo.BackboneSpec
    backbone: nn.Module
    head: GrowingHead
    labels: list[str]
    trained: int
    high_water_mark: int


def gate(reports: list[RuntimeReport], float_top1: float, baseline: Baseline | None, settings: Settings) -> list[str]:
    """Why the candidate must not ship, on every runtime; empty when it may."""
    reasons = []
    if not reports:
        reasons.append(Reason("no runtime verified the candidate (export.runtimes is empty)", "unverified"))
    for report in reports:
        name = f"{report.runtime} {report.version}" if report.version != "unknown" else report.runtime
        if report.error is not None:
            reasons.append(Reason(f"{name} could not load or run the model: {report.error}", "runtime_failed"))
            continue
        if report.nonfinite:
            reasons.append(Reason(f"{name} returned NaN or infinite outputs", "nonfinite"))
        top1 = report.top1 or 0.0
        drop = 100 * (float_top1 - top1)
        if drop > settings.export.max_drop_pts:
            reasons.append(
                Reason(
                    f"holdout top-1 on {name} is {100 * top1:.1f}%, {drop:.1f} points below the float model's "
                    f"{100 * float_top1:.1f}% (limit export.max_drop_pts = {settings.export.max_drop_pts})",
                    "accuracy_drop",
                )
            )
        previous = baseline.top1.get(report.runtime) if baseline is not None else None
        if previous is not None and 100 * (previous - top1) > settings.export.tolerance_pts:
            reasons.append(
                Reason(
                    f"holdout top-1 on {name} is {100 * top1:.1f}%, below the published version {baseline.version}'s "
                    f"{100 * previous:.1f}% on the same images by more than export.tolerance_pts = "
                    f"{settings.export.tolerance_pts} points",
                    "regression",
                )
            )
    return reasons


def _restored(settings: Settings, reader: StoreReader) -> Snapshot:
    """The checkpoint's network, with the label changes it predates up to ``reader.labels`` applied."""
    payload = checkpoint.load(settings.state_dir / "checkpoints")
    if payload is None:
        raise NothingToExport(
            "no checkpoint yet: let the daemon learn first (it checkpoints every "
            f"{settings.training.checkpoint_every_s:.0f} s)"
        )
    if payload["backbone"] != settings.model.backbone or payload["input_size"] != settings.model.input_size:
        raise NothingToExport(
            f"the checkpoint is of {payload['backbone']} at {payload['input_size']} px; this config says "
            f"{settings.model.backbone} at {settings.model.input_size} px"
        )
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
    labels = list(payload["labels"])
    # As the learner applies them at its next step (a stopped daemon's: at its next start).
    for change in reader.label_changes(payload.get("label_change", 0)):
        if change.id <= reader.labels.last:
            labels, removed = outputs_after(labels, change)
            if removed is not None:
                head.remove(removed)
    if not labels:
        raise NothingToExport("the model knows no class yet")
    return Snapshot(spec, backbone.eval(), head.eval(), labels, payload["trained"], payload["high_water_mark"])


def _holdout(snap: Snapshot, reader: StoreReader, size: int, most: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The most recent holdout examples of known classes: their seqs, uint8 RGB at the model's input size, labels."""
    known = {label: i for i, label in enumerate(snap.labels)}
    pairs = [(seq, label) for seq, label in reader.labels_up_to(snap.high_water_mark, "holdout") if label in known][
        -most:
    ]
    seqs, images, labels = [], [], []
    for e in reader.by_seq([seq for seq, _ in pairs]):
        rgb = load_rgb(e.image, size)
        if rgb is not None:
            seqs.append(e.seq)
            images.append(rgb)
            labels.append(known[e.label])
    if not images:
        raise NothingToExport("no holdout examples of the known classes yet: the gates need some to score the model")
    return seqs, np.stack(images), np.array(labels)


def _calibration(snap: Snapshot, reader: StoreReader, size: int, most: int, seed: int) -> list[np.ndarray]:
    """A class-balanced sample of stored training examples, as uint8 RGB: what int8 ranges are measured on.

    Balanced, so a class with few examples still sets the ranges its features need; drawn across the whole
    history with a fixed seed, so two exports of the same checkpoint calibrate alike.
    """
    by_label: dict[str, list[int]] = {}
    for seq, label in reader.labels_up_to(snap.high_water_mark, "train"):
        by_label.setdefault(label, []).append(seq)
    rng = np.random.default_rng(seed)
    per_label = max(1, most // max(1, len(by_label)))
    seqs = []
    for label in sorted(by_label):
        pool = by_label[label]
        seqs += [pool[i] for i in sorted(rng.choice(len(pool), size=min(per_label, len(pool)), replace=False))]
    images = [rgb for e in reader.by_seq(seqs) if (rgb := load_rgb(e.image, size)) is not None]
    if not images:
        raise NothingToExport("no stored training examples to calibrate the int8 model on yet")
    return images
