"""Fuzzing everything that parses a sender's bytes: the wire format, the image headers, the MQTT v5 properties.

hypothesis generates the inputs: random bytes, real images cut anywhere,
headers that lie about their size (decompression bombs), wrong content
types, broken JSON and base64, odd labels. The promise under test: no input
raises, every message is an Example or a Rejection with a reason, and what is
accepted is what the checks allow. CI runs 300 inputs per test; `make fuzz`
(SPROUT_FUZZ_EXAMPLES=10000) the full run, whose counts are printed.

Random bytes almost never are deep JSON, a 4,301-digit integer or a JPEG
whose body stops early behind a valid header, which is what an outside
tester sent; tests/fuzz_messages.py builds such inputs on purpose
(structure-aware generators), each with what the README's rules say must
happen to it, and the second half of this file drives them with hypothesis.
tests/test_fuzz_daemon.py sends the same generators' messages through a
running daemon.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib

import pytest
from fuzz_messages import (
    DAEMON_LIMITS,
    IMAGES,
    KINDS,
    LIMITS,
    PICTURES,
    SEEN,
    Drawn,
    check,
    deep_json,
    huge_number,
    image_damage,
    judge,
    long_strings,
    mqtt_properties,
    other_encoding,
    property_combination,
    valid_example,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, MQTTException, Properties

from daemon.ingest.imagehead import HeaderError, read_header
from daemon.ingest.mqttfast import FastProperties
from daemon.ingest.wire import (
    CONTENT_TYPES,
    Example,
    Reason,
    Rejection,
    parse,
)

EXAMPLES = int(os.environ.get("SPROUT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def png_claiming(width: int, height: int) -> bytes:
    """A complete, tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 32 + b"\xff\xd9"


labels = st.one_of(st.text(max_size=80), st.sampled_from(["rust", " rust", "", "a" * 65, "ok\n", "🌱 blight"]))
content_types = st.one_of(
    st.sampled_from([*CONTENT_TYPES, "image/gif", "", "IMAGE/JPEG"]), st.none(), st.text(max_size=20)
)
properties = st.lists(
    st.tuples(st.sampled_from(["label", "example_id", "split", "x"]), st.text(max_size=30)), max_size=6
)


@FUZZ
@given(payload=st.binary(max_size=3000), props=properties, content_type=content_types)
def test_random_messages_never_raise(payload, props, content_type):
    check(parse(payload, props, content_type, LIMITS, 0.0))


@FUZZ
@given(
    kind=st.sampled_from(sorted(IMAGES)),
    cut=st.integers(0, 4000),
    claimed=st.sampled_from(sorted(IMAGES)),
    label=labels,
    flip=st.integers(0, 4000),
    byte=st.integers(0, 255),
)
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
        assert (
            isinstance(result, Example)
            and (result.width, result.height) == (w, h)
            or isinstance(result, Rejection)
            and result.reason == Reason.CORRUPT_IMAGE
        ), result


@FUZZ
@given(
    doc=st.one_of(
        st.dictionaries(
            st.sampled_from(["label", "image", "content_type", "example_id", "split"]),
            st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
            max_size=5,
        ),
        st.builds(
            lambda kind, label, junk: {
                "label": label,
                "content_type": kind,
                "image": base64.b64encode(IMAGES[kind]).decode()[: len(junk) * 50 or None] + junk,
            },
            st.sampled_from(sorted(IMAGES)),
            labels,
            st.text(max_size=5),
        ),
    ),
    raw_tail=st.binary(max_size=20),
)
def test_json_fallback_with_broken_fields_and_base64(doc, raw_tail):
    payload = json.dumps(doc).encode()
    check(parse(payload, None, None, LIMITS, 0.0))
    check(parse(payload[: len(payload) // 2] + raw_tail, None, None, LIMITS, 0.0))  # cut JSON


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda k, n: IMAGES[k][:n], st.sampled_from(sorted(IMAGES)), st.integers(0, 600)),
    )
)
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
    except PAHO_REFUSALS:
        theirs = None
    try:
        ours, our_len = FastProperties(PacketTypes.PUBLISH).unpack(data)
    except (MalformedPacket, MQTTException):
        ours = None
    if theirs is None and ours is not None and "\ufeff" in json.dumps(ours.json(), ensure_ascii=False):
        pass  # U+FEFF: paho refuses a valid character (MQTT-1.5.4-3); the wire format rejects it instead, acked
    elif theirs is None:
        # paho refuses: so must we (paho's errors vary in type; the fast one raises paho's own two).
        assert ours is None, f"accepted what paho refuses: {data!r}"
    elif their_len > declared_end(data) or paho_reads_past_the_end(data):
        # paho read a value past the declared properties length (into the payload); refusing is right.
        assert ours is None, f"read past the properties length like paho: {data!r}"
    else:
        assert ours is not None, f"refused what paho accepts: {data!r}"
        assert our_len == their_len and ours.json() == theirs.json()


