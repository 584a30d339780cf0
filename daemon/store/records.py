"""What ingest hands the store: an accepted :class:`Example`, a device's :class:`FieldReport` or
:class:`FieldPhoto`, or a :class:`Rejection` with its :class:`Reason`.

The typed contract between the two stages: the wire formats (daemon/ingest/wire.py,
daemon/ingest/telemetry.py, daemon/ingest/field_photos.py) make them, intake commits them (daemon/store/examples.py), and the
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
    BAD_FIELD_PHOTO = "bad_field_photo"  # a device's photo for labelling whose fields do not follow docs/devices.md
    PHOTO_CAP = "photo_cap"  # the device sent field.photos_per_device_per_day photos today already


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


class PhotoKind(enum.Enum):
    """Why a device sent a photo back (docs/devices.md, "Photos for labelling")."""

    UNSURE = "unsure"  # the model's top-1 score was low: the device does not know the answer
    CORRECTION = "correction"  # the user said the prediction was wrong and gave a label: unchecked, a labeller confirms
    SAMPLE = "sample"  # a random share of what the device classifies, whatever the score: the field as it is (drift)


@dataclass(frozen=True, slots=True)
class Guess:
    label: str
    score: float  # the model's output for the label, 0-1


@dataclass(frozen=True, slots=True)
class FieldPhoto:
    """A photo a device sent back for labelling; it becomes a training example only once someone labels it."""

    photo_key: str  # SHA-256 of the device's digest and its photo_id: a resent photo is stored once
    device: str  # digest of the device's id, as in FieldReport
    kind: PhotoKind
    version: int  # the model version whose guesses these are
    guesses: tuple[Guess, ...]  # best first
    user_label: str | None  # a correction's label, as the user gave it
    content_type: str
    width: int  # upright
    height: int
    image: bytes
    received_at: float

    @property
    def uncertainty(self) -> float:
        """How unsure the model was, 0-1: one less the top-1 score; a correction, where it was wrong, is 1."""
        if self.kind is PhotoKind.CORRECTION or not self.guesses:
            return 1.0
        return min(max(1.0 - self.guesses[0].score, 0.0), 1.0)
