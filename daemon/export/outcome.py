"""What one export hands back: an :class:`ExportOutcome`, or why it did not run (:class:`NothingExported`,
:class:`DiskFull`); the export process's one JSON document on its stdout (daemon/export/child.py).

The daemon reads typed fields, never a dict's keys: :func:`read_report` validates the document and a
malformed one is a :class:`MalformedReport` naming the field, which the export thread counts as a failed
export.

>>> report = read_report(ExportOutcome(published=None, skipped=("int8",)).model_dump_json())
>>> type(report).__name__, report.skipped, report.published
('ExportOutcome', ('int8',), None)
>>> read_report('{"ended": "exported", "seconds": "soon"}')  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
MalformedReport: the export process's outcome is malformed: seconds: Input should be a valid number, ...
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from daemon.export.gates import Refusal


class NothingToExport(Exception):
    """No checkpoint or no holdout examples yet; the message says what to wait for."""


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExportOutcome(_Report):
    """An export that ran to its end: the version it published, or why each candidate was refused."""

    ended: Literal["exported"] = "exported"
    published: dict[str, Any] | None = None  # the published version's manifest; None when every mode was refused
    reasons: tuple[Refusal, ...] = ()  # why candidates were refused, each with its mode
    metrics: dict[str, Any] = Field(default_factory=dict)  # the last candidate's, as in its manifest
    seconds: float = 0.0  # the export's own; the daemon's thread counts the process's start too
    skipped: tuple[str, ...] = ()  # modes resting after an accuracy refusal (daemon/export/lossy_modes.py)

    def summary(self) -> dict[str, Any]:
        """What ``sprout export`` prints: plain JSON values, the reasons as their sentences."""
        return {
            "published": self.published["version"] if self.published else None,
            "rejected_because": [str(r) for r in self.reasons],
            "skipped_modes": list(self.skipped),
            "metrics": self.metrics,
            "seconds": round(self.seconds, 1),
        }


class NothingExported(_Report):
    """No checkpoint or no holdout examples yet: the report of a :class:`NothingToExport`."""

    ended: Literal["nothing"] = "nothing"
    why: str  # what to wait for


class DiskFull(_Report):
    """The export ran out of disk: nothing was half-published, the registry keeps its latest version."""

    ended: Literal["disk_full"] = "disk_full"
    errno: int | None
    strerror: str | None
    filename: str | None

    @classmethod
    def of(cls, err: OSError) -> DiskFull:
        filename = None if err.filename is None else str(err.filename)
        return cls(errno=err.errno, strerror=err.strerror, filename=filename)

    def error(self) -> OSError:
        return OSError(self.errno, self.strerror, self.filename)


Report = Annotated[ExportOutcome | NothingExported | DiskFull, Field(discriminator="ended")]
_REPORT: TypeAdapter[ExportOutcome | NothingExported | DiskFull] = TypeAdapter(Report)


class MalformedReport(ValueError):
    """The export process's document is not a report: which field, and what is wrong with it."""


def write_report(report: ExportOutcome | NothingExported | DiskFull) -> str:
    return report.model_dump_json()


def read_report(document: str | bytes) -> ExportOutcome | NothingExported | DiskFull:
    try:
        return _REPORT.validate_json(document)
    except ValidationError as err:
        problems = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in err.errors()[:3])
        raise MalformedReport(f"the export process's outcome is malformed: {problems}") from None


def _where(loc: tuple) -> str:
    """A field's path, without the report's kind that pydantic puts first."""
    path = loc[1:] if loc and loc[0] in _TAGS else loc
    return ".".join(str(p) for p in path) or "the document"


_TAGS = ("exported", "nothing", "disk_full")
