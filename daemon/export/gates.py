"""The gates: whether a verified candidate may ship, as typed :class:`Refusal` reasons with their figures.

A candidate ships only when, on every runtime of ``export.runtimes``, it
loads and runs, no output is NaN, its holdout top-1 is within
``export.max_drop_pts`` of the float model's, and not below the published
model's on the same images minus ``export.tolerance_pts``. :func:`gate` is
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
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from daemon.common.settings import ExportSettings
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


# The sentences are the registry log's text, which tests/chaos/audit.py reads: change them with it.
_SENTENCES = {
    RefusalKind.UNVERIFIED: lambda r: "no runtime verified the candidate (export.runtimes is empty)",
    RefusalKind.RUNTIME_FAILED: lambda r: f"{_where(r)} could not load or run the model: {r.error}",
    RefusalKind.NONFINITE: lambda r: f"{_where(r)} returned NaN or infinite outputs",
    RefusalKind.ACCURACY_DROP: _drop,
    RefusalKind.REGRESSION: _regression,
}


@dataclass(frozen=True)
class Baseline:
    """The published model scored on this export's holdout: a candidate is compared on the same images."""

    version: int
    top1: dict[str, float]  # runtime -> holdout top-1
    rescored: int = 0  # holdout examples the published version had not been run on before this export


def gate(
    reports: list[RuntimeReport], float_top1: float, baseline: Baseline | None, limits: ExportSettings
) -> list[Refusal]:
    """Why the candidate must not ship, on every runtime; empty when it may."""
    if not reports:
        return [Refusal(kind=RefusalKind.UNVERIFIED)]
    return [refusal for report in reports for refusal in _refusals(report, float_top1, baseline, limits)]


def _refusals(
    report: RuntimeReport, float_top1: float, baseline: Baseline | None, limits: ExportSettings
) -> list[Refusal]:
    where = {"runtime": report.runtime, "runtime_version": report.version}
    if report.error is not None:
        return [Refusal(kind=RefusalKind.RUNTIME_FAILED, fault=report.fault, error=report.error, **where)]
    refusals = [Refusal(kind=RefusalKind.NONFINITE, **where)] if report.nonfinite else []
    top1 = report.top1 or 0.0
    if 100 * (float_top1 - top1) > limits.max_drop_pts:
        refusals.append(
            Refusal(
                kind=RefusalKind.ACCURACY_DROP,
                top1=top1,
                float_top1=float_top1,
                limit_pts=limits.max_drop_pts,
                **where,
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
            )
        )
    return refusals