PAHO_REFUSALS = (
    MalformedPacket,
    MQTTException,
    IndexError,
    UnicodeDecodeError,
    ValueError,
    KeyError,
    TypeError,
    struct.error,
)


def paho_reads_past_the_end(data: bytes) -> bool:
    """Whether paho needed bytes past the declared properties length to read ``data``: it returns the declared
    length, not how far it read, so ask it again with the bytes past the end cut off (the full run found
    b'\x01\x01\x00': a one-byte value whose byte lies past a one-byte length)."""
    try:
        Properties(PacketTypes.PUBLISH).unpack(data[: declared_end(data)])
    except PAHO_REFUSALS:
        return True
    return False


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


# --- The structure-aware generators (tests/fuzz_messages.py), driven by hypothesis ----------------------------


@FUZZ
@given(data=st.data())
def test_deeply_nested_json(data):
    judge(deep_json(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_huge_numbers_nan_and_infinity_in_json(data):
    judge(huge_number(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_long_and_odd_unicode_labels_ids_and_splits(data):
    judge(long_strings(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_every_combination_of_properties_in_both_forms(data):
    judge(property_combination(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_json_in_other_encodings_than_utf8(data):
    judge(other_encoding(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_real_images_cut_corrupted_and_lying_about_their_size(data):
    judge(image_damage(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_what_a_well_behaved_sender_sends_is_accepted(data):
    judge(valid_example(Drawn(data)))


@FUZZ
@given(data=st.data())
def test_properties_a_sender_packs_the_broker_forwards_and_the_daemon_reads_back(data):
    """Round trip through the property codec: what a paho sender packs and Mosquitto forwards, the fast decoder
    reads back as it was. A PUBLISH whose properties the daemon cannot decode can never be acked: paho drops
    the connection, and the broker redelivers the same message on every reconnect."""
    c = Drawn(data)
    msg = property_combination(c) if c.choice((True, False)) else long_strings(c)
    props = mqtt_properties(c, msg)
    if props is None:
        return
    packed = props.pack()
    try:
        decoded, length = FastProperties(PacketTypes.PUBLISH).unpack(packed)
    except (MalformedPacket, MQTTException) as err:
        raise AssertionError(
            f"the broker forwards these properties, the daemon refuses them ({err}): {props.json()}"
        ) from None
    assert length == len(packed) and decoded.json() == props.json()


def test_the_picture_catalogue_is_whole():
    """Every generated image is accepted untouched (else the image tests would judge damage to a broken file)."""
    for p in PICTURES:
        result = parse(p.data, [("label", "rust")], p.content_type, DAEMON_LIMITS, 0.0)
        assert isinstance(result, Example) and (result.width, result.height) == p.size, (p.name, result)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(SEEN.values())
    print(
        f"\nfuzz: {EXAMPLES} inputs per test, {total} messages parsed: "
        + ", ".join(f"{k} {v}" for k, v in sorted(SEEN.items()))
    )
    for kind, outcomes in sorted(KINDS.items()):
        print(
            f"fuzz: {kind}: {sum(outcomes.values())} messages: "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )
