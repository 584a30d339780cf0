"""Fuzzing everything that parses a sender's bytes: the wire format, the image headers, the MQTT v5 properties.

hypothesis generates the inputs: random bytes, real images cut anywhere,
headers that lie about their size (decompression bombs), wrong content
types, broken JSON and base64, odd labels. The promise under test: no input
raises, every message is an Example or a Rejection with a reason, and what is
accepted is what the checks allow. CI runs 300 inputs per test; `make fuzz`
(SPROUT_FUZZ_EXAMPLES=10000) the full run, whose counts are printed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, MQTTException, Properties
from PIL import Image

from daemon.imagehead import HeaderError, read_header
from daemon.mqttfast import FastProperties
from daemon.wire import CONTENT_TYPES, Example, Limits, Reason, Rejection, parse

EXAMPLES = int(os.environ.get("SPROUT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = Limits(max_image_bytes=200_000, max_image_pixels=4_000_000, max_full_decode_pixels=4_000_000, max_label_chars=64,
                holdout_fraction=0.1)
SEEN: dict[str, int] = {}


def encoded(fmt: str, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 3), (90, 160, 40)).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = {"image/jpeg": encoded("JPEG"), "image/png": encoded("PNG"), "image/webp": encoded("WEBP")}


def png_claiming(width: int, height: int) -> bytes:
    """A complete, tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 32 + b"\xff\xd9"


def check(result: Example | Rejection) -> None:
    """The promise for any input: an Example that passed every check, or a Rejection with a reason."""
    if isinstance(result, Rejection):
        assert isinstance(result.reason, Reason) and result.detail
        json.dumps(result.notice())  # what is reported to the sender must always serialise
        SEEN[result.reason.value] = SEEN.get(result.reason.value, 0) + 1
        return
    assert isinstance(result, Example)
    assert result.label and result.label == result.label.strip() and result.label.isprintable()
    assert 0 < len(result.image) <= LIMITS.max_image_bytes
    assert result.content_type in CONTENT_TYPES and result.split in ("train", "holdout")
    assert 0 < result.width * result.height <= LIMITS.max_image_pixels
    assert read_header(result.image)[0] == CONTENT_TYPES[result.content_type]
    SEEN["accepted"] = SEEN.get("accepted", 0) + 1


labels = st.one_of(st.text(max_size=80), st.sampled_from(["rust", " rust", "", "a" * 65, "ok\n", "🌱 blight"]))
content_types = st.one_of(st.sampled_from([*CONTENT_TYPES, "image/gif", "", "IMAGE/JPEG"]), st.none(), st.text(max_size=20))
properties = st.lists(st.tuples(st.sampled_from(["label", "example_id", "split", "x"]), st.text(max_size=30)), max_size=6)


@FUZZ
@given(payload=st.binary(max_size=3000), props=properties, content_type=content_types)
def test_random_messages_never_raise(payload, props, content_type):
    check(parse(payload, props, content_type, LIMITS, 0.0))


@FUZZ
@given(kind=st.sampled_from(sorted(IMAGES)), cut=st.integers(0, 4000), claimed=st.sampled_from(sorted(IMAGES)),
       label=labels, flip=st.integers(0, 4000), byte=st.integers(0, 255))
