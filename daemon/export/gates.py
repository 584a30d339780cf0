"""The gates: whether a verified candidate may ship, as typed :class:`Refusal` reasons with their figures.

A candidate ships only when, on every runtime of ``export.runtimes``, it
loads and runs, no output is NaN, its holdout top-1 is within
``export.max_drop_pts`` of the float model's, and not below the published
model's on the same images minus ``export.tolerance_pts``. On a holdout of a
few hundred images a point is a handful of images, so a drop past a limit is
refused only when it is also more than chance: McNemar's exact test on the
images where the two models disagree gives p at most
``export.refusal_significance`` (daemon/export/significance.py; a drop within
chance is a :class:`Verdict`'s ``within_chance``, logged). :func:`judge` is
pure: reports and figures in, refusals out. Each refusal reads as the
sentence the registry's log and the export log print, and carries its
:class:`RefusalKind` (the metrics' label, what the pipeline decides on) and
the figures behind it.

>>> from daemon.common.settings import ExportSettings
>>> from daemon.export.verification import RuntimeReport
>>> report = RuntimeReport("ai-edge-litert", "2.3.0", 0.80, 0.9, 1.0, False, "uint8")
>>> [r.kind.value for r in gate([report], 0.90, None, ExportSettings())]
['accuracy_drop']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict

from daemon.common.settings import ExportSettings
from daemon.export.significance import Paired, paired
from daemon.export.verification import RuntimeFault, RuntimeReport


class RefusalKind(enum.StrEnum):
    """Why a candidate was refused; the value is the label of ``sprout_export_rejection_reasons``."""

    UNVERIFIED = "unverified"  # no runtime was asked (export.runtimes is empty)
    RUNTIME_FAILED = "runtime_failed"  # a runtime could not load or run it
    NONFINITE = "nonfinite"  # NaN or infinite outputs
    ACCURACY_DROP = "accuracy_drop"  # too far below the float model: quantisation lost too much
    REGRESSION = "regression"  # below the published version on the same images


class Refusal(BaseModel):
    """One reason not to ship a candidate: its kind, where, and the figures; ``str()`` is the sentence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: RefusalKind
    mode: str | None = None  # the export mode refused, once the pipeline has tried several
    runtime: str | None = None
    runtime_version: str | None = None
    fault: RuntimeFault | None = None  # runtime_failed: how it failed
    error: str | None = None  # runtime_failed: what it said
    top1: float | None = None  # the candidate's holdout top-1 on ``runtime``, 0..1
    float_top1: float | None = None  # accuracy_drop: the float model's, on the same images
    published_top1: float | None = None  # regression: the published version's, on the same images
    published_version: int | None = None
    limit_pts: float | None = None  # export.max_drop_pts or export.tolerance_pts, as it was
    # accuracy_drop, regression: the images the reference got right and the candidate wrong, and the reverse,
    # and McNemar's one-sided p-value on them, with the export.refusal_significance it was held to
    lost: int | None = None
    gained: int | None = None
    p_value: float | None = None
    significance: float | None = None

    def in_mode(self, mode: str) -> Refusal:
        return self.model_copy(update={"mode": str(mode)})

    def __str__(self) -> str:
        text = _SENTENCES[self.kind](self)
        return f"{self.mode}: {text}" if self.mode else text


def _where(r: Refusal) -> str:
    return f"{r.runtime} {r.runtime_version}" if r.runtime_version not in (None, "unknown") else str(r.runtime)


def _pct(share: float | None) -> str:
    return f"{100 * (share or 0.0):.1f}%"


def _drop(r: Refusal) -> str:
    drop = 100 * ((r.float_top1 or 0.0) - (r.top1 or 0.0))
    return (
        f"holdout top-1 on {_where(r)} is {_pct(r.top1)}, {drop:.1f} points below the float model's "
        f"{_pct(r.float_top1)} (limit export.max_drop_pts = {r.limit_pts})"
    )


def _regression(r: Refusal) -> str:
    return (
        f"holdout top-1 on {_where(r)} is {_pct(r.top1)}, below the published version {r.published_version}'s "
        f"{_pct(r.published_top1)} on the same images by more than export.tolerance_pts = {r.limit_pts} points"
    )


def _chance(r: Refusal, sentence) -> str:
    """The sentence, with the paired evidence when there was some."""
    if r.p_value is None:
        return sentence(r)
    odds = "beyond" if r.p_value <= (r.significance or 0.0) else "within"
    return (
        f"{sentence(r)}; it missed {r.lost} images the other got right and got {r.gained} it missed, "
        f"p = {r.p_value:.3g} by McNemar's exact test ({odds} chance at export.refusal_significance = "
        f"{r.significance})"
    )


