"""What ingest hands the store: an accepted :class:`Example`, or a :class:`Rejection` with its :class:`Reason`.

The typed contract between the two stages: the wire format (daemon/ingest/wire.py)
makes them, intake commits them (daemon/store/examples.py), and the rejected
topic and the metrics name a rejection by its reason's value.
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