def test_real_images_cut_flipped_and_mislabelled(kind, cut, claimed, label, flip, byte):
    image = bytearray(IMAGES[kind][: max(1, cut)] if cut < len(IMAGES[kind]) else IMAGES[kind])
    if flip < len(image):
        image[flip] = byte
    result = parse(bytes(image), [("label", label)], claimed, LIMITS, 0.0)
    check(result)
    whole = bytes(image) == IMAGES[kind]
    if whole and claimed == kind and label.strip() == label and label and label.isprintable() and len(label) <= 64:
        assert isinstance(result, Example)  # the untouched image under its own type is accepted


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1), fmt=st.sampled_from(["png", "jpeg"]))
def test_headers_that_claim_huge_images_are_refused_before_any_decoding(width, height, fmt):
    image = png_claiming(width, height) if fmt == "png" else jpeg_claiming(width % 65536, height % 65536)
    result = parse(image, [("label", "rust")], f"image/{fmt}", LIMITS, 0.0)
    check(result)
    w, h = (width, height) if fmt == "png" else (width % 65536, height % 65536)
    if w * h > LIMITS.max_image_pixels:
        assert isinstance(result, Rejection) and result.reason == Reason.TOO_MANY_PIXELS
    elif w and h:
        # Within the limits the body is decoded: these forged bodies hold no real pixels for most sizes.
        assert (isinstance(result, Example) and (result.width, result.height) == (w, h)
                or isinstance(result, Rejection) and result.reason == Reason.CORRUPT_IMAGE), result


@FUZZ
@given(doc=st.one_of(
    st.dictionaries(st.sampled_from(["label", "image", "content_type", "example_id", "split"]),
                    st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
                    max_size=5),
    st.builds(lambda kind, label, junk: {"label": label, "content_type": kind,
                                          "image": base64.b64encode(IMAGES[kind]).decode()[: len(junk) * 50 or None]
                                          + junk},
              st.sampled_from(sorted(IMAGES)), labels, st.text(max_size=5)),
), raw_tail=st.binary(max_size=20))
def test_json_fallback_with_broken_fields_and_base64(doc, raw_tail):
    payload = json.dumps(doc).encode()
    check(parse(payload, None, None, LIMITS, 0.0))
    check(parse(payload[: len(payload) // 2] + raw_tail, None, None, LIMITS, 0.0))  # cut JSON


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.builds(lambda k, n: IMAGES[k][:n], st.sampled_from(sorted(IMAGES)),
                                                         st.integers(0, 600))))
def test_image_headers_raise_only_header_errors(data):
    try:
        fmt, width, height = read_header(data)
    except HeaderError:
        return
    assert fmt in ("JPEG", "PNG", "WEBP") and width >= 0 and height >= 0


@FUZZ
@given(data=st.binary(max_size=300))
def test_mqtt_properties_decode_like_paho_or_are_refused_like_paho(data):
    """Differential: the fast decoder agrees with paho's own on every input, valid or not."""
    try:
        theirs, their_len = Properties(PacketTypes.PUBLISH).unpack(data)
    except (MalformedPacket, MQTTException, IndexError, UnicodeDecodeError, ValueError, KeyError, TypeError,
            struct.error):
        theirs = None
    try:
        ours, our_len = FastProperties(PacketTypes.PUBLISH).unpack(data)
    except (MalformedPacket, MQTTException):
        ours = None
    if theirs is None:
        # paho refuses: so must we (paho's errors vary in type; the fast one raises paho's own two).
        assert ours is None, f"accepted what paho refuses: {data!r}"
    elif their_len > declared_end(data):
        # paho read a value past the declared properties length (into the payload); refusing is right.
        assert ours is None, f"read past the properties length like paho: {data!r}"
    else:
        assert ours is not None, f"refused what paho accepts: {data!r}"
        assert our_len == their_len and ours.json() == theirs.json()


def declared_end(data: bytes) -> int:
    """Where the properties end by their own length field (a variable byte integer)."""
    value = 0
    for i, byte in enumerate(data[:4]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return i + 1 + value
    return len(data) + 1


def test_an_oversized_payload_is_refused_without_reading_it():
    big = IMAGES["image/png"] + b"\0" * (LIMITS.max_image_bytes + 1)
    result = parse(big, [("label", "rust")], "image/png", LIMITS, 0.0)
    assert isinstance(result, Rejection) and result.reason == Reason.TOO_LARGE


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(SEEN.values())
    print(f"\nfuzz: {EXAMPLES} inputs per test, {total} messages parsed: "
          + ", ".join(f"{k} {v}" for k, v in sorted(SEEN.items())))
