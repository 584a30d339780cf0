"""Messages for the fuzzers: the limits they judge by, the promise every parse must keep (``check``), and the
structure-aware generators, each of which builds one kind of awkward message with what the README's rules say must
happen to it. tests/test_fuzz.py drives the generators with hypothesis, tests/test_fuzz_daemon.py with a seeded
random.Random through a running daemon."""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from daemon.common.settings import StoreSettings
from daemon.ingest.imagehead import read_header
from daemon.ingest.wire import (
    CONTENT_TYPES,
    MAX_ID_CHARS,
    MAX_JSON_BRACKETS,
    MAX_JSON_INT_DIGITS,
    SPLITS,
    Example,
    Limits,
    Reason,
    Rejection,
    parse,
)

LIMITS = Limits(
    max_image_bytes=200_000,
    max_image_pixels=4_000_000,
    max_full_decode_pixels=4_000_000,
    max_label_chars=64,
    holdout_fraction=0.1,
)
SEEN: dict[str, int] = {}


def encoded(fmt: str, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 3), (90, 160, 40)).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = {"image/jpeg": encoded("JPEG"), "image/png": encoded("PNG"), "image/webp": encoded("WEBP")}


def check(result: Example | Rejection, limits: Limits = LIMITS) -> None:
    """The promise for any input: an Example that passed every check, or a Rejection with a reason."""
    if isinstance(result, Rejection):
        assert isinstance(result.reason, Reason) and result.detail
        # The parser's catch-all keeps a defect from ending the network thread; for the fuzzer it is still a defect.
        assert result.reason is not Reason.UNREADABLE, f"the parser failed inside (see the logged traceback): {result}"
        json.dumps(result.notice())  # what is reported to the sender must always serialise
        SEEN[result.reason.value] = SEEN.get(result.reason.value, 0) + 1
        return
    assert isinstance(result, Example)
    assert result.label and result.label == result.label.strip() and result.label.isprintable()
    assert 0 < len(result.image) <= limits.max_image_bytes
    assert result.content_type in CONTENT_TYPES and result.split in ("train", "holdout")
    assert 0 < result.width * result.height <= limits.max_image_pixels
    assert read_header(result.image)[0] == CONTENT_TYPES[result.content_type]
    SEEN["accepted"] = SEEN.get("accepted", 0) + 1


# --- Structure-aware generators ------------------------------------------------------------------------
# Each generator is a plain function of a Chooser that returns a Message and what must happen to it.
# tests/test_fuzz.py drives them with hypothesis, which shrinks what it finds to a small case; the daemon fuzzer
# (tests/test_fuzz_daemon.py) drives the very same functions with a seeded random.Random: @given reruns a
# test per input, and that test starts one daemon for thousands of messages.

T = TypeVar("T")
DEFAULTS = StoreSettings()
# What a daemon with the default settings enforces: the limits the new generators are judged against.
DAEMON_LIMITS = Limits(
    max_image_bytes=DEFAULTS.max_image_bytes,
    max_image_pixels=DEFAULTS.max_image_pixels,
    max_full_decode_pixels=DEFAULTS.max_full_decode_pixels,
    max_label_chars=DEFAULTS.max_label_chars,
    holdout_fraction=DEFAULTS.holdout_fraction,
)
JSON_LIMIT = DAEMON_LIMITS.max_image_bytes * 4 // 3 + 64 * 1024  # base64 of the largest image, and room for the rest
KINDS: dict[str, Counter] = {}


class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def text(self, max_size: int) -> str: ...


# Characters that parsers, brokers and label rules treat specially: controls, the C1 NEL, spaces that are not
# ASCII, zero-width and byte-order marks, bidi controls (RTL override), lone surrogates (JSON may escape them:
# "\ud800"), non-characters, private use, combining marks, RTL letters, emoji, JSON's own syntax.
SPECIAL_CHARS = (
    "\x00",
    "\x01",
    "\t",
    "\n",
    "\r",
    "\x1f",
    "\x7f",
    "\x85",
    "\xa0",
    "\xad",
    "\u200b",
    "\u200c",
    "\u200d",
    "\u200e",
    "\u200f",
    "\u202e",
    "\u2066",
    "\u2028",
    "\u3000",
    "\ufeff",
    "\ufffd",
    "\ufffe",
    "\uffff",
    "\ufdd0",
    "\ud800",
    "\udfff",
    "\ue000",
    "\U0010ffff",
    "\U0001f331",
    "\u05e9",
    "\u0628",
    "\u0301",
    "\u8449",
    "\xe9",
    '"',
    "\\",
    "/",
    "[",
    "{",
    "]",
    "}",
    " ",
)
# exclude_categories=(): surrogates too, which st.characters() leaves out by default.
AWKWARD = st.one_of(st.sampled_from(SPECIAL_CHARS), st.characters(codec=None, exclude_categories=()))
# Invisible ones: a label that looks right on screen and is not, the likeliest of the odd ones.
INVISIBLE_CHARS = ("\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202e", "\u2066", "\ufeff", "\xad")
WORDS = ("rust", "Tomato___Late_blight", "blight \xe9", "\u8449 rust", "\u05e9\u05d5\u05e8\u05e9", "\U0001f331 ok")


