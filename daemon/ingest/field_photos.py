"""The field-photo wire format: a device's photo for labelling in, a :class:`FieldPhoto` or a :class:`Rejection` out.

A device that opted in sends back photos its model was unsure of, and photos its user corrected
(docs/devices.md, "Photos for labelling"). One JSON document, over MQTT on
``<prefix>/<model>/field-photos`` or by ``POST /v1/models/<model>/field-photos``::

    {"device": "5f0c...", "photo_id": "2026-12-04T10:31:07Z-3", "kind": "unsure", "version": 12,
     "guesses": [{"label": "rust", "score": 0.41}, {"label": "blight", "score": 0.33}],
     "content_type": "image/jpeg", "image": "<base64>"}

A correction has ``"kind": "correction"`` and the user's ``"label"``; ``"kind": "sample"`` is a photo
picked at random among those classified, whatever the score (what the field looks like: the drift test). The device's id is replaced at
once by its digest, as in a report (daemon/ingest/telemetry.py); ``photo_id`` is the device's own name
for the photo, so a photo sent again (a QoS 1 redelivery, an HTTP retry) is stored once. The image is
checked as an example's is (daemon/ingest/image_checks.py), whole, here: devices send a downscaled
copy (sprout-edge sends 640 pixels on the long side), and few of them, capped per device and day.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TypeGuard

from daemon.ingest.image_checks import CONTENT_TYPES, Refused, inspect_image
from daemon.ingest.telemetry import MAX_ID_CHARS, device_digest
from daemon.store.records import FieldPhoto, Guess, PhotoKind, Reason, Rejection
from edge import preprocess

log = logging.getLogger("sprout.field_photos")

MAX_PHOTO_ID_CHARS = 200
MAX_GUESSES = 5
MAX_JSON_BRACKETS = 2 * MAX_GUESSES + 8


@dataclass(frozen=True, slots=True)
class PhotoLimits:
    max_photo_bytes: int  # of the image, decoded from base64 (field.max_photo_bytes)
    max_image_pixels: int  # as an example's (store.max_image_pixels)
    max_full_decode_pixels: int
    max_label_chars: int

    @property
    def max_document_bytes(self) -> int:
        """The longest document that can hold an acceptable photo: base64 inflates it by 4/3."""
        return self.max_photo_bytes * 4 // 3 + 16 * 1024


def photo_key(digest: str, photo_id: str) -> str:
    """The photo's key in the store: a device's photo_id names its photo among that device's only."""
    return hashlib.sha256(f"{digest}\0{photo_id}".encode("utf-8", "surrogatepass")).hexdigest()


def parse_field_photo(payload: bytes, limits: PhotoLimits, received_at: float | None = None) -> FieldPhoto | Rejection:
    """One photo, checked; never raises (it runs on the MQTT network thread and in HTTP handlers)."""
    now = time.time() if received_at is None else received_at
    try:
        return _photo(_document(payload, limits), limits, now)
    except Refused as r:
        return Rejection(r.reason, r.detail, None, now)
    except Exception as err:
        log.exception("parsing a field photo failed (%d bytes); rejected", len(payload))
        return Rejection(
            Reason.UNREADABLE,
            f"the photo could not be read ({type(err).__name__}); check it against docs/devices.md",
            None,
            now,
        )


def _bad(detail: str) -> Refused:
    return Refused(Reason.BAD_FIELD_PHOTO, detail)


