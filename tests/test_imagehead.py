"""The header reader agrees with Pillow on format and size, and refuses what is not an image."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from daemon.ingest.imagehead import HeaderError, read_header


def encode(size: tuple[int, int], fmt: str, mode: str = "RGB", **options) -> bytes:
    rng = random.Random(size[0] * 7919 + size[1])
    bands = len(Image.new(mode, (1, 1)).getbands())
    color = tuple(rng.randrange(256) for _ in range(bands)) if bands > 1 else rng.randrange(256)
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


CASES: list[tuple[str, str, dict[str, object]]] = [  # format, mode, Pillow's save options
    ("JPEG", "RGB", {}),
    ("JPEG", "L", {}),
    ("JPEG", "RGB", {"progressive": True}),
    ("JPEG", "CMYK", {}),
    ("JPEG", "RGB", {"exif": Image.Exif().tobytes(), "comment": b"leaf from plot 7"}),
    ("PNG", "RGB", {}),
    ("PNG", "RGBA", {}),
    ("PNG", "P", {}),
    ("PNG", "I;16", {}),
    ("WEBP", "RGB", {"lossless": False}),
    ("WEBP", "RGB", {"lossless": True}),
    ("WEBP", "RGBA", {"lossless": False}),  # alpha: extended (VP8X) layout
    ("WEBP", "RGBA", {"lossless": True}),
]


@pytest.mark.parametrize(("fmt", "mode", "options"), CASES, ids=[f"{f}-{m}-{sorted(o)}" for f, m, o in CASES])
def test_agrees_with_pillow(fmt, mode, options):
    for size in [(1, 1), (17, 3), (224, 224), (640, 480), (3, 1000), (4000, 3)]:
        if fmt == "WEBP" and max(size) > 16383:
            continue
        data = encode(size, fmt, mode, **options)
        with Image.open(io.BytesIO(data)) as img:
            expected = (img.format, *img.size)
        assert read_header(data) == expected == (fmt, *size)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF89a\x01\x00\x01\x00",
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # segment runs past the data
        b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 20,  # scan before any frame header
        b"\xff\xd8\xff\xe0\x00\x00" + b"\x00" * 20,  # impossible segment length
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDX" + b"\x00" * 8,
        b"\x89PNG\r\n\x1a\n",
        b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 6,
        b"RIFF\x10\x00\x00\x00WEBPABCD" + b"\x00" * 20,
    ],
)
def test_refuses_what_is_not_a_readable_header(data):
    with pytest.raises(HeaderError):
        read_header(data)


def test_every_prefix_of_a_real_file_either_reads_right_or_is_refused():
    data = encode((300, 200), "JPEG", exif=Image.Exif().tobytes())
    for cut in range(len(data)):
        try:
            assert read_header(data[:cut]) == ("JPEG", 300, 200)
        except HeaderError:
            pass
