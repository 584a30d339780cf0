"""One export: snapshot the learner's last checkpoint, convert, verify, gate, and publish or record the rejection.

``sprout export`` runs this on demand, beside a running daemon or not: it
reads the checkpoint and the store, never writes them. Each mode of
``export.quantization`` is tried in order (int8, then fp16 by default: the
smallest model that is as good as the float one): converted
(converter.py), described (metadata.py), run on every runtime
(verification.py) and judged (gates.py). The first candidate that passes is
published; each refused one is recorded in the registry's log with its
reasons. A mode refused for its accuracy drop rests for some exports
(lossy_modes.py). The published version's scores on the holdout are kept
(published_scores.py).

Label changes (``sprout labels``) the checkpoint predates are applied to the
snapshot, and the holdout is read under the same labels, so the published
labels.txt is the store's today; the registry's log records each change
before the version that carries it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from daemon.common.settings import Settings
from daemon.export import images as stored
from daemon.export.conversions import Conversions, Converted
from daemon.export.converter import Deployable, input_dtype, snapshot
from daemon.export.float_reference import float_embeddings, float_reference
from daemon.export.gates import Baseline, Holdout, Refusal, RefusalKind, judge
from daemon.export.head_patch import head_of
from daemon.export.head_verification import Embeddings, keep_embeddings, verify_patched
from daemon.export.int8_fit import Int8Fit
from daemon.export.job import ExportJob
from daemon.export.lossy_modes import LossyModes
from daemon.export.metadata import describe, stamp_version
from daemon.export.outcome import ExportOutcome, NothingToExport
from daemon.export.published_scores import published_baseline, remember
from daemon.export.verification import RuntimeReport, pythons, verify
from daemon.learning import checkpoint
from daemon.learning.head import GrowingHead
from daemon.registry.versions import Registry
from daemon.store.labels import LabelChange, LabelMap, outputs_after
from daemon.store.reader import StoreReader
from models import zoo

__all__ = ["ExportJob", "ExportOutcome", "NothingToExport", "export_once"]

log = logging.getLogger("sprout.export")


@dataclass
class Snapshot:
    """The network of a checkpoint, rebuilt without a Learner (no optimizer, no cache, no global torch state)."""

    spec: zoo.BackboneSpec
    backbone: nn.Module
    head: GrowingHead
    labels: list[str]
    trained: int
    high_water_mark: int


@dataclass
class Inputs:
    """What an export reads from the state folder, once: the network, the holdout, the calibration images."""

    changes: list[LabelChange]  # every label change, for the registry's log
    snap: Snapshot
    seqs: list[int]  # the holdout examples, by store seq
    images: np.ndarray  # uint8 (N, H, W, 3) at the model's input size
    labels: np.ndarray  # label index per holdout image
    calibration_seqs: list[int]  # int8's calibration examples, by store seq; empty unless int8 is tried
    calibration: list[np.ndarray]  # their uint8 RGB images
    distillation_seqs: list[int]  # the training examples int8's classifier is distilled on; empty unless int8


@dataclass
class Candidate:
    """One mode's converted model, its manifest fields, its runtimes' reports and the gates' refusals."""

    mode: str
    fields: dict[str, Any]
    tflite: bytes
    reports: list[RuntimeReport]
    refusals: list[Refusal]


def export_once(job: ExportJob | Settings) -> ExportOutcome:
    """Try each mode of ``export.quantization`` in order; publish the first candidate that passes every gate.

    The export process hands its :class:`ExportJob`; ``sprout export`` and tests may hand the Settings.
    """
    job = job if isinstance(job, ExportJob) else ExportJob.from_settings(job)
    return _Export(job).run()


class _Export:
    """One export's state as it goes through the modes; :meth:`run` is the whole of it."""

    def __init__(self, job: ExportJob):
        self.job, self.cfg = job, job.export
        self.started = time.perf_counter()
        self.clock = _Stages()
        self.lossy = LossyModes(job.state_dir)
        self.reasons: list[Refusal] = []
        self.skipped: list[str] = []
        self.metrics: dict[str, Any] = {}
        self.published: dict[str, Any] | None = None

    def run(self) -> ExportOutcome:
        modes = [m for m in self.cfg.quantization if m == self.cfg.quantization[-1] or not self.lossy.resting(m)]
        inputs = _read(self.job, with_calibration="int8" in modes)
        self.clock.lap("data")
        model = snapshot(inputs.snap.backbone, inputs.snap.head, inputs.snap.spec.preprocessing)
        reference = float_reference(model, inputs.seqs, inputs.images, self.job.state_dir)
        float_top1 = float((reference.argmax(1) == inputs.labels).mean())
        self.clock.lap("float")
        registry = self.job.open_registry()
        registry.record_label_changes(inputs.changes)  # `sprout labels` records them too; one it could not is here
        names = [inputs.snap.labels[i] for i in inputs.labels]
        baseline = published_baseline(registry, self.job, inputs.seqs, inputs.images, names)
        self.clock.lap("published")
        for mode in self.cfg.quantization:
            if mode not in modes:
                self._rest(mode)
                continue
            c = _candidate(self.job, inputs, model, mode, reference, float_top1, baseline)
            if _stale(c):
                # The kept conversion's int8 ranges were calibrated on the examples of its day (a first model's
                # few hundred): convert in full on today's before blaming the mode.
                self._refused(registry, c, retrying=True)
                full = "the patched candidate lost accuracy: recalibrating on today's examples"
                c = _candidate(self.job, inputs, model, mode, reference, float_top1, baseline, full=full)
            self.metrics = c.fields["metrics"]
            self.clock.lap(mode)
            if not c.refusals:
                self._publish(registry, c, inputs, float_top1)
                break
            self._refused(registry, c)
        return self._finish()

    def _rest(self, mode: str) -> None:
        log.info(
            "%s skipped: refused for its accuracy drop at an earlier export, tried again in %d more "
            "(export.skip_lossy_mode_for)",
            mode,
            self.lossy.resting(mode) - 1,
        )
        self.lossy.skipped(mode)
        self.skipped.append(str(mode))

    def _refused(self, registry: Registry, c: Candidate, retrying: bool = False) -> None:
        registry.record_rejection(
            c.fields, [str(r) for r in c.refusals], [r.model_dump(mode="json", exclude_none=True) for r in c.refusals]
        )
        self.reasons += [r.in_mode(c.mode) for r in c.refusals]
        if retrying:
            log.info(
                "%s patched export rejected: %s; converting in full", c.mode, "; ".join(str(r) for r in c.refusals)
            )
            return
        # The gates at work, not a fault while another mode is left to try; refusing the last is news.
        last = c.mode == self.cfg.quantization[-1]
        log.log(
            logging.WARNING if last else logging.INFO,
            "%s export rejected: %s%s",
            c.mode,
            "; ".join(str(r) for r in c.refusals),
            "" if last else "; trying the next mode",
        )
        if not last and any(r.kind is RefusalKind.ACCURACY_DROP for r in c.refusals):
            self.lossy.refused_for_accuracy(c.mode, self.cfg.skip_lossy_mode_for)
        else:
            self.lossy.tried(c.mode)

    def _publish(self, registry: Registry, c: Candidate, inputs: Inputs, float_top1: float) -> None:
        self.lossy.tried(c.mode)
        # The very bytes that were verified, with the registry's version number written over the metadata's
        # placeholder (stamp_version changes nothing else: same length, no tensor or op touched).
        self.published = registry.publish(c.tflite, c.fields, stamp=stamp_version, stages=self.job.rollout.stages)
        remember(self.job, self.published["version"], c.reports, inputs.seqs, inputs.snap.labels)
        log.info(
            "published version %d (%s, holdout top-1 %s; float %.1f%%)",
            self.published["version"],
            c.mode,
            ", ".join(f"{k} {100 * v:.1f}%" for k, v in c.fields["metrics"]["holdout_top1"].items()),
            100 * float_top1,
        )

    def _finish(self) -> ExportOutcome:
        try:
            self.lossy.save()
        except OSError as err:  # the outcome stands; a mode that should rest is tried at the next export
            log.warning("could not record which modes rest: %s", err)
        seconds = time.perf_counter() - self.started
        if self.metrics:
            self.metrics["stages_s"] = self.clock.laps
        log.info("export took %.1fs: %s", seconds, self.clock)
        return ExportOutcome(
            published=self.published,
            reasons=tuple(self.reasons),
            metrics=self.metrics,
            seconds=seconds,
            skipped=tuple(self.skipped),
        )


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