def _document(payload: bytes, limits: PhotoLimits) -> dict[str, object]:
    if len(payload) > limits.max_document_bytes:
        raise Refused(
            Reason.TOO_LARGE,
            f"document of {len(payload)} bytes holds more than a photo of field.max_photo_bytes = "
            f"{limits.max_photo_bytes}: send it at 640 pixels on the long side",
        )
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_BRACKETS:
        raise _bad(f"document nests more than {MAX_JSON_BRACKETS} brackets: one object, as docs/devices.md shows")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise _bad(f"document is not UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:
        raise _bad(f"document is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(doc, dict):
        raise _bad("a field photo is a JSON object with 'device', 'photo_id', 'kind', 'version', 'guesses', 'image'")
    return doc


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 20:
        raise ValueError(f"integer of {len(digits)} digits")
    return int(digits)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _printable(value: object, max_chars: int) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable()


def _label(value: object, where: str, max_chars: int) -> str:
    if not _printable(value, max_chars) or value != value.strip():
        raise Refused(
            Reason.BAD_LABEL,
            f"{where} must be a label of 1-{max_chars} printable characters without surrounding spaces",
        )
    return value


def _photo(doc: dict[str, object], limits: PhotoLimits, now: float) -> FieldPhoto:
    device = doc.get("device")
    if not _printable(device, MAX_ID_CHARS):
        raise _bad(f"'device' must be the device's opaque id: 1-{MAX_ID_CHARS} printable characters")
    photo_id = doc.get("photo_id")
    if not _printable(photo_id, MAX_PHOTO_ID_CHARS):
        raise _bad(f"'photo_id' must name the photo among this device's: 1-{MAX_PHOTO_ID_CHARS} printable characters")
    try:
        kind = PhotoKind(doc.get("kind"))
    except ValueError:
        raise _bad(
            "'kind' must be 'unsure' (a low top-1 score), 'correction' (the user gave the label) or 'sample' (a "
            "random share of the photos classified)"
        ) from None
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= 10**9:
        raise _bad(f"'version' must be the model version that made the guesses (got {repr(version)[:40]})")
    guesses = _guesses(doc.get("guesses"), limits)
    user_label = None
    if kind is PhotoKind.CORRECTION:
        user_label = _label(doc.get("label"), "a correction's 'label'", limits.max_label_chars)
    content_type = doc.get("content_type")
    if not isinstance(content_type, str) or content_type not in CONTENT_TYPES:
        raise Refused(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            f"content type {str(content_type)[:60]!r} not accepted: use {', '.join(CONTENT_TYPES)}",
        )
    if CONTENT_TYPES[content_type] == "HEIF" and not preprocess.HEIF_SUPPORTED:
        raise Refused(Reason.UNSUPPORTED_CONTENT_TYPE, "HEIC needs the pillow-heif package on the server: send JPEG")
    encoded = doc.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise Refused(Reason.EMPTY_IMAGE, "'image' must be the photo's bytes, base64")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise Refused(Reason.BAD_BASE64, f"'image' is not valid base64: {err}") from None
    if len(image) > limits.max_photo_bytes:
        raise Refused(
            Reason.TOO_LARGE,
            f"photo of {len(image)} bytes exceeds field.max_photo_bytes = {limits.max_photo_bytes}: "
            "send it at 640 pixels on the long side",
        )
    width, height = inspect_image(
        image, CONTENT_TYPES[content_type], limits.max_image_pixels, limits.max_full_decode_pixels
    )
    digest = device_digest(device)
    return FieldPhoto(
        photo_key(digest, photo_id),
        digest,
        kind,
        version,
        guesses,
        user_label,
        content_type,
        width,
        height,
        image,
        now,
    )


def _guesses(value: object, limits: PhotoLimits) -> tuple[Guess, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_GUESSES:
        raise _bad(f"'guesses' must list the model's 1-{MAX_GUESSES} best labels with their scores, best first")
    out = []
    for i, g in enumerate(value):
        if not isinstance(g, dict):
            raise _bad(f"guesses[{i}] must be an object with 'label' and 'score'")
        label = _label(g.get("label"), f"guesses[{i}].label", limits.max_label_chars)
        score = g.get("score")
        if (
            not isinstance(score, int | float)
            or isinstance(score, bool)
            or not math.isfinite(score)
            or not 0 <= score <= 1
        ):
            raise _bad(f"guesses[{i}].score must be the model's score for the label, 0 to 1 (got {repr(score)[:40]})")
        out.append(Guess(label, float(score)))
    if any(b.score > a.score + 1e-9 for a, b in zip(out, out[1:], strict=False)):
        raise _bad("'guesses' must be best first: scores descending")
    if len({g.label for g in out}) != len(out):
        raise _bad("'guesses' names a label twice")
    return tuple(out)