class Drawn:
    """Choices drawn by hypothesis (``st.data()``)."""

    def __init__(self, data: st.DataObject):
        self._data = data

    def integer(self, lo: int, hi: int) -> int:
        return self._data.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return self._data.draw(st.sampled_from(options))

    def text(self, max_size: int) -> str:
        return self._data.draw(st.text(AWKWARD, max_size=max_size))


class Seeded:
    """The same kinds of choices from a seeded random.Random: reproducible from the seed alone."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self._rng.randrange(len(options))]

    def text(self, max_size: int) -> str:
        return "".join(self._char() for _ in range(self._rng.randint(0, max_size)))

    def _char(self) -> str:
        r = self._rng.random()
        if r < 0.4:
            return self._rng.choice(SPECIAL_CHARS)
        if r < 0.7:
            return chr(self._rng.randint(0x20, 0x7E))
        return chr(self._rng.randint(0x80, 0x10FFFF))


ACCEPTED: frozenset[Reason] = frozenset()
IMAGE_FAULTS = frozenset(
    {Reason.EMPTY_IMAGE, Reason.NOT_AN_IMAGE, Reason.TRUNCATED_IMAGE, Reason.CORRUPT_IMAGE, Reason.TOO_MANY_PIXELS}
)


@dataclass(frozen=True)
class Message:
    """One MQTT message and what the README's rules say must become of it.

    ``expect``: ACCEPTED (it must be stored), the reasons it may be rejected for, or None where the rules
    cannot tell (a flipped bit in JPEG data decodes to other pixels: no checksum shows it).
    """

    kind: str
    payload: bytes = field(repr=False)
    user_properties: list[tuple[str, str]] | None
    content_type: str | None
    expect: frozenset[Reason] | None
    label: str | None = None  # what an accepted example must carry
    example_id: str | None = None

    def describe(self) -> str:
        head = self.payload[:80]
        return (
            f"{self.kind}: {len(self.payload)} bytes {head!r}{'...' if len(self.payload) > 80 else ''}, "
            f"user properties {str(self.user_properties)[:300]}, content type {self.content_type!r}"
        )


def judge(msg: Message, limits: Limits = DAEMON_LIMITS) -> Example | Rejection:
    """Parse one generated message; check the promise, then what its generator knows about it."""
    result = parse(msg.payload, msg.user_properties, msg.content_type, limits, 0.0)
    check(result, limits)
    outcome = result.reason.value if isinstance(result, Rejection) else "accepted"
    KINDS.setdefault(msg.kind.split(":")[0], Counter())[outcome] += 1
    matches = verdict_matches(msg, result)
    assert matches, mismatch(msg, result)
    return result


def verdict_matches(msg: Message, result: Example | Rejection) -> bool:
    if msg.expect is None:
        return True
    if msg.expect == ACCEPTED:
        return (
            isinstance(result, Example)
            and (msg.label is None or result.label == msg.label)
            and (msg.example_id is None or result.example_id == msg.example_id)
        )
    return isinstance(result, Rejection) and result.reason in msg.expect


def mismatch(msg: Message, result: Example | Rejection) -> str:
    assert msg.expect is not None, "a message the rules cannot judge matches any outcome"
    wanted = "accepted" if msg.expect == ACCEPTED else "rejected for " + "/".join(sorted(r.value for r in msg.expect))
    if isinstance(result, Example):
        got = (
            f"accepted as {result.width}x{result.height} {result.content_type}, label {result.label!r}, "
            f"id {result.example_id!r}"
        )
    else:
        got = f"rejected: {result.reason.value}: {result.detail}"
    return f"should be {wanted}, but was {got}; message {msg.describe()}"


# -- the README's rules, restated: the oracle the generators judge by --------------------------------------


def field_reasons(
    label: str | None,
    example_id: str | None,
    split: str | None,
    content_type: str | None,
    limits: Limits = DAEMON_LIMITS,
) -> frozenset[Reason]:
    """Every rule the fields break (the parser names the first it checks, so any of them is right)."""
    broken = set()
    if label is None:
        broken.add(Reason.MISSING_LABEL)
    elif not (label and label == label.strip() and len(label) <= limits.max_label_chars and label.isprintable()):
        broken.add(Reason.BAD_LABEL)
    if example_id is not None and not (0 < len(example_id) <= MAX_ID_CHARS and example_id.isprintable()):
        broken.add(Reason.BAD_EXAMPLE_ID)
    if split is not None and split not in SPLITS:
        broken.add(Reason.BAD_SPLIT)
    if content_type not in CONTENT_TYPES:
        broken.add(Reason.UNSUPPORTED_CONTENT_TYPE)
    return frozenset(broken)


def json_envelope(payload: bytes) -> frozenset[Reason] | None:
    """What the JSON form refuses before reading any field: not JSON at all, too long, nested, not UTF-8."""
    if payload[:16].lstrip()[:1] not in (b"{", b"["):
        return frozenset({Reason.MISSING_LABEL})  # no label property and not the JSON form
    if len(payload) > JSON_LIMIT:
        return frozenset({Reason.TOO_LARGE})
    if payload.count(b"[") + payload.count(b"{") > MAX_JSON_BRACKETS:
        return frozenset({Reason.BAD_JSON})  # the README's JSON form is one flat object
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return frozenset({Reason.BAD_JSON})
    return None


def mqtt_safe(text: str) -> str:
    """``text`` without what Mosquitto refuses in a UTF-8 property string (it drops the sender's connection).

    Mosquitto 2.0 refuses U+0000-001F, U+007F-009F, surrogates and non-characters; it forwards everything
    else, zero-width, bidi and byte-order marks included. What a paho sender cannot encode is dropped too.
    """

    def accepted(ch: str) -> bool:
        cp = ord(ch)
        return not (
            cp <= 0x1F
            or 0x7F <= cp <= 0x9F
            or 0xD800 <= cp <= 0xDFFF
            or 0xFDD0 <= cp <= 0xFDEF
            or cp & 0xFFFE == 0xFFFE
        )

    return "".join(ch for ch in text if accepted(ch))


def awkward_string(c: Chooser) -> str:
    """A label, id or split a sender might send: a word, a boundary length, a long run of odd characters."""
    word = c.choice(WORDS)
    shape = c.choice(("word", "boundary", "long", "inserted", "inserted", "text"))
    if shape == "word":
        return word
    if shape == "boundary":
        n = c.choice((DAEMON_LIMITS.max_label_chars, MAX_ID_CHARS, 1)) + c.integer(-1, 1)
        return (word * n)[:n]
    if shape == "long":
        return (c.text(8) or word) * c.integer(1, 600)  # up to ~5,000 characters
    if shape == "inserted":
        at = c.choice((0, len(word) // 2, len(word)))
        return word[:at] + c.choice(c.choice((SPECIAL_CHARS, INVISIBLE_CHARS))) * c.integer(1, 3) + word[at:]
    return c.text(40)


def digit_string(c: Chooser, n: int) -> str:
    """``n`` digits, without a leading zero; built from one drawn seed (drawing 10,000 digits one by one is slow)."""
    digits = random.Random(c.integer(0, 2**32)).choices("0123456789", k=n)
    if n > 1 and digits[0] == "0":
        digits[0] = "7"
    return "".join(digits)


# -- real images, and where their pixel data lies ------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    name: str
    data: bytes = field(repr=False)
    content_type: str
    size: tuple[int, int]
    body: tuple[tuple[int, int], ...]  # the pixel data: JPEG entropy-coded scans, PNG IDAT data, WebP bitstreams

    @property
    def format(self) -> str:
        return CONTENT_TYPES[self.content_type]

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis shows a failing draw by name, not 300 KB of bytes
        printer.text(f"<picture {self.name!r}>")


def _noise(mode: str, size: tuple[int, int], seed: int, smooth: bool = False) -> Image.Image:
    rng = random.Random(seed)
    if smooth:  # a gradient with a little noise: compresses like a photo, not like static
        base = Image.linear_gradient("L").resize(size).convert("RGB")
        grain = Image.frombytes("RGB", size, bytes(rng.randrange(32) for _ in range(size[0] * size[1] * 3)))
        return Image.blend(base, grain, 0.2).convert(mode)
    bands = len(Image.new(mode, (1, 1)).getbands())
    img = Image.frombytes("L" if mode in ("P", "1") else mode, size, rng.randbytes(size[0] * size[1] * bands))
    return img.convert(mode) if mode in ("P", "1") else img


def _saved(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(img: Image.Image, interlaced: bool = False, idat_size: int = 1 << 30) -> bytes:
    """A PNG Pillow cannot write: Adam7-interlaced, or its data split over many IDAT chunks."""
    color_type, channels = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}[img.mode]
    (w, h), raw = img.size, img.tobytes()
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rows = bytearray()
    for x0, y0, dx, dy in passes if interlaced else ((0, 0, 1, 1),):
        if x0 >= w or y0 >= h:
            continue  # an empty pass has no rows at all, not even filter bytes
        for y in range(y0, h, dy):
            line = raw[y * w * channels : (y + 1) * w * channels]
            rows.append(0)
            rows += b"".join(line[x * channels : (x + 1) * channels] for x in range(x0, w, dx))
    data = zlib.compress(bytes(rows))
    idats = b"".join(_png_chunk(b"IDAT", data[i : i + idat_size]) for i in range(0, len(data), idat_size))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 1 if interlaced else 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idats + _png_chunk(b"IEND", b"")


def jpeg_scans(data: bytes) -> tuple[tuple[int, int], ...]:
    """Where each scan's entropy-coded data lies (stuffed bytes and restart markers included)."""
    spans, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            start = end = pos
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
            spans.append((start, end))
            pos = end
    return tuple(spans)


def _jpeg_segment(data: bytes, markers: tuple[int, ...]) -> int:
    """Where the first segment with one of ``markers`` starts, walking the segments (tables may hold FF C0)."""
    pos = 2
    while data[pos + 1] not in markers:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos


def png_idats(data: bytes) -> tuple[tuple[int, int], ...]:
    spans, pos = [], 8
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            spans.append((pos + 8, pos + 8 + n))
        pos += 12 + n
    return tuple(spans)


def webp_bitstreams(data: bytes) -> tuple[tuple[int, int], ...]:
    skip = {b"VP8 ": 10, b"VP8L": 5, b"ALPH": 1}  # each chunk's own header: frame tag and size, signature, flags
    spans, pos = [], 12
    while pos + 8 <= len(data):
        kind, n = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if kind in skip:
            spans.append((pos + 8 + skip[kind], pos + 8 + n))
        pos += 8 + n + (n & 1)
    return tuple(spans)


def _picture(name: str, data: bytes) -> Picture:
    fmt, w, h = read_header(data)
    content_type = {v: k for k, v in CONTENT_TYPES.items()}[fmt]
    body = {"JPEG": jpeg_scans, "PNG": png_idats, "WEBP": webp_bitstreams}[fmt](data)
    assert body, f"{name}: no pixel data found"
    return Picture(name, data, content_type, (w, h), body)


def _catalogue() -> tuple[Picture, ...]:
    rgb = _noise("RGB", (64, 48), 1)
    made = {
        "jpeg L 1x1": _saved(_noise("L", (1, 1), 2), "JPEG"),
        "jpeg L 8x8 flat": _saved(Image.new("L", (8, 8), 128), "JPEG"),
        "jpeg RGB 17x33": _saved(_noise("RGB", (17, 33), 3), "JPEG", quality=75),
        "jpeg RGB 64x48": _saved(rgb, "JPEG"),
        "jpeg RGB 4:4:4": _saved(rgb, "JPEG", subsampling=0, quality=95),
        "jpeg RGB optimized": _saved(_noise("RGB", (40, 40), 4, smooth=True), "JPEG", optimize=True),
        "jpeg RGB restart markers": _saved(_noise("RGB", (48, 48), 5), "JPEG", restart_marker_blocks=2),
        "jpeg RGB 320x240": _saved(_noise("RGB", (320, 240), 6, smooth=True), "JPEG", quality=90),
        "jpeg CMYK": _saved(_noise("CMYK", (40, 30), 7), "JPEG"),
        "jpeg progressive RGB": _saved(rgb, "JPEG", progressive=True),
        "jpeg progressive L": _saved(_noise("L", (33, 17), 8), "JPEG", progressive=True),
        "png L 1x1": _saved(_noise("L", (1, 1), 9), "PNG"),
        "png 1-bit": _saved(_noise("1", (13, 7), 10), "PNG"),
        "png L 16x16": _saved(_noise("L", (16, 16), 11), "PNG"),
        "png RGB 31x17": _saved(_noise("RGB", (31, 17), 12), "PNG"),
        "png RGBA 24x24": _saved(_noise("RGBA", (24, 24), 13), "PNG"),
        "png P 20x20": _saved(_noise("P", (20, 20), 14), "PNG"),
        "png I;16": _saved(Image.frombytes("I;16", (9, 9), random.Random(15).randbytes(162)), "PNG"),
        "png RGB 128x96": _saved(_noise("RGB", (128, 96), 16, smooth=True), "PNG"),
        "png interlaced RGB": png_by_hand(_noise("RGB", (23, 19), 17), interlaced=True),
        "png interlaced RGBA": png_by_hand(_noise("RGBA", (8, 8), 18), interlaced=True),
        "png many IDAT": png_by_hand(_noise("RGB", (60, 40), 19), idat_size=997),
        "webp lossy RGB": _saved(rgb, "WEBP"),
        "webp lossy RGBA": _saved(_noise("RGBA", (32, 32), 20), "WEBP"),
        "webp lossless RGBA": _saved(_noise("RGBA", (24, 24), 21), "WEBP", lossless=True),
        "webp lossless 1x1": _saved(_noise("RGB", (1, 1), 22), "WEBP", lossless=True),
        "webp lossy 1x1": _saved(_noise("RGB", (1, 1), 23), "WEBP"),
    }
    return tuple(_picture(name, data) for name, data in made.items())


PICTURES = _catalogue()
# The small ones, where the image is not the point of the test (every parse decodes it).
PLAIN_PICTURES = tuple(p for p in PICTURES if len(p.data) < 16_000)


def _jpeg_progressive(p: Picture) -> bool:
    return len(p.body) > 1


def _png_pixel_bytes(p: Picture, size: tuple[int, int]) -> int:
    """Bytes of pixels (filter bytes left out) a PNG of ``size`` needs, with this one's depth and colour type."""
    depth, color_type = p.data[24], p.data[25]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    return size[1] * -(-size[0] * depth * channels // 8)


def image_damage(c: Chooser) -> Message:
    """A real image, whole or damaged where a weak link or a broken sender damages files."""
    p = c.choice(PICTURES)
    data, n = p.data, len(p.data)
    damage = c.choice(
        (
            "whole",
            "cut",
            "cut, end marker appended",
            "bits flipped in the pixel data",
            "pixel data zeroed",
            "header claims another size",
        )
    )
    expect: frozenset[Reason] | None
    if damage == "whole":
        image, expect = data, ACCEPTED
    elif damage == "cut":
        k = c.integer(0, n - 1)
        image = data[:k]
        expect = frozenset({Reason.EMPTY_IMAGE}) if k == 0 else frozenset({Reason.NOT_AN_IMAGE, Reason.TRUNCATED_IMAGE})
    elif damage == "cut, end marker appended":
        k = c.integer(0, n - 1)
        image, expect = _cut_and_closed(p, k)
    elif damage == "bits flipped in the pixel data":
        flipped = bytearray(data)
        for _ in range(c.integer(1, 8)):
            start, end = c.choice(p.body)
            if end > start:
                flipped[c.integer(start, end - 1)] ^= 1 << c.integer(0, 7)
        image, expect = bytes(flipped), None  # no checksum covers JPEG or VP8 data; zlib's only sometimes
    elif damage == "pixel data zeroed":
        zeroed = bytearray(data)
        for start, end in p.body:
            zeroed[start:end] = bytes(end - start)
        image = bytes(zeroed)
        # zlib's header and VP8L's Huffman codes cannot be all zeros; JPEG and VP8 zeros decode to a flat image.
        known = p.format == "PNG" or (p.format == "WEBP" and data[12:16] == b"VP8L")
        expect = frozenset({Reason.CORRUPT_IMAGE}) if known else None
    else:
        image, expect = _claiming(c, p)
    return labelled(c, f"image: {damage}", image, p.content_type, expect)


def _cut_and_closed(p: Picture, k: int) -> tuple[bytes, frozenset[Reason] | None]:
    """The tester's kind of input: the file cut at ``k``, then its end marker put back, so the tail looks whole."""
    data = p.data
    if p.format == "JPEG":
        image = data[:k] + b"\xff\xd9"
        # A baseline JPEG cut more than a few bytes before its scan ends has lost pixels; a progressive one cut
        # after its first scan is a coarser image, whole to any decoder.
        # libjpeg (under Pillow) fills a scan that ends early with grey and only warns, so the decode check
        # passes such a file: a known gap, not asserted here (docs/reliability.md).
        broken = False
    elif p.format == "PNG":
        image = data[:k] + _png_chunk(b"IEND", b"")
        # The last few bytes of compressed data may be stood in for by the 12 appended ones; 64 cannot.
        broken = k < p.body[-1][1] - 64
    else:
        image = data[:k]
        if k >= 8:
            image = image[:4] + struct.pack("<I", k - 8) + image[8:]  # the RIFF size says the file is whole
        broken = k < len(data) - 2
    return image, (IMAGE_FAULTS if broken else None)


def _claiming(c: Chooser, p: Picture) -> tuple[bytes, frozenset[Reason] | None]:
    """``p`` with its header patched to another size (a decompression bomb's calling card, or a wrong size)."""
    largest = {"JPEG": 65535, "PNG": 2**31 - 1, "WEBP": 16383}[p.format]
    w, h = (min(c.integer(*c.choice(((0, 2), (1, 128), (6000, 9000), (0, largest)))), largest) for _ in range(2))
    data = bytearray(p.data)
    if p.format == "JPEG":
        sof = _jpeg_segment(p.data, (0xC0, 0xC1, 0xC2))
        data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    elif p.format == "PNG":
        data[16:24] = struct.pack(">II", w, h)
        if c.choice((True, False)):
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:
        kind = bytes(data[12:16])
        w, h = max(w, 1), max(h, 1)
        if kind == b"VP8 ":
            data[26:30] = struct.pack("<HH", w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            data[21:25] = ((bits & ~0xFFFFFFF) | (w - 1) | (h - 1) << 14).to_bytes(4, "little")
        else:  # VP8X: the canvas, 24 bits each
            data[24:30] = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    fmt, w, h = read_header(bytes(data))
    limit = (
        DAEMON_LIMITS.max_image_pixels
        if fmt == "JPEG"
        else min(DAEMON_LIMITS.max_image_pixels, DAEMON_LIMITS.max_full_decode_pixels)
    )
    if w * h == 0:
        return bytes(data), frozenset({Reason.NOT_AN_IMAGE})
    if w * h > limit:
        return bytes(data), frozenset({Reason.TOO_MANY_PIXELS})
    if (w, h) == p.size:
        return bytes(data), ACCEPTED
    if fmt == "JPEG":
        # Every 8x8 block takes at least one bit of a DC scan, two in a baseline one: more blocks than the
        # data has bits for cannot all be there.
        # data has bits for cannot all be there; libjpeg fills them with grey (the known gap above).
        broken = False
    elif fmt == "PNG":
        crc_ok = data[29:33] == struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        held = len(zlib.decompress(b"".join(p.data[s:e] for s, e in p.body)))
        broken = not crc_ok or _png_pixel_bytes(p, (w, h)) > held
    else:
        broken = False  # libwebp's handling of a frame larger than its data is its own
    return bytes(data), (IMAGE_FAULTS if broken else None)


# -- messages: the two forms, every property combination ------------------------------------------------------


def labelled(
    c: Chooser, kind: str, image: bytes, content_type: str, expect: frozenset[Reason] | None, label: str = "rust"
) -> Message:
    """``image`` sent either way a sender may: MQTT v5 properties, or the JSON form."""
    if c.choice(("v5", "json")) == "v5":
        return Message(kind, image, [("label", label)], content_type, expect, label if expect == ACCEPTED else None)
    doc = {"label": label, "content_type": content_type, "image": base64.b64encode(image).decode()}
    return Message(
        kind + " (json)", json.dumps(doc).encode(), None, None, expect, label if expect == ACCEPTED else None
    )


PROPERTY_KEYS = ("label", "example_id", "split", "content_type", "x-sender")
SPLIT_VALUES = ("train", "holdout", "TRAIN", "test", "", " train", "holdout\n")
CONTENT_TYPE_VALUES = (
    *CONTENT_TYPES,
    "IMAGE/JPEG",
    "image/jpg",
    "image/gif",
    "",
    "image/jpeg; charset=binary",
    "image/png\u200b",
    "application/octet-stream",
)


def _field_value(c: Chooser, key: str) -> str:
    if key == "split":
        return c.choice(SPLIT_VALUES) if c.choice((True, True, False)) else awkward_string(c)
    if key == "content_type":
        return c.choice(CONTENT_TYPE_VALUES)
    if key == "example_id" and c.choice((True, False)):
        return f"ex-{c.integer(0, 10**6)}"
    return awkward_string(c)


def _payload_image(c: Chooser, content_type: str | None) -> tuple[bytes, frozenset[Reason]]:
    """An image for the message, and what it alone would be rejected for (ACCEPTED: nothing)."""
    p = c.choice(PLAIN_PICTURES)
    which = c.choice(("own type", "own type", "own type", "another type", "empty", "not an image"))
    if which == "empty":
        return b"", frozenset({Reason.EMPTY_IMAGE})
    if which == "not an image":
        return b"GIF89a" + bytes(c.integer(0, 40)), frozenset({Reason.NOT_AN_IMAGE})
    if which == "another type" and content_type in CONTENT_TYPES:
        other = (
            next(q for q in PLAIN_PICTURES if q.content_type not in (content_type, p.content_type))
            if p.content_type == content_type
            else p
        )
        return other.data, frozenset({Reason.CONTENT_TYPE_MISMATCH})
    same = [q for q in PLAIN_PICTURES if q.content_type == content_type]
    p = c.choice(same) if same else p
    return p.data, ACCEPTED if p.content_type == content_type else frozenset({Reason.CONTENT_TYPE_MISMATCH})


def _shuffled(c: Chooser, items: list[T]) -> list[T]:
    items = list(items)
    for i in range(len(items) - 1, 0, -1):  # Fisher-Yates, so that hypothesis can shrink each swap
        j = c.integer(0, i)
        items[i], items[j] = items[j], items[i]
    return items


def property_combination(c: Chooser) -> Message:
    """Each of label, example_id, split, content_type (as a user property) absent, once or repeated, in any
    order, with valid and invalid values; the Content Type property absent, right or wrong; sent as MQTT v5
    properties, or as the JSON form (with or without user properties beside it)."""
    occurrences = [(key, _field_value(c, key)) for key in PROPERTY_KEYS for _ in range(c.integer(0, 2))]
    form = c.choice(("v5", "v5", "json", "json beside properties"))
    props: list[tuple[str, str]] | None
    expect: frozenset[Reason] | None
    if form == "v5":
        props = [(key, mqtt_safe(value)) for key, value in _shuffled(c, occurrences)]
        first: dict[str, str] = {}
        for key, value in props:
            first.setdefault(key, value)  # MQTT allows repeats; the README's parser takes the first
        content_type = c.choice((None, *CONTENT_TYPE_VALUES))
        image, image_verdict = _payload_image(c, content_type)
        if "label" not in first:
            expect = frozenset({Reason.MISSING_LABEL})  # the payload is an image, never the JSON form
        else:
            expect = field_reasons(first["label"], first.get("example_id"), first.get("split"), content_type)
            expect = expect or image_verdict
        return Message(
            f"properties: v5, {len(props)} user properties",
            image,
            props,
            content_type,
            expect,
            first.get("label"),
            first.get("example_id"),
        )
    members: list[tuple[str, Any]] = _shuffled(c, occurrences)  # the image member may be any JSON value
    last = dict(members)  # JSON allows repeated keys too; Python's json keeps the last
    image, image_verdict = _payload_image(c, last.get("content_type"))
    encoded = c.choice(("base64", "base64", "base64 with newlines", "no padding", "absent", "not a string"))
    if encoded != "absent":
        b64 = base64.b64encode(image).decode()
        image_value = {
            "base64": b64,
            "base64 with newlines": base64.encodebytes(image).decode(),
            "no padding": b64.rstrip("="),
            "not a string": [len(image)],
        }[encoded]
        members.insert(c.integer(0, len(members)), ("image", image_value))
    ascii_only = c.choice((True, False))
    text = "{" + ", ".join(json.dumps(k) + ": " + json.dumps(v, ensure_ascii=ascii_only) for k, v in members) + "}"
    payload = text.encode("utf-8", "surrogatepass")  # a lone surrogate, unescaped, is not UTF-8: refused
    props = None
    if form == "json beside properties":  # any user properties but a label: the payload is still the JSON form
        props = [(k, mqtt_safe(v)) for k, v in occurrences if k != "label"]
    doc = dict(members)
    expect = json_envelope(payload)
    if expect is None:
        if "label" not in doc:
            expect = frozenset({Reason.MISSING_LABEL})
        elif not isinstance(doc.get("image"), str):
            expect = frozenset({Reason.BAD_JSON})
        else:
            try:
                base64.b64decode(doc["image"], validate=True)
                expect = field_reasons(doc["label"], doc.get("example_id"), doc.get("split"), doc.get("content_type"))
                expect = expect or image_verdict
            except (binascii.Error, ValueError):
                expect = frozenset({Reason.BAD_BASE64})
    return Message(
        f"properties: {form}, {len(members)} members",
        payload,
        props,
        c.choice((None, "image/jpeg", "text/plain")),
        expect,
        doc.get("label"),
        doc.get("example_id"),
    )


def long_strings(c: Chooser) -> Message:
    """A whole image under a label, id and split that may be thousands of characters of odd Unicode."""
    p = c.choice(PLAIN_PICTURES)
    label, example_id = awkward_string(c), c.choice((None, awkward_string(c)))
    split = c.choice((None, "train", awkward_string(c)))
    fields = {"label": label, "example_id": example_id, "split": split}
    if c.choice(("v5", "json")) == "v5":
        props = [(k, mqtt_safe(v)) for k, v in fields.items() if v is not None]
        first = dict(props)
        expect = field_reasons(first["label"], first.get("example_id"), first.get("split"), p.content_type)
        return Message(
            "long strings: v5", p.data, props, p.content_type, expect, first["label"], first.get("example_id")
        )
    doc = {k: v for k, v in fields.items() if v is not None}
    doc.update(content_type=p.content_type, image=base64.b64encode(p.data).decode())
    ascii_only = c.choice((True, False))
    payload = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    expect = json_envelope(payload) or field_reasons(label, example_id, split, p.content_type)
    return Message("long strings: json", payload, None, None, expect, label, example_id)


def deep_json(c: Chooser) -> Message:
    """Arrays and objects nested 1..200,000 deep, written as bytes (a recursive strategy would take minutes)."""
    bound = min(MAX_JSON_BRACKETS, 200_000)  # around the parser's bound, but never gigabytes of brackets
    depth = c.integer(*c.choice(((1, 40), (bound - 8, bound + 8), (900, 1100), (1, 200_000))))
    pattern = c.integer(0, 2**16 - 1)  # bit i: level i is an array (0) or an object (1), repeating every 16
    kinds = [(pattern >> i) & 1 for i in range(16)]
    opens, closes = (b"[", b'{"a": '), (b"]", b"}")
    whole, rest = divmod(depth, 16)
    innermost = c.choice((b"1", b"null", b'"x"', b"[]", b"{}", b"-0.5e-7"))
    nest = (
        b"".join(opens[k] for k in kinds) * whole
        + b"".join(opens[k] for k in kinds[:rest])
        + innermost
        + b"".join(closes[k] for k in reversed(kinds[:rest]))
        + b"".join(closes[k] for k in reversed(kinds)) * whole
    )
    ending = c.choice(("balanced", "balanced", "unclosed", "one too many", "cut"))
    if ending == "unclosed":  # the tester's b"[" * 100000
        nest = nest[: len(nest) // 2 + c.integer(0, 1)]
        nest = nest[: nest.rfind(b"[") + 1] if b"[" in nest else nest
    elif ending == "one too many":
        nest += b"]"
    elif ending == "cut":
        nest = nest[: c.integer(1, len(nest) - 1)]
    where = c.choice(("whole payload", "member of an example", "the label", "the image"))
    p = c.choice(PLAIN_PICTURES)
    fields = {
        "label": b'"rust"',
        "content_type": json.dumps(p.content_type).encode(),
        "image": json.dumps(base64.b64encode(p.data).decode()).encode(),
    }
    if where == "whole payload":
        payload = nest
    else:
        slot = {"member of an example": b"deep", "the label": b"label", "the image": b"image"}[where]
        fields = {**fields, slot.decode(): nest}
        payload = b"{" + b", ".join(json.dumps(k).encode() + b": " + v for k, v in fields.items()) + b"}"
    payload = b" " * c.choice((0, 0, 1, 15, 16)) + payload  # the form is recognised in the first 16 bytes
    expect = json_envelope(payload)
    if expect is None:
        if ending != "balanced":
            expect = frozenset({Reason.BAD_JSON})
        elif where == "whole payload":
            expect = frozenset({Reason.BAD_JSON, Reason.MISSING_LABEL})  # an array, or an object with no label
        elif where == "member of an example":
            expect = ACCEPTED
        else:
            expect = frozenset({Reason.BAD_JSON})  # label and image must be strings
    return Message(f"deep json: {where}, {ending}", payload, None, None, expect, "rust" if expect == ACCEPTED else None)


def huge_number(c: Chooser) -> Message:
    """Integers of 1..10,000 digits, floats with huge mantissas or exponents, NaN and Infinity, anywhere."""
    sign = c.choice(("", "-"))
    kind = c.choice(("integer", "integer", "float", "exponent", "literal"))
    n = c.integer(*c.choice(((1, MAX_JSON_INT_DIGITS + 2), (4290, 4310), (1, 10_000))))
    if kind == "integer":
        number = sign + digit_string(c, n)
    elif kind == "float":
        number = sign + digit_string(c, n) + "." + digit_string(c, c.integer(1, 400))
    elif kind == "exponent":
        number = (
            sign
            + digit_string(c, c.integer(1, 20))
            + c.choice("eE")
            + c.choice(("", "+", "-"))
            + digit_string(c, c.integer(1, 5000))
        )
    else:
        number = c.choice(("NaN", "Infinity", "-Infinity"))
    too_long = kind == "integer" and n > MAX_JSON_INT_DIGITS
    where = c.choice(
        (
            "member of an example",
            "inside a member",
            "the label",
            "the example_id",
            "the split",
            "the image",
            "whole payload",
            "in an array",
        )
    )
    p = c.choice(PLAIN_PICTURES)
    members = {
        "label": '"rust"',
        "content_type": json.dumps(p.content_type),
        "image": json.dumps(base64.b64encode(p.data).decode()),
    }
    if where == "member of an example":
        members["n"] = number
    elif where == "inside a member":
        members["n"] = '[1, {"m": ' + number + "}]"
    elif where.startswith("the "):
        members[where.removeprefix("the ")] = number
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in members.items()) + "}"
    payload = {"whole payload": number, "in an array": "[" + number + "]"}.get(where, text).encode()
    expect = json_envelope(payload)
    if expect is None:
        if too_long or where not in ("member of an example", "inside a member"):
            expect = frozenset({Reason.BAD_JSON})  # a number too long to read, or a field that must be a string
        else:
            expect = ACCEPTED
    return Message(
        f"huge number: {kind} in {where}", payload, None, None, expect, "rust" if expect == ACCEPTED else None
    )


def other_encoding(c: Chooser) -> Message:
    """The JSON form in an encoding other than UTF-8: UTF-16 and -32 with and without a byte-order mark,
    Latin-1, cp1252, UTF-8 behind a BOM."""
    encoding = c.choice(("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"))
    label = c.choice(("rust", "blight \xe9", "caf\xe9") if encoding in ("latin-1", "cp1252") else WORDS)
    p = c.choice(PLAIN_PICTURES)
    doc = {"label": label, "content_type": p.content_type, "image": base64.b64encode(p.data).decode()}
    text = json.dumps(doc, ensure_ascii=c.choice((True, False)))
    payload = text.encode(encoding)
    # The same bytes as UTF-8 (ASCII text in Latin-1) are UTF-8; anything else is refused, never guessed at.
    expect = ACCEPTED if payload == text.encode("utf-8") else frozenset({Reason.BAD_JSON, Reason.MISSING_LABEL})
    return Message(f"encoding: {encoding}", payload, None, None, expect, label if expect == ACCEPTED else None)


def valid_example(c: Chooser) -> Message:
    """What a well-behaved sender sends: a whole image, a plain label, maybe an id and a split."""
    p = c.choice(PLAIN_PICTURES)
    label = c.choice(WORDS)
    example_id = c.choice((None, f"ok-{c.integer(0, 10**9)}"))
    split = c.choice((None, None, "train", "holdout"))
    fields = [(k, v) for k, v in (("label", label), ("example_id", example_id), ("split", split)) if v is not None]
    if c.choice(("v5", "json")) == "v5":
        return Message("valid: v5", p.data, fields, p.content_type, ACCEPTED, label, example_id)
    doc = {**dict(fields), "content_type": p.content_type, "image": base64.b64encode(p.data).decode()}
    return Message("valid: json", json.dumps(doc).encode(), None, None, ACCEPTED, label, example_id)


def oversized(c: Chooser) -> Message:
    """A payload just past the image limit (or the JSON form's): refused by its length alone."""
    return oversized_message(c.choice(("v5", "json")))


def oversized_message(form: str) -> Message:
    if form == "v5":
        payload = IMAGES["image/jpeg"] + bytes(DAEMON_LIMITS.max_image_bytes + 1 - len(IMAGES["image/jpeg"]))
        return Message("oversized: v5", payload, [("label", "rust")], "image/jpeg", frozenset({Reason.TOO_LARGE}))
    payload = b'{"label": "rust", "image": "' + b"A" * (JSON_LIMIT + 4) + b'"}'
    return Message("oversized: json", payload, None, None, frozenset({Reason.TOO_LARGE}))


GENERATORS: dict[str, Callable[[Chooser], Message]] = {
    f.__name__: f
    for f in (
        deep_json,
        huge_number,
        long_strings,
        property_combination,
        other_encoding,
        image_damage,
        valid_example,
        oversized,
    )
}


def mqtt_properties(c: Chooser, msg: Message) -> Properties | None:
    """The PUBLISH properties a sender's paho would pack for ``msg``, with other v5 properties drawn beside them."""
    props = Properties(PacketTypes.PUBLISH)
    if msg.content_type is not None:
        props.ContentType = msg.content_type
    if msg.user_properties:
        props.UserProperty = list(msg.user_properties)
    extras = c.choice(("none", "none", "format indicator", "expiry", "response topic", "correlation data"))
    if extras == "format indicator":
        props.PayloadFormatIndicator = c.choice((0, 1))  # 1 claims UTF-8; Mosquitto 2.0 does not check it
    elif extras == "expiry":
        props.MessageExpiryInterval = c.integer(3600, 2**32 - 1)
    elif extras == "response topic":
        props.ResponseTopic = "sprout/replies/" + mqtt_safe(c.text(20)).replace("+", "").replace("#", "")
    elif extras == "correlation data":
        props.CorrelationData = random.Random(c.integer(0, 2**16)).randbytes(c.integer(0, 64))
    return props if props.json() else None