# The sentences are the registry log's text, which tests/chaos/audit.py reads: change them with it.
_SENTENCES = {
    RefusalKind.UNVERIFIED: lambda r: "no runtime verified the candidate (export.runtimes is empty)",
    RefusalKind.RUNTIME_FAILED: lambda r: f"{_where(r)} could not load or run the model: {r.error}",
    RefusalKind.NONFINITE: lambda r: f"{_where(r)} returned NaN or infinite outputs",
    RefusalKind.ACCURACY_DROP: lambda r: _chance(r, _drop),
    RefusalKind.REGRESSION: lambda r: _chance(r, _regression),
}


@dataclass(frozen=True)
class Baseline:
    """The published model scored on this export's holdout: a candidate is compared on the same images."""

    version: int
    top1: dict[str, float]  # runtime -> holdout top-1
    rescored: int = 0  # holdout examples the published version had not been run on before this export
    right: dict[str, np.ndarray] = field(default_factory=dict)  # runtime -> hit per holdout image, in order


@dataclass(frozen=True)
class Holdout:
    """The holdout's truth and the float model's answers on it, for paired comparisons."""

    labels: np.ndarray  # label index per holdout image
    float_predicted: np.ndarray  # the float model's top-1 per holdout image

    @property
    def float_right(self) -> np.ndarray:
        return np.asarray(self.float_predicted) == np.asarray(self.labels)


@dataclass(frozen=True)
class Verdict:
    """What the gates decided: the refusals, and the drops past a limit they let through as chance."""

    refusals: list[Refusal]
    within_chance: list[Refusal]


def gate(
    reports: list[RuntimeReport],
    float_top1: float,
    baseline: Baseline | None,
    limits: ExportSettings,
    holdout: Holdout | None = None,
) -> list[Refusal]:
    """Why the candidate must not ship, on every runtime; empty when it may."""
    return judge(reports, float_top1, baseline, limits, holdout).refusals


def judge(
    reports: list[RuntimeReport],
    float_top1: float,
    baseline: Baseline | None,
    limits: ExportSettings,
    holdout: Holdout | None = None,
) -> Verdict:
    """The gates on every runtime. Without ``holdout`` (or a report's per-image answers) a drop past a limit
    is refused on its point figure alone."""
    if not reports:
        return Verdict([Refusal(kind=RefusalKind.UNVERIFIED)], [])
    found = [refusal for report in reports for refusal in _refusals(report, float_top1, baseline, limits, holdout)]
    beyond = [r.p_value is None or r.p_value <= limits.refusal_significance for r in found]
    return Verdict(
        [r for r, b in zip(found, beyond, strict=True) if b], [r for r, b in zip(found, beyond, strict=True) if not b]
    )


def _evidence(reference_right: np.ndarray | None, report: RuntimeReport, holdout: Holdout | None, alpha: float):
    """The paired comparison's fields of a refusal; none when per-image answers are missing."""
    if holdout is None or report.predicted is None or reference_right is None:
        return {}
    candidate_right = np.asarray(report.predicted) == np.asarray(holdout.labels)
    if candidate_right.shape != np.shape(reference_right):
        return {}
    p: Paired = paired(reference_right, candidate_right)
    return {"lost": p.lost, "gained": p.gained, "p_value": p.p_value, "significance": alpha}


def _refusals(
    report: RuntimeReport,
    float_top1: float,
    baseline: Baseline | None,
    limits: ExportSettings,
    holdout: Holdout | None,
) -> list[Refusal]:
    where = {"runtime": report.runtime, "runtime_version": report.version}
    if report.error is not None:
        return [Refusal(kind=RefusalKind.RUNTIME_FAILED, fault=report.fault, error=report.error, **where)]
    refusals = [Refusal(kind=RefusalKind.NONFINITE, **where)] if report.nonfinite else []
    top1 = report.top1 or 0.0
    alpha = limits.refusal_significance
    if 100 * (float_top1 - top1) > limits.max_drop_pts:
        refusals.append(
            Refusal(
                kind=RefusalKind.ACCURACY_DROP,
                top1=top1,
                float_top1=float_top1,
                limit_pts=limits.max_drop_pts,
                **where,
                **_evidence(holdout.float_right if holdout is not None else None, report, holdout, alpha),
            )
        )
    previous = baseline.top1.get(report.runtime) if baseline is not None else None
    if baseline is not None and previous is not None and 100 * (previous - top1) > limits.tolerance_pts:
        refusals.append(
            Refusal(
                kind=RefusalKind.REGRESSION,
                top1=top1,
                published_top1=previous,
                published_version=baseline.version,
                limit_pts=limits.tolerance_pts,
                **where,
                **_evidence(baseline.right.get(report.runtime), report, holdout, alpha),
            )
        )
    return refusals