def _read(job: ExportJob, with_calibration: bool) -> Inputs:
    """The checkpoint's network under today's labels, the holdout, and (for int8) the calibration images."""
    cfg, size = job.export, job.model.input_size
    reader = StoreReader(job.store)
    try:
        changes = reader.label_changes()
        reader.labels = LabelMap.replay(changes)
        snap = _restored(job, reader)
        seqs, images, labels = stored.holdout(reader, snap.labels, snap.high_water_mark, size, cfg.verify_examples)
        calibration_seqs: list[int] = []
        calibration: list[np.ndarray] = []
        distillation: list[int] = []
        if with_calibration:
            calibration_seqs, calibration = stored.calibration(
                reader, snap.high_water_mark, size, cfg.calibration_examples, job.seed
            )
            distillation = stored.distillation_sample(reader, snap.high_water_mark, cfg.int8_distillation_examples)
    finally:
        reader.close()
    return Inputs(changes, snap, seqs, images, labels, calibration_seqs, calibration, distillation)


def _candidate(
    job: ExportJob,
    inputs: Inputs,
    model: Deployable,
    mode: str,
    reference: np.ndarray,
    float_top1: float,
    baseline: Baseline | None,
    full: str | None = None,
) -> Candidate:
    """Convert in ``mode`` (in ``full``, for that reason, when given), verify on every runtime and judge: the
    candidate with the gates' refusals."""
    cfg, size, snap = job.export, job.model.input_size, inputs.snap
    converted = time.perf_counter()
    calibration = inputs.calibration if mode == "int8" else []
    # The calibration images' float embeddings, kept from the exports before for those seen already.
    embedded = (
        float_embeddings(model, inputs.calibration_seqs, calibration, job.state_dir, "float-calibration")
        if calibration
        else None
    )
    head = head_of(model, calibration, embedded)
    fit = Int8Fit(job, model, head, calibration, inputs.distillation_seqs) if mode == "int8" else None
    conversion = Conversions(job.state_dir, cfg.full_conversion_every, cfg.full_conversion_min_interval_s).convert(
        model, mode, size, calibration, full=full, head=head, fit=fit
    )
    log.info("%s: %s conversion (%s)", mode, conversion.how, conversion.why)
    # With its TFLite Model Metadata (labels.txt, input description) before verification: every runtime
    # checks the file devices and platform classifiers get (daemon/export/metadata.py).
    tflite = describe(
        conversion.tflite,
        name=job.model.name,
        labels=list(snap.labels),
        input_size=size,
        base=snap.spec.name,
        quantization=mode,
    )
    convert_s = time.perf_counter() - converted
    reports, verification = _verified(job, inputs, mode, conversion, tflite, reference)
    fields = _fields(job, inputs, mode, reports, float_top1, baseline, len(tflite), convert_s)
    fields["metrics"]["conversion"] = conversion.how
    fields["metrics"]["verification"] = verification
    if fit is not None:
        fields["metrics"].update(fit.metrics)
    verdict = judge(reports, float_top1, baseline, cfg, Holdout(inputs.labels, reference.argmax(1)))
    for passed in verdict.within_chance:
        log.info("%s: not refused: %s", mode, passed)
    return Candidate(mode, fields, tflite, reports, verdict.refusals)


def _stale(c: Candidate) -> bool:
    """A patched int8 candidate refused for its accuracy: its kept conversion's calibration may be what lost it."""
    patched = c.mode == "int8" and c.fields["metrics"].get("conversion") == "patched"
    return patched and any(r.kind is RefusalKind.ACCURACY_DROP for r in c.refusals)


