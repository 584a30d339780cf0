"""Whether a message's image is one: its format and size from the header, a cut-off tail, a body that decodes.

Nothing is decoded before the header's size passed its limits, so a decompression bomb costs a header
read; the commonest fault from phones on a weak link, a truncated upload, is named as such.
"""

from __future__ import annotations

import io
import warnings
import zlib

from PIL import ExifTags, Image

from daemon.ingest.imagehead import HeaderError, read_header
from daemon.store.records import Reason
from edge import preprocess  # registers pillow-heif's HEIF opener with Pillow, where it is installed

# The content types accepted, and the format each names.
CONTENT_TYPES = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/heic": "HEIF",
    "image/heif": "HEIF",
}
# A JPEG is checked by decoding it at 1/8 scale (Pillow's draft mode): every byte of its entropy-coded
# data is read, so a cut or corrupt body shows, at a small fraction of a full decode's time and memory.
CHECK_DECODE_SIZE = (1, 1)
# ISO-BMFF brands (in the leading 'ftyp' box) of HEVC-coded HEIF: iPhones write 'heic' + 'mif1', Android
# phones 'mif1' + 'heic'. 'mif1' alone is shared with AVIF, which pillow-heif's build here cannot decode.
HEIF_BRANDS = frozenset((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"))
MAX_HEIF_BOXES = 64  # top-level boxes walked for the truncation check: real files have 3 or 4
# EXIF orientations that turn the stored picture a quarter (5-8: transposed, rotated 90 or 270 degrees).
QUARTER_TURNS = frozenset((5, 6, 7, 8))


class Refused(Exception):
    """A message refused, with the reason the sender is told and what to fix."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
        raise Refused(
            Reason.TRUNCATED_IMAGE, f"{expected_format} data ends early (truncated upload?): send the whole file"
        )
    try:
        actual_format, width, height = _header(image)
    except HeaderError as err:
        raise Refused(Reason.NOT_AN_IMAGE, f"payload is not a readable JPEG, PNG, WebP or HEIC image: {err}") from None
    if actual_format != expected_format:
        raise Refused(
            Reason.CONTENT_TYPE_MISMATCH,
            f"content type says {expected_format} but the data is {actual_format}: fix the Content Type property",
        )
    if width <= 0 or height <= 0:
        raise Refused(Reason.NOT_AN_IMAGE, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise Refused(
            Reason.TOO_MANY_PIXELS, f"image of {width}x{height} pixels exceeds the limit of {max_pixels}: resize it"
        )
    if actual_format != "JPEG" and width * height > max_full_decode_pixels:
        raise Refused(
            Reason.TOO_MANY_PIXELS,
            f"{actual_format} image of {width}x{height} pixels exceeds the limit of {max_full_decode_pixels} for "
            "formats decoded at full size: resize it, or send it as JPEG",
        )
    if not decode:
        return width, height
    orientation = check_decodes(image, actual_format, (width, height))
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
        raise Refused(Reason.TOO_MANY_PIXELS, f"HEIF image is too large to decode ({err}): resize it") from None
    except Exception as err:  # pillow-heif raises several types for a broken container
        raise HeaderError(f"HEIF container does not parse ({str(err)[:160] or type(err).__name__})") from None


def check_decodes(image: bytes, fmt: str, size: tuple[int, int]) -> int:
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
        raise Refused(
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
