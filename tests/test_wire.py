"""The wire format: every way a message can be wrong gets its own reason, good ones parse exactly."""

from __future__ import annotations

import base64
import io
import json
import time

import pillow_heif
import pytest
from helpers import jpeg, png
from PIL import Image

from daemon.ingest.wire import Example, Limits, Reason, Rejection, Unchecked, check_body, holdout_split, parse

LIMITS = Limits(
    max_image_bytes=200_000,
    max_image_pixels=1_000_000,
    max_full_decode_pixels=1_000_000,
    max_label_chars=32,
    holdout_fraction=0.2,
)


def webp(size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="WEBP")
    return buf.getvalue()


def heic(width: int = 24, height: int = 16) -> bytes:
    buf = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (width, height), (10, 200, 30))).save(buf, quality=80)
    return buf.getvalue()


def props(label: str | None = "Late blight", **extra: str) -> list[tuple[str, str]]:
    out = [] if label is None else [("label", label)]
    return out + list(extra.items())


def rejected(result) -> Reason:
    assert isinstance(result, Rejection), result
    assert result.detail  # every rejection tells the sender something
    return result.reason


@pytest.mark.parametrize(
    ("payload", "content_type", "fmt_size"),
    [
        (jpeg(1, 40), "image/jpeg", (40, 40)),
        (png(2, 24), "image/png", (24, 24)),
        (webp(20), "image/webp", (20, 20)),
        (heic(24, 16), "image/heic", (24, 16)),
        (heic(16, 24), "image/heif", (16, 24)),
    ],
)
def test_accepts_each_format_with_its_dimensions(payload, content_type, fmt_size):
    result = parse(payload, props(), content_type, LIMITS, received_at=5.0)
    assert isinstance(result, Example)
    assert (result.width, result.height) == fmt_size
    assert result.label == "Late blight"
    assert result.content_type == content_type
    assert result.image == payload
    assert result.received_at == 5.0


def test_derived_id_is_stable_and_depends_on_label_and_bytes():
    a = parse(jpeg(1), props("a"), "image/jpeg", LIMITS)
    again = parse(jpeg(1), props("a"), "image/jpeg", LIMITS)
    other_label = parse(jpeg(1), props("b"), "image/jpeg", LIMITS)
    other_bytes = parse(jpeg(2), props("a"), "image/jpeg", LIMITS)
    assert a.example_id == again.example_id
    assert len({a.example_id, other_label.example_id, other_bytes.example_id}) == 3


def test_sender_id_and_split_are_kept():
    result = parse(jpeg(1), props(example_id="phone-7/0001", split="holdout"), "image/jpeg", LIMITS)
    assert (result.example_id, result.split) == ("phone-7/0001", "holdout")


def test_first_of_repeated_user_properties_wins():
    result = parse(jpeg(1), [("label", "first"), ("label", "second")], "image/jpeg", LIMITS)
    assert result.label == "first"


def test_hash_split_is_deterministic_and_near_the_fraction():
    splits = [holdout_split(f"id-{i}", 0.2) for i in range(5000)]
    assert splits == [holdout_split(f"id-{i}", 0.2) for i in range(5000)]
    share = splits.count("holdout") / len(splits)
    assert 0.18 < share < 0.22
    assert all(holdout_split(f"id-{i}", 0.0) == "train" for i in range(100))


@pytest.mark.parametrize(
    ("user_properties", "reason"),
    [
        (props(None), Reason.MISSING_LABEL),
        (props(""), Reason.BAD_LABEL),
        (props("   "), Reason.BAD_LABEL),
        (props(" padded"), Reason.BAD_LABEL),
        (props("x" * 33), Reason.BAD_LABEL),
        (props("bad\nlabel"), Reason.BAD_LABEL),
        (props("bell\x07"), Reason.BAD_LABEL),
        (props(example_id=""), Reason.BAD_EXAMPLE_ID),
        (props(example_id="a\x00b"), Reason.BAD_EXAMPLE_ID),
        (props(example_id="x" * 201), Reason.BAD_EXAMPLE_ID),
        (props(split="test"), Reason.BAD_SPLIT),
    ],
)
def test_bad_properties_are_rejected_with_their_reason(user_properties, reason):
    assert rejected(parse(jpeg(1), user_properties, "image/jpeg", LIMITS)) == reason


def test_label_may_be_any_printable_language():
    assert parse(jpeg(1), props("Mildiou de la vigne"), "image/jpeg", LIMITS).label == "Mildiou de la vigne"
    assert parse(jpeg(1), props("玉米锈病"), "image/jpeg", LIMITS).label == "玉米锈病"


def test_image_checks():
    j = jpeg(3, 64)
    assert rejected(parse(j, props(), None, LIMITS)) == Reason.UNSUPPORTED_CONTENT_TYPE
    assert rejected(parse(j, props(), "image/gif", LIMITS)) == Reason.UNSUPPORTED_CONTENT_TYPE
    assert rejected(parse(j, props(), "image/png", LIMITS)) == Reason.CONTENT_TYPE_MISMATCH
    assert rejected(parse(b"", props(), "image/jpeg", LIMITS)) == Reason.EMPTY_IMAGE
    assert rejected(parse(b"\x00" * 1000, props(), "image/jpeg", LIMITS)) == Reason.NOT_AN_IMAGE
    assert rejected(parse(b"hello, not a picture", props(), "image/jpeg", LIMITS)) == Reason.NOT_AN_IMAGE
    assert rejected(parse(j[: len(j) // 2], props(), "image/jpeg", LIMITS)) == Reason.TRUNCATED_IMAGE
    p = png(4, 64)
    assert rejected(parse(p[:-20], props(), "image/png", LIMITS)) == Reason.TRUNCATED_IMAGE
    w = webp(64)
    assert rejected(parse(w[:-10], props(), "image/webp", LIMITS)) == Reason.TRUNCATED_IMAGE
    big = jpeg(5, 600, quality=95)
    assert len(big) > 200_000 or pytest.fail("fixture image should exceed the byte limit")
    assert rejected(parse(big, props(), "image/jpeg", LIMITS)) == Reason.TOO_LARGE


def test_pixel_bomb_is_rejected_from_the_header():
    # 2000 x 2000 = 4 M pixels: a few kB of PNG, over the 1 M pixel limit.
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 50_000
    assert rejected(parse(buf.getvalue(), props(), "image/png", LIMITS)) == Reason.TOO_MANY_PIXELS


def test_bomb_past_the_default_limit_is_rejected_without_decoding():
    # 15000 x 15000 = 225 M pixels in ~30 kB: over the default 50 M pixel limit.
    buf = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buf, format="PNG")
    limits = Limits(
        max_image_bytes=10_000_000,
        max_image_pixels=50_000_000,
        max_full_decode_pixels=50_000_000,
        max_label_chars=32,
        holdout_fraction=0.1,
    )
    started = time.perf_counter()
    assert rejected(parse(buf.getvalue(), props(), "image/png", limits)) == Reason.TOO_MANY_PIXELS
    assert time.perf_counter() - started < 0.5  # decoding 225 M pixels would take seconds


def json_message(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_json_fallback_for_mqtt311_senders():
    j = jpeg(6, 30)
    msg = json_message(label="Rust", image=base64.b64encode(j).decode(), content_type="image/jpeg", example_id="e-1")
    result = parse(msg, None, None, LIMITS)
    assert isinstance(result, Example)
    assert (result.label, result.example_id, result.image, result.width) == ("Rust", "e-1", j, 30)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", Reason.BAD_JSON),
        (b"[1, 2]", Reason.BAD_JSON),
        (json_message(label=3, image="", content_type="image/jpeg"), Reason.BAD_JSON),
        (json_message(image="AAAA", content_type="image/jpeg"), Reason.MISSING_LABEL),
        (json_message(label="Rust", content_type="image/jpeg"), Reason.BAD_JSON),
        (json_message(label="Rust", image="!!not base64!!", content_type="image/jpeg"), Reason.BAD_BASE64),
        (json_message(label="Rust", image=base64.b64encode(jpeg(1)).decode()), Reason.UNSUPPORTED_CONTENT_TYPE),
        (b"{" + b" " * 400_000 + b"}", Reason.TOO_LARGE),
        (b"\xff\xd8 raw jpeg without any properties", Reason.MISSING_LABEL),
    ],
)
def test_bad_json_fallback_is_rejected_with_its_reason(payload, reason):
    assert rejected(parse(payload, None, None, LIMITS)) == reason


def test_rejection_notice_carries_no_image_and_only_a_printable_id():
    r = parse(b"junk", props(example_id="phone-1/42"), "image/jpeg", LIMITS)
    assert r.notice() == {
        "example_id": "phone-1/42",
        "reason": "not_an_image",
        "detail": r.detail,
        "received_at": r.received_at,
    }
    r = parse(b"junk", props(example_id="bad\x00id"), "image/jpeg", LIMITS)
    assert r.notice()["example_id"] is None


# Found by an outside tester against a running daemon: these raised out of parse() and ended paho's network thread.
@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,  # RecursionError in Python's json
        b"{" * 100_000,
        b'{"label": "rust", "n": ' + b"9" * 5_000 + b"}",  # ValueError: past Python's int-to-string limit
        b'{"label": "rust", "n": -' + b"1" * 40 + b"}",
        b'{"label": "rust", "image": "AAAA", "x": [[[[[[[[[[' * 30 + b"}",
        b"[\xff\xfe]",  # not UTF-8
    ],
)
def test_deep_nesting_and_huge_numbers_are_rejected_not_raised(payload):
    assert rejected(parse(payload, None, None, LIMITS)) == Reason.BAD_JSON


def test_a_sane_number_or_nesting_in_the_json_form_is_still_accepted():
    image = base64.b64encode(jpeg(7, 24)).decode()
    msg = json.dumps(
        {
            "label": "rust",
            "image": image,
            "content_type": "image/jpeg",
            "meta": {"gps": [48.1, 11.5]},
            "taken": 1733100000123,
        }
    ).encode()
    assert isinstance(parse(msg, None, None, LIMITS), Example)


def test_a_json_rejection_keeps_the_example_id_it_could_read():
    msg = json_message(label="Rust", image="!!not base64!!", content_type="image/jpeg", example_id="phone-7/12")
    r = parse(msg, None, None, LIMITS)
    assert rejected(r) == Reason.BAD_BASE64 and r.example_id == "phone-7/12"
    r = parse(json_message(label=3, image="", example_id="phone-7/13"), None, None, LIMITS)
    assert rejected(r) == Reason.BAD_JSON and r.example_id == "phone-7/13"


def test_a_parser_defect_rejects_the_message_instead_of_raising(monkeypatch):
    import daemon.ingest.wire

    def broken(*args):
        raise KeyError("a defect")

    monkeypatch.setattr(daemon.ingest.wire, "_example", broken)
    r = parse(jpeg(1), props(example_id="e-9"), "image/jpeg", LIMITS)
    assert rejected(r) == Reason.UNREADABLE and r.example_id == "e-9" and "KeyError" in r.detail


def test_a_body_that_does_not_decode_is_rejected_at_intake():
    j = jpeg(8, 64)
    cut = j[:200] + b"\xff\xd9"  # a valid header and end marker around nothing: passes the header checks
    assert rejected(parse(cut, props(), "image/jpeg", LIMITS)) == Reason.CORRUPT_IMAGE
    p = png(9, 64)
    idat = p.index(b"IDAT")
    garbled = p[: idat + 4] + bytes(b ^ 0x5A for b in p[idat + 4 : idat + 60]) + p[idat + 60 :]
    assert rejected(parse(garbled, props(), "image/png", LIMITS)) == Reason.CORRUPT_IMAGE
    assert isinstance(parse(j, props(), "image/jpeg", LIMITS), Example)


def test_png_and_webp_past_the_full_decode_limit_are_rejected_jpeg_is_decoded_at_a_reduced_scale():
    limits = Limits(
        max_image_bytes=10_000_000,
        max_image_pixels=50_000_000,
        max_full_decode_pixels=16_777_216,
        max_label_chars=32,
        holdout_fraction=0.1,
    )
    # 7000 x 7000 all-zero PNG, ~143 KB: decoding it whole would cost 147 MB.
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000)).save(buf, format="PNG")
    r = parse(buf.getvalue(), props(), "image/png", limits)
    assert rejected(r) == Reason.TOO_MANY_PIXELS and "JPEG" in r.detail
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (30, 120, 40)).save(buf, format="JPEG", quality=50)
    assert isinstance(parse(buf.getvalue(), props(), "image/jpeg", limits), Example)


def sideways_jpeg() -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter, as phones do
    Image.new("RGB", (40, 20), (200, 30, 30)).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def test_the_network_threads_parse_and_intakes_body_check_together_give_what_parse_gives():
    """The feed parses without decoding (decode=False); intake decodes the body on its threads (check_body)."""
    j = jpeg(8, 64)
    cases = [
        (j, props(example_id="ok-1"), "image/jpeg"),
        (j, props(), "image/jpeg"),  # no sender id: a rejection must not show the derived one
        (j[:200] + b"\xff\xd9", props(), "image/jpeg"),  # header fine, body does not decode
        (j[:200] + b"\xff\xd9", props(example_id="cut-1"), "image/jpeg"),
        (sideways_jpeg(), props(), "image/jpeg"),  # the upright size comes from the body's EXIF
        (heic(), props(), "image/heic"),
        (b"not an image", props(), "image/jpeg"),  # refused from the header: never Unchecked
    ]
    for payload, user_properties, content_type in cases:
        whole = parse(payload, user_properties, content_type, LIMITS, received_at=1.0)
        first = parse(payload, user_properties, content_type, LIMITS, received_at=1.0, decode=False)
        split = check_body(first) if isinstance(first, Unchecked) else first
        assert split == whole, (user_properties, whole, split)
    assert (whole_sideways := parse(sideways_jpeg(), props(), "image/jpeg", LIMITS)).width == 20
    assert isinstance(parse(j[:200] + b"\xff\xd9", props(), "image/jpeg", LIMITS, decode=False), Unchecked)
    assert whole_sideways.height == 40
