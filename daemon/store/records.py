"""What ingest hands the store: an accepted :class:`Example`, a device's :class:`FieldReport`, or a
:class:`Rejection` with its :class:`Reason`.

The typed contract between the two stages: the wire formats (daemon/ingest/wire.py,
daemon/ingest/telemetry.py) make them, intake commits them (daemon/store/examples.py), and the
rejected topic and the metrics name a rejection by its reason's value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(enum.Enum):
    """Why a message was rejected; the value is the counter's name, the message tells the sender what to do."""

    MISSING_LABEL = "missing_label"
    BAD_LABEL = "bad_label"
    BAD_EXAMPLE_ID = "bad_example_id"
    BAD_SPLIT = "bad_split"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    CONTENT_TYPE_MISMATCH = "content_type_mismatch"
    TOO_LARGE = "too_large"
    EMPTY_IMAGE = "empty_image"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED_IMAGE = "truncated_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    BAD_JSON = "bad_json"
    BAD_BASE64 = "bad_base64"
    CORRUPT_IMAGE = "corrupt_image"
    UNREADABLE = "unreadable"  # the parser itself failed on this message: a defect, logged with its traceback
    BAD_TELEMETRY = "bad_telemetry"  # a device's report that does not follow docs/devices.md; the detail says where


@dataclass(frozen=True, slots=True)
class Example:
    example_id: str
    label: str
    split: str
    content_type: str
    width: int  # upright: after the EXIF orientation
    height: int
    image: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    example_id: str | None
    received_at: float

    def notice(self) -> dict[str, object]:
        """The JSON body published on the rejected topic (never the image)."""
        return {
            "example_id": self.example_id,
            "reason": self.reason.value,
            "detail": self.detail,
            "received_at": self.received_at,
        }


CONFIDENCE_BINS = 10  # a report's top-1 confidence histogram: [0, 0.1), [0.1, 0.2), ... [0.9, 1.0]


@dataclass(frozen=True, slots=True)
class VersionCounts:
    """What one device saw of one model version since its last report (docs/devices.md, "Reporting")."""

    version: int
    loads: int  # the model file loaded into an interpreter
    load_failures: int  # a load that failed (the version is then not used)
    predictions: int
    confidence_sum: float  # of the top-1 scores: their mean is this / predictions
    confidence_bins: tuple[int, ...]  # CONFIDENCE_BINS counts of top-1 scores, summing to predictions
    corrections: int  # predictions the user said were wrong (and gave the right label)
    latency_ms_sum: float  # of the predictions' inference times


@dataclass(frozen=True, slots=True)
class FieldReport:
    """A device's batch of counters. ``device`` is a digest of its opaque id: the id itself is never kept."""

    device: str  # SHA-256 of the id the device made up, hex
    bucket: int  # 0-9999 from the same digest: the device's place in a staged rollout's cohorts
    seq: int  # strictly increasing per device: a resent report carries its old seq and is counted once
    versions: tuple[VersionCounts, ...]
    received_at: float
