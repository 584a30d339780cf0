"""The examples wire format: one MQTT message in, an :class:`Example` or a :class:`Rejection` out.

Runs on the MQTT network thread, so it only does cheap checks: sizes, label
rules, and the image header (format, dimensions, a truncated tail; see
daemon/ingest/image_checks.py), then a check that the body decodes (a JPEG at 1/8
scale). Pixels for training are decoded later, off the network thread, by the
learner. The width and height recorded are the upright ones: a phone photo's
EXIF orientation is applied, as the learner and devices apply it
(edge/preprocess.py).

MQTT v5 senders put the label and ids in user properties and the image in the
payload; MQTT 3.1.1 senders, which have no properties, send JSON:
``{"label": ..., "image": "<base64>", "content_type": ..., "example_id": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal, overload

from daemon.common.settings import StoreSettings
from daemon.ingest.image_checks import CONTENT_TYPES, QUARTER_TURNS, Refused, check_decodes, inspect_image

# The records ingest hands the store; imported here too, where every sender-facing module finds them.
from daemon.store.records import Example, Reason, Rejection
from edge import preprocess  # registers pillow-heif's HEIF opener with Pillow, where it is installed

log = logging.getLogger("sprout.wire")

SPLITS = ("train", "holdout")
MAX_ID_CHARS = 200
# The JSON form is one flat object; these bound what a parser can be made to do with anything else.
# Python's json recurses once per nesting level (RecursionError past ~1,000) and refuses integers of
# more than 4,300 digits (ValueError): a count of brackets bounds the depth before parsing, and
# integers are read through a hook that refuses long ones.
MAX_JSON_BRACKETS = 256
MAX_JSON_INT_DIGITS = 32


@dataclass(frozen=True, slots=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    max_label_chars: int
    holdout_fraction: float
    max_full_decode_pixels: int  # PNG, WebP and HEIF decode at full size: their own, lower limit


def limits(st: StoreSettings) -> Limits:
    """The checks as configured in the store's section: for MQTT intake and `sprout store import` alike."""
    return Limits(
        max_image_bytes=st.max_image_bytes,
        max_image_pixels=st.max_image_pixels,
        max_full_decode_pixels=st.max_full_decode_pixels,
        max_label_chars=st.max_label_chars,
        holdout_fraction=st.holdout_fraction,
    )


@dataclass(frozen=True, slots=True)
class Unchecked:
    """A message whose fields and image header passed; its body is still to be decoded (:func:`check_body`).

    The feed parses on the MQTT network thread, one message at a time; decoding a body costs 10-20
    times the rest of the parse, so intake decodes a batch of them on several threads instead (Pillow
    decodes without the GIL) before it commits them.
    """

    example: Example  # width and height as the header has them, before the EXIF orientation
    shown_id: str | None  # the sender's example_id, as a rejection names it (None when it sent none)


@overload
def parse(
    payload: bytes,
    user_properties: list[tuple[str, str]] | None,
    content_type: str | None,
    limits: Limits,
    received_at: float | None = None,
    decode: Literal[True] = True,
) -> Example | Rejection: ...
@overload
def parse(
    payload: bytes,
    user_properties: list[tuple[str, str]] | None,
    content_type: str | None,
    limits: Limits,
    received_at: float | None = None,
    *,
    decode: bool,
) -> Example | Rejection | Unchecked: ...
def parse(
    payload: bytes,
    user_properties: list[tuple[str, str]] | None,
    content_type: str | None,
    limits: Limits,
    received_at: float | None = None,
    decode: bool = True,
) -> Example | Rejection | Unchecked:
    """Turn one received message into an Example, or a Rejection that says what to fix.

    ``user_properties`` and ``content_type`` are the MQTT v5 properties (None under 3.1.1). With
    ``decode=False`` an image whose header passed comes back :class:`Unchecked`, for :func:`check_body`:
    the two together give what ``parse`` alone gives.
    """
    now = time.time() if received_at is None else received_at
    example_id: object = None
    try:
        props: dict[str, str] = {}
        for key, value in user_properties or ():
            props.setdefault(key, value)  # the first occurrence wins; MQTT allows repeats
        example_id = props.get("example_id")
        if "label" in props:
            fields = props
            image = payload
        elif payload[:16].lstrip()[:1] in (b"{", b"["):
            doc = _json_document(payload, limits)
            example_id = doc.get("example_id") if isinstance(doc, dict) else None
            fields, image = _json_fields(doc)
            content_type = fields.get("content_type")
        else:
            raise Refused(
                Reason.MISSING_LABEL, "label missing: set the MQTT v5 user property 'label' (or send the JSON form)"
            )
        return _example(image, fields, content_type, limits, now, decode)
    except Refused as r:
        return Rejection(r.reason, r.detail, _shown_id(example_id), now)
    except Exception as err:
        # No input may raise out of here (it would end the MQTT network thread): a parser defect
        # rejects the one message, with its traceback in the log so that it gets fixed.
        log.exception("parsing a message failed (%d bytes); rejected", len(payload))
        return Rejection(
            Reason.UNREADABLE,
            f"the message could not be read ({type(err).__name__}); check it against the wire format in the README",
            _shown_id(example_id),
            now,
        )


def _shown_id(example_id: object) -> str | None:
    return example_id if isinstance(example_id, str) and _printable(example_id, MAX_ID_CHARS) else None