def _verified(
    job: ExportJob, inputs: Inputs, mode: str, conversion: Converted, tflite: bytes, reference: np.ndarray
) -> tuple[list[RuntimeReport], str]:
    """Every runtime's report on the holdout, and how it was made: "kept_embeddings" when the classifier ran on
    embeddings kept from an earlier verification of the same backbone (head_verification.py), "every_image"
    when every holdout image went through the whole network (keeping its embeddings for the next export)."""
    cfg = job.export
    python_of = pythons(cfg.tflite_runtime_python)
    embeddings = Embeddings(job.state_dir, mode)
    started = time.perf_counter()
    try:
        verified = verify_patched(
            tflite,
            conversion.base,
            embeddings,
            inputs.seqs,
            inputs.images,
            inputs.labels,
            reference,
            cfg.runtimes,
            python_of,
            cfg.verify_timeout_s,
        )
    except Exception as err:  # a fault of this shortcut: the whole verification below still judges the file
        log.warning("%s: verification on kept embeddings failed (%r); running the file on every image", mode, err)
        verified = None
    if verified is not None:
        reports, reused = verified
        keep_embeddings(embeddings, conversion.base, reports, inputs.seqs)
        log.info(
            "%s: verified in %.1fs, %d of %d holdout images from kept embeddings",
            mode,
            time.perf_counter() - started,
            reused,
            len(inputs.seqs),
        )
        return reports, "kept_embeddings" if reused else "every_image"
    reports = verify(tflite, inputs.images, inputs.labels, reference, cfg.runtimes, python_of, cfg.verify_timeout_s)
    return reports, "every_image"


def _fields(
    job: ExportJob,
    inputs: Inputs,
    mode: str,
    reports: list[RuntimeReport],
    float_top1: float,
    baseline: Baseline | None,
    size_bytes: int,
    convert_s: float,
) -> dict[str, Any]:
    """The manifest's fields of a candidate, with the metrics its verification measured."""
    ran = [r for r in reports if r.error is None]
    snap, size = inputs.snap, job.model.input_size
    metrics = {
        "holdout_top1_float": float_top1,
        "holdout_top1": {r.runtime: r.top1 for r in ran},
        "agreement_with_float": {r.runtime: r.agreement for r in ran},
        "latency_ms": {r.runtime: r.latency_ms for r in ran},
        "holdout_examples": len(inputs.labels),
        "calibration_examples": len(inputs.calibration) if mode == "int8" else 0,
        "examples_trained": snap.trained,
        "high_water_mark": snap.high_water_mark,
        "size_bytes": size_bytes,
        "convert_s": round(convert_s, 2),
    }
    if baseline is not None:
        metrics["published_top1_same_holdout"] = {"version": baseline.version, **baseline.top1}
        metrics["published_rescored_examples"] = baseline.rescored
    return {
        "base": snap.spec.name,
        "labels": list(snap.labels),
        "input": {"shape": [1, size, size, 3], "layout": "NHWC", "dtype": input_dtype(mode), "range": [0, 255]},
        "quantization": mode,
        "metrics": metrics,
        "runtimes_verified": [{"name": r.runtime, "version": r.version} for r in ran],
    }


def _restored(job: ExportJob, reader: StoreReader) -> Snapshot:
    """The checkpoint's network, with the label changes it predates up to ``reader.labels`` applied."""
    saved = checkpoint.load(job.state_dir / "checkpoints")
    if saved is None:
        raise NothingToExport(
            f"no checkpoint yet: let the daemon learn first (it checkpoints every {job.checkpoint_every_s:.0f} s)"
        )
    if saved.backbone != job.model.backbone or saved.input_size != job.model.input_size:
        raise NothingToExport(
            f"the checkpoint is of {saved.backbone} at {saved.input_size} px; this config says "
            f"{job.model.backbone} at {job.model.input_size} px"
        )
    spec = zoo.get(saved.backbone)
    # As the learner built it: in head mode the checkpoint does not store the backbone, and a backbone
    # without shipped weights is the learner's random init under its seed.
    backbone = zoo.build_starting_network(spec.name, weights_file=job.model.weights_file, seed=job.seed)
    if saved.backbone_state is not None:
        backbone.load_state_dict(saved.backbone_state)
    head = GrowingHead(spec.embedding_size, len(saved.labels))
    head.load_state_dict(saved.head)
    labels = list(saved.labels)
    # As the learner applies them at its next step (a stopped daemon's: at its next start).
    for change in reader.label_changes(saved.label_change):
        if change.id <= reader.labels.last:
            labels, removed = outputs_after(labels, change)
            if removed is not None:
                head.remove(removed)
    if not labels:
        raise NothingToExport("the model knows no class yet")
    return Snapshot(spec, backbone.eval(), head.eval(), labels, saved.trained, saved.high_water_mark)
