"""Format and dimensions of a JPEG, PNG or WebP image from its first bytes, without decoding.

Why not Pillow here: ``Image.open`` parses every JPEG table in Python before it
knows the size, ~56 us per 30 KB photo, which was the largest cost of the
MQTT network thread after paho itself (docs/benchmarks.md). The sizes below
sit at fixed places in each format's header (JPEG: the SOF segment; PNG: the
IHDR chunk; WebP: the VP8/VP8L/VP8X chunk), so reading them is a bounded scan.
Pillow still decodes every image, in the learner; tests/test_imagehead.py
checks this reader against Pillow on many images.
"""

from __future__ import annotations

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT (C4), JPG (C8), DAC (CC).
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM, RSTn: no length field
_MAX_JPEG_SEGMENTS = 256  # EXIF, ICC, comments...: real files have a few dozen at most


class HeaderError(ValueError):
    """The bytes are not a readable JPEG, PNG or WebP header."""


def read_header(data: bytes) -> tuple[str, int, int]:
    """Return (format, width, height), format as Pillow names it: 'JPEG', 'PNG' or 'WEBP'.

    >>> read_header(bytes.fromhex("89504e470d0a1a0a0000000d49484452000001000000008008060000001f15c489"))
    ('PNG', 256, 128)
    """
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG", *_jpeg(data))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ("PNG", *_png(data))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP", *_webp(data))
    raise HeaderError("not a JPEG, PNG or WebP file (unknown signature)")


def _jpeg(data: bytes) -> tuple[int, int]:
    pos, n = 2, len(data)
    for _ in range(_MAX_JPEG_SEGMENTS):
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > n or data[pos] != 0xFF:
            raise HeaderError("JPEG marker structure is broken before the frame header")
        marker = data[pos + 1]
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            raise HeaderError("JPEG has no frame header (SOF) before its image data")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            raise HeaderError("JPEG segment with an impossible length")
        if marker in _SOF:
            if pos + 9 > n or length < 8:
                raise HeaderError("JPEG frame header is cut short")
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        pos += 2 + length
    raise HeaderError(f"JPEG has more than {_MAX_JPEG_SEGMENTS} segments before its frame header")


def _png(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise HeaderError("PNG does not start with an IHDR chunk")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        # Frame tag (3 bytes), start code 9d 01 2a, then 14-bit width and height.
        if len(data) < 30 or data[23:26] != b"\x9d\x01\x2a":
            raise HeaderError("WebP (lossy) frame header is missing or cut short")
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L":
        if len(data) < 25 or data[20] != 0x2F:
            raise HeaderError("WebP (lossless) header is missing or cut short")
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if len(data) < 30:
            raise HeaderError("WebP (extended) header is cut short")
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise HeaderError(f"WebP with an unknown first chunk {chunk!r}")