def _json_document(payload: bytes, limits: Limits) -> object:
    # base64 inflates by 4/3; anything longer cannot hold an acceptable image.
    if len(payload) > limits.max_image_bytes * 4 // 3 + 64 * 1024:
        raise Refused(
            Reason.TOO_LARGE,
            f"JSON message of {len(payload)} bytes exceeds the image limit of {limits.max_image_bytes}",
        )
    brackets = payload.count(b"[") + payload.count(b"{")
    if brackets > MAX_JSON_BRACKETS:
        raise Refused(
            Reason.BAD_JSON,
            f"JSON message holds {brackets} brackets, more than {MAX_JSON_BRACKETS}: "
            "send one flat object with 'label' and 'image'",
        )
    try:
        text = payload.decode("utf-8")  # RFC 8259: JSON between systems is UTF-8
        return json.loads(text, parse_int=_bounded_int)
    except UnicodeDecodeError as err:
        raise Refused(Reason.BAD_JSON, f"JSON payload is not UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
        raise Refused(
            Reason.BAD_JSON, f"payload is neither an image with a 'label' property nor valid JSON: {str(err)[:200]}"
        ) from None


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise Refused(
            Reason.BAD_JSON, f"JSON number of {len(digits)} digits: numbers have at most {MAX_JSON_INT_DIGITS}"
        )
    return int(digits)


def _json_fields(doc: object) -> tuple[dict[str, str], bytes]:
    if not isinstance(doc, dict):
        raise Refused(Reason.BAD_JSON, "JSON payload must be an object with 'label' and 'image'")
    fields: dict[str, str] = {}
    for key in ("label", "content_type", "example_id", "split"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise Refused(Reason.BAD_JSON, f"JSON field '{key}' must be a string")
        if value is not None:
            fields[key] = value
    if "label" not in fields:
        raise Refused(Reason.MISSING_LABEL, "label missing: add a 'label' string to the JSON object")
    encoded = doc.get("image")
    if not isinstance(encoded, str):
        raise Refused(Reason.BAD_JSON, "JSON field 'image' must be a base64 string")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise Refused(Reason.BAD_BASE64, f"JSON field 'image' is not valid base64: {err}") from None
    return fields, image


def _example(
    image: bytes, fields: dict[str, str], content_type: str | None, limits: Limits, now: float, decode: bool = True
) -> Example | Unchecked:
    label = fields["label"]
    if not label.strip() or label != label.strip() or not _printable(label, limits.max_label_chars):
        raise Refused(
            Reason.BAD_LABEL,
            f"label must be 1-{limits.max_label_chars} printable characters without surrounding spaces",
        )
    example_id = fields.get("example_id")
    if example_id is not None and (not example_id or not _printable(example_id, MAX_ID_CHARS)):
        raise Refused(Reason.BAD_EXAMPLE_ID, f"example_id must be 1-{MAX_ID_CHARS} printable characters, or left out")
    split = fields.get("split")
    if split is not None and split not in SPLITS:
        raise Refused(Reason.BAD_SPLIT, f"split must be 'train' or 'holdout', or left out (got {split[:40]!r})")
    if content_type not in CONTENT_TYPES:
        raise Refused(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            f"content type {str(content_type)[:60]!r} not accepted: use {', '.join(CONTENT_TYPES)}",
        )
    if CONTENT_TYPES[content_type] == "HEIF" and not preprocess.HEIF_SUPPORTED:
        raise Refused(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            "HEIC needs the pillow-heif package, which this daemon lacks: pip install pillow-heif (or send JPEG)",
        )
    if not image:
        raise Refused(Reason.EMPTY_IMAGE, "payload is empty: put the encoded image in the payload")
    if len(image) > limits.max_image_bytes:
        raise Refused(
            Reason.TOO_LARGE, f"image of {len(image)} bytes exceeds the limit of {limits.max_image_bytes}: resize it"
        )
    width, height = inspect_image(
        image, CONTENT_TYPES[content_type], limits.max_image_pixels, limits.max_full_decode_pixels, decode
    )
    sender_id = example_id
    if example_id is None:
        # Same bytes and label -> same id, so a redelivered or resent duplicate is stored once.
        example_id = hashlib.sha256(label.encode() + b"\0" + image).hexdigest()
    if split is None:
        split = holdout_split(example_id, limits.holdout_fraction)
    example = Example(example_id, label, split, content_type, width, height, image, now)
    return example if decode else Unchecked(example, sender_id)


def check_body(unchecked: Unchecked) -> Example | Rejection:
    """Decode an :class:`Unchecked` example's body: the Example (upright size), or the Rejection that
    ``parse`` would have given. Never raises; safe on any thread."""
    e = unchecked.example
    try:
        orientation = check_decodes(e.image, CONTENT_TYPES[e.content_type], (e.width, e.height))
    except Refused as r:
        return Rejection(r.reason, r.detail, unchecked.shown_id, e.received_at)
    except Exception as err:
        log.exception("checking an image failed (%d bytes); rejected", len(e.image))
        return Rejection(
            Reason.UNREADABLE,
            f"the message could not be read ({type(err).__name__}); check it against the wire format in the README",
            unchecked.shown_id,
            e.received_at,
        )
    if orientation in QUARTER_TURNS:
        return dataclasses.replace(e, width=e.height, height=e.width)
    return e


def holdout_split(example_id: str, holdout_fraction: float) -> str:
    """Deterministic: the same id always lands in the same split, on every machine."""
    digest = hashlib.blake2b(example_id.encode(), digest_size=8).digest()
    return "holdout" if int.from_bytes(digest, "big") / 2**64 < holdout_fraction else "train"


def _printable(text: str, max_chars: int) -> bool:
    return 0 < len(text) <= max_chars and text.isprintable()
