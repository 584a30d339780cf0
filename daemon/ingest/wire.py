"""The examples wire format: one MQTT message in, an :class:`Example` or a :class:`Rejection` out.

Runs on the MQTT network thread, so it only does cheap checks: sizes, label
rules, and the image header (format, dimensions, a truncated tail; see
:mod:`daemon.ingest.imagehead`), then a check that the body decodes (a JPEG at 1/8
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
import io
import json
import logging
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Literal, overload

from PIL import ExifTags, Image

from daemon.common.settings import StoreSettings
from daemon.ingest.imagehead import HeaderError, read_header

# The records ingest hands the store; imported here too, where every sender-facing module finds them.
from daemon.store.records import Example, Reason, Rejection
from edge import preprocess  # registers pillow-heif's HEIF opener with Pillow, where it is installed

log = logging.getLogger("sprout.wire")

CONTENT_TYPES = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/heic": "HEIF",
    "image/heif": "HEIF",
}
SPLITS = ("train", "holdout")
MAX_ID_CHARS = 200
# The JSON form is one flat object; these bound what a parser can be made to do with anything else.
# Python's json recurses once per nesting level (RecursionError past ~1,000) and refuses integers of
# more than 4,300 digits (ValueError): a count of brackets bounds the depth before parsing, and
# integers are read through a hook that refuses long ones.
MAX_JSON_BRACKETS = 256
MAX_JSON_INT_DIGITS = 32
# A JPEG is checked by decoding it at 1/8 scale (Pillow's draft mode): every byte of its entropy-coded
# data is read, so a cut or corrupt body shows, at a small fraction of a full decode's time and memory.
CHECK_DECODE_SIZE = (1, 1)
# ISO-BMFF brands (in the leading 'ftyp' box) of HEVC-coded HEIF: iPhones write 'heic' + 'mif1', Android
# phones 'mif1' + 'heic'. 'mif1' alone is shared with AVIF, which pillow-heif's build here cannot decode.
HEIF_BRANDS = frozenset((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"))
MAX_HEIF_BOXES = 64  # top-level boxes walked for the truncation check: real files have 3 or 4
# EXIF orientations that turn the stored picture a quarter (5-8: transposed, rotated 90 or 270 degrees).
QUARTER_TURNS = frozenset((5, 6, 7, 8))


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


class _Reject(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
            raise _Reject(
                Reason.MISSING_LABEL, "label missing: set the MQTT v5 user property 'label' (or send the JSON form)"
            )
        return _example(image, fields, content_type, limits, now, decode)
    except _Reject as r:
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
        raise _Reject(
            Reason.TOO_LARGE,
            f"JSON message of {len(payload)} bytes exceeds the image limit of {limits.max_image_bytes}",
        )
    brackets = payload.count(b"[") + payload.count(b"{")
    if brackets > MAX_JSON_BRACKETS:
        raise _Reject(
            Reason.BAD_JSON,
            f"JSON message holds {brackets} brackets, more than {MAX_JSON_BRACKETS}: "
            "send one flat object with 'label' and 'image'",
        )
    try:
        text = payload.decode("utf-8")  # RFC 8259: JSON between systems is UTF-8
        return json.loads(text, parse_int=_bounded_int)
    except UnicodeDecodeError as err:
        raise _Reject(Reason.BAD_JSON, f"JSON payload is not UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
        raise _Reject(
            Reason.BAD_JSON, f"payload is neither an image with a 'label' property nor valid JSON: {str(err)[:200]}"
        ) from None


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _Reject(
            Reason.BAD_JSON, f"JSON number of {len(digits)} digits: numbers have at most {MAX_JSON_INT_DIGITS}"
        )
    return int(digits)


def _json_fields(doc: object) -> tuple[dict[str, str], bytes]:
    if not isinstance(doc, dict):
        raise _Reject(Reason.BAD_JSON, "JSON payload must be an object with 'label' and 'image'")
    fields: dict[str, str] = {}
    for key in ("label", "content_type", "example_id", "split"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise _Reject(Reason.BAD_JSON, f"JSON field '{key}' must be a string")
        if value is not None:
            fields[key] = value
    if "label" not in fields:
        raise _Reject(Reason.MISSING_LABEL, "label missing: add a 'label' string to the JSON object")
    encoded = doc.get("image")
    if not isinstance(encoded, str):
        raise _Reject(Reason.BAD_JSON, "JSON field 'image' must be a base64 string")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _Reject(Reason.BAD_BASE64, f"JSON field 'image' is not valid base64: {err}") from None
    return fields, image


def _example(
    image: bytes, fields: dict[str, str], content_type: str | None, limits: Limits, now: float, decode: bool = True
) -> Example | Unchecked:
    label = fields["label"]
    if not label.strip() or label != label.strip() or not _printable(label, limits.max_label_chars):
        raise _Reject(
            Reason.BAD_LABEL,
            f"label must be 1-{limits.max_label_chars} printable characters without surrounding spaces",
        )
    example_id = fields.get("example_id")
    if example_id is not None and (not example_id or not _printable(example_id, MAX_ID_CHARS)):
        raise _Reject(Reason.BAD_EXAMPLE_ID, f"example_id must be 1-{MAX_ID_CHARS} printable characters, or left out")
    split = fields.get("split")
    if split is not None and split not in SPLITS:
        raise _Reject(Reason.BAD_SPLIT, f"split must be 'train' or 'holdout', or left out (got {split[:40]!r})")
    if content_type not in CONTENT_TYPES:
        raise _Reject(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            f"content type {str(content_type)[:60]!r} not accepted: use {', '.join(CONTENT_TYPES)}",
        )
    if CONTENT_TYPES[content_type] == "HEIF" and not preprocess.HEIF_SUPPORTED:
        raise _Reject(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            "HEIC needs the pillow-heif package, which this daemon lacks: pip install pillow-heif (or send JPEG)",
        )
    if not image:
        raise _Reject(Reason.EMPTY_IMAGE, "payload is empty: put the encoded image in the payload")
    if len(image) > limits.max_image_bytes:
        raise _Reject(
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
        orientation = _check_decodes(e.image, CONTENT_TYPES[e.content_type], (e.width, e.height))
    except _Reject as r:
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


def inspect_image(
    image: bytes, expected_format: str, max_pixels: int, max_full_decode_pixels: int, decode: bool = True
) -> tuple[int, int]:
    """Read format and size from the header, check the tail for truncation, then check that the body decodes.

    Nothing is decoded before the header's size passed its limits: a JPEG at 1/8 scale (a few MB at
    most), PNG, WebP and HEIF, which have no reduced decoding, only up to ``max_full_decode_pixels``.
    Returns the upright width and height (EXIF orientation applied); with ``decode=False``, the header's,
    and the body is left to :func:`check_body`.
    """
    # A cut-off upload is the commonest fault from phones on a weak link: name it as such.
    if _magic_format(image) == expected_format and not _complete(image, expected_format):
        raise _Reject(
            Reason.TRUNCATED_IMAGE, f"{expected_format} data ends early (truncated upload?): send the whole file"
        )
    try:
        actual_format, width, height = _header(image)
    except HeaderError as err:
        raise _Reject(Reason.NOT_AN_IMAGE, f"payload is not a readable JPEG, PNG, WebP or HEIC image: {err}") from None
    if actual_format != expected_format:
        raise _Reject(
            Reason.CONTENT_TYPE_MISMATCH,
            f"content type says {expected_format} but the data is {actual_format}: fix the Content Type property",
        )
    if width <= 0 or height <= 0:
        raise _Reject(Reason.NOT_AN_IMAGE, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _Reject(
            Reason.TOO_MANY_PIXELS, f"image of {width}x{height} pixels exceeds the limit of {max_pixels}: resize it"
        )
    if actual_format != "JPEG" and width * height > max_full_decode_pixels:
        raise _Reject(
            Reason.TOO_MANY_PIXELS,
            f"{actual_format} image of {width}x{height} pixels exceeds the limit of {max_full_decode_pixels} for "
            "formats decoded at full size: resize it, or send it as JPEG",
        )
    if not decode:
        return width, height
    orientation = _check_decodes(image, actual_format, (width, height))
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


def _header(image: bytes) -> tuple[str, int, int]:
    """(format, width, height) as :func:`daemon.ingest.imagehead.read_header`, HEIF included, without decoding pixels."""
    if _magic_format(image) != "HEIF":
        return read_header(image)
    if not preprocess.HEIF_SUPPORTED:
        raise HeaderError(
            "it is HEIC, which needs the pillow-heif package, which this daemon lacks: "
            "pip install pillow-heif (or send JPEG)"
        )
    # The size sits in an 'ispe' property deep in the 'meta' box, turned by 'irot': libheif's parse of the
    # container (no decoding, ~0.1 ms) says it as displayed.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: our own limits follow
            with Image.open(io.BytesIO(image), formats=["HEIF"]) as img:
                return "HEIF", *img.size
    except Image.DecompressionBombError as err:
        raise _Reject(Reason.TOO_MANY_PIXELS, f"HEIF image is too large to decode ({err}): resize it") from None
    except Exception as err:  # pillow-heif raises several types for a broken container
        raise HeaderError(f"HEIF container does not parse ({str(err)[:160] or type(err).__name__})") from None


def _check_decodes(image: bytes, fmt: str, size: tuple[int, int]) -> int:
    """Decode the body (a JPEG at 1/8 scale), or reject it; returns its EXIF orientation (1: upright)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: our own limits were applied above
            with Image.open(io.BytesIO(image), formats=[fmt]) as img:
                if img.size != size:
                    raise ValueError(f"Pillow reads {img.size[0]}x{img.size[1]}, the header says {size[0]}x{size[1]}")
                if fmt != "HEIF":  # there draft would decode an embedded thumbnail instead of the image
                    img.draft("RGB", CHECK_DECODE_SIZE)  # JPEG only; PNG and WebP decode whole
                img.load()
                # Read as load_rgb reads it, so an EXIF block it cannot read fails here, not in training.
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if fmt == "PNG" and (missing := _png_bytes_missing(image, *size)):
            # Pillow takes the rows a zlib stream that ends early holds for the whole image.
            raise ValueError(f"its pixel data ends {missing} bytes short of {size[0]}x{size[1]}")
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "cannot use this image"
        raise _Reject(
            Reason.CORRUPT_IMAGE,
            f"{fmt} image does not decode ({str(err)[:160] or type(err).__name__}): send the original file",
        ) from None
    return orientation


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_bytes_missing(image: bytes, width: int, height: int) -> int:
    """How many bytes of filtered rows the IDAT stream lacks for the header's size; 0 when it has them all.

    Inflated in 1 MB pieces and only counted, so the check costs no more memory than its window.
    """
    depth, colour, interlace = image[24], image[25], image[28]
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx) if width > x0 else 0, -(-(height - y0) // dy) if height > y0 else 0
        if w and h:
            need += h * (1 + (w * bits + 7) // 8)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(image) and got < need:
        length, kind = int.from_bytes(image[pos : pos + 4], "big"), image[pos + 4 : pos + 8]
        if kind == b"IDAT":
            data = image[pos + 8 : pos + 8 + length]
            while data and got < need:
                got += len(inflate.decompress(data, 1 << 20))
                data = inflate.unconsumed_tail
        pos += 12 + length
    return max(0, need - got)


def sniffed_content_type(image: bytes) -> str | None:
    """The accepted content type the data's first bytes show, else None: for files, whose names may lie."""
    fmt = _magic_format(image)
    return next((content_type for content_type, f in CONTENT_TYPES.items() if f == fmt), None)


def _magic_format(image: bytes) -> str | None:
    if image[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "WEBP"
    if image[4:8] == b"ftyp" and HEIF_BRANDS & _brands(image):
        return "HEIF"
    return None


def _brands(image: bytes) -> set[bytes]:
    """The major and compatible brands of the leading 'ftyp' box."""
    end = min(int.from_bytes(image[:4], "big"), len(image), 256)
    return {image[8:12], *(image[i : i + 4] for i in range(16, end - 3, 4))}


def _complete(image: bytes, fmt: str) -> bool:
    if fmt == "JPEG":
        # End-of-image marker; some encoders pad a few bytes after it.
        return b"\xff\xd9" in image[-64:]
    if fmt == "PNG":
        return image.rstrip(b"\0")[-8:] == b"IEND\xaeB`\x82"
    if fmt == "WEBP":
        declared = int.from_bytes(image[4:8], "little") + 8
        return len(image) >= declared
    if fmt == "HEIF":
        return _boxes_complete(image)
    return False


def _boxes_complete(image: bytes) -> bool:
    """Whether the last top-level ISO-BMFF box (usually 'mdat', the coded pixels) ends within the data."""
    pos = 0
    for _ in range(MAX_HEIF_BOXES):
        if pos + 8 > len(image):
            return pos <= len(image)
        size = int.from_bytes(image[pos : pos + 4], "big")
        if size == 1:  # a 64-bit size follows the type
            size = int.from_bytes(image[pos + 8 : pos + 16], "big")
        if size == 0:  # the box runs to the end of the file
            return True
        if size < 8:
            return True  # not a box structure a cut makes: the decode check names it
        pos += size
    return True


def holdout_split(example_id: str, holdout_fraction: float) -> str:
    """Deterministic: the same id always lands in the same split, on every machine."""
    digest = hashlib.blake2b(example_id.encode(), digest_size=8).digest()
    return "holdout" if int.from_bytes(digest, "big") / 2**64 < holdout_fraction else "train"


def _printable(text: str, max_chars: int) -> bool:
    return 0 < len(text) <= max_chars and text.isprintable()
