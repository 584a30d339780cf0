"""Photos as agronomists' phones send them: 18 MP JPEGs stored sideways with an EXIF orientation, and HEIC.

The pixels a model learns from and the pixels a device classifies are the upright picture, whatever
the phone stored; intake records the upright size; HEIC is taken through pillow-heif, and refused with
the package to install where it is missing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from daemon.common.settings import StoreSettings
from daemon.ingest.wire import Example, Limits, Reason, Rejection, parse
from daemon.learning.decoding import DecodePool
from edge.preprocess import load_rgb, resize_and_crop

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-tflite" / "bin" / "python"  # the device-like environment: no torch, numpy<2
SIZE = 224
PROPS = [("label", "Late blight")]
ROTATED_FOR_EXIF_6 = Image.Transpose.ROTATE_90  # how a phone held upright stores the picture, tagged 6


def daemon_limits(**changes: int) -> Limits:
    s = StoreSettings()
    defaults = Limits(
        max_image_bytes=s.max_image_bytes,
        max_image_pixels=s.max_image_pixels,
        max_full_decode_pixels=s.max_full_decode_pixels,
        max_label_chars=s.max_label_chars,
        holdout_fraction=s.holdout_fraction,
    )
    return replace(defaults, **changes)


def red_over_blue(width: int, height: int, seed: int, grain: int) -> Image.Image:
    """Upright: top half red, bottom half blue, with grain so that it compresses like a photo."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[: height // 2], pixels[height // 2 :] = (190, 40, 40), (40, 40, 190)
    pixels += rng.integers(0, grain, pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels)


def sideways(upright: Image.Image, fmt: str, quality: int) -> bytes:
    """``upright`` as a phone stores it: turned a quarter, tagged EXIF orientation 6 ("rotate 90 degrees to show").

    HEIF is written by pillow-heif itself, not through Pillow, so that only the code under test registers
    it with Pillow; it stores orientation 6 as HEIF's own rotation ('irot'), as iPhones do.
    """
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(ROTATED_FOR_EXIF_6)
    buf = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif.from_pillow(stored).save(buf, quality=quality, exif=exif.tobytes())
    else:
        stored.save(buf, format=fmt, quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@dataclass(frozen=True)
class Photo:
    upright: Image.Image
    data: bytes
    path: Path


@pytest.fixture(scope="module")
def phone_jpeg(tmp_path_factory) -> Photo:
    """5184 x 3456 (18 MP) at quality 95, as a phone held upright stores it: ~10 MB, made once (~1 s)."""
    upright = red_over_blue(3456, 5184, seed=1, grain=48)
    data = sideways(upright, "JPEG", quality=95)
    path = tmp_path_factory.mktemp("phone") / "IMG_0001.jpg"
    path.write_bytes(data)
    return Photo(upright, data, path)


@pytest.fixture(scope="module")
def phone_heic(tmp_path_factory) -> Photo:
    """A small HEIC (0.3 s to encode; 12 MP would take 40 s), sideways with orientation 6."""
    upright = red_over_blue(320, 480, seed=2, grain=30)
    data = sideways(upright, "HEIF", quality=90)
    path = tmp_path_factory.mktemp("phone") / "IMG_0002.heic"
    path.write_bytes(data)
    return Photo(upright, data, path)


def test_a_sideways_18_mp_phone_jpeg_is_accepted_with_its_upright_size_and_decodes_upright(phone_jpeg):
    assert len(phone_jpeg.data) > 6_000_000  # a real phone photo's size, over the old 8 MiB default even
    result = parse(phone_jpeg.data, PROPS, "image/jpeg", daemon_limits())
    assert isinstance(result, Example), result
    assert (result.width, result.height) == (3456, 5184)  # portrait, as it was taken; the file says 5184 x 3456
    rgb = load_rgb(phone_jpeg.data, SIZE)
    assert mean_difference(rgb, np.asarray(resize_and_crop(phone_jpeg.upright, SIZE))) < 1.5
    top, bottom = rgb[: SIZE // 4].mean(axis=(0, 1)), rgb[-SIZE // 4 :].mean(axis=(0, 1))
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100  # red over blue, not side by side


def test_the_learner_and_a_device_see_the_same_upright_pixels_and_a_jpeg_decodes_small(phone_jpeg, phone_heic):
    learner = DecodePool(SIZE, workers=0, slots=0).rgb([phone_jpeg.data, phone_heic.data])
    assert all(rgb is not None for rgb in learner)
    # The device side, in its own environment (edge[tflite]: no torch, numpy<2), on the same files.
    script = (
        "import hashlib, resource, sys, time\n"
        "from pathlib import Path\n"
        "from edge.preprocess import load_rgb\n"
        "for name in sys.argv[1:]:\n"
        "    data = Path(name).read_bytes()\n"
        "    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()\n"
        "    rgb = load_rgb(data, 224)\n"
        "    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "    print(hashlib.sha256(rgb.tobytes()).hexdigest(), f'{grew:.1f}', f'{time.perf_counter() - started:.3f}')\n"
    )
    assert DEVICE_PYTHON.exists(), f"{DEVICE_PYTHON} is missing: run scripts/setup.sh"
    out = subprocess.run(
        [DEVICE_PYTHON, "-c", script, phone_jpeg.path, phone_heic.path], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    (jpeg_hash, jpeg_mb, jpeg_s), (heic_hash, _, _) = (line.split() for line in out.stdout.splitlines())
    assert [jpeg_hash, heic_hash] == [hashlib.sha256(rgb.tobytes()).hexdigest() for rgb in learner]
    # Decoded at 1/8 scale: ~5 MB of memory (a full decode of 18 MP takes 140 MB) and ~0.1 s.
    assert float(jpeg_mb) < 30, f"decoding the 18 MP JPEG grew the device's memory by {jpeg_mb} MB in {jpeg_s} s"


def test_a_heic_photo_round_trips_through_both_message_forms_upright(phone_heic):
    result = parse(phone_heic.data, PROPS, "image/heic", daemon_limits())
    assert isinstance(result, Example), result
    assert result.content_type == "image/heic" and (result.width, result.height) == (320, 480)
    doc = {"label": "Late blight", "content_type": "image/heif", "image": base64.b64encode(phone_heic.data).decode()}
    from_json = parse(json.dumps(doc).encode(), None, None, daemon_limits())  # MQTT 3.1.1 senders
    assert isinstance(from_json, Example) and from_json.image == phone_heic.data, from_json
    rgb = load_rgb(phone_heic.data, 64)
    assert mean_difference(rgb, np.asarray(resize_and_crop(phone_heic.upright, 64))) < 3


def rejection(result: Example | Rejection, reason: Reason) -> str:
    assert isinstance(result, Rejection) and result.reason == reason, result
    return result.detail


def test_a_broken_or_mislabelled_heic_is_rejected_with_its_reason(phone_heic):
    data = phone_heic.data
    detail = rejection(parse(data, PROPS, "image/jpeg", daemon_limits()), Reason.CONTENT_TYPE_MISMATCH)
    assert "HEIF" in detail
    rejection(parse(data[: len(data) * 2 // 3], PROPS, "image/heic", daemon_limits()), Reason.TRUNCATED_IMAGE)
    mdat = data.index(b"mdat") + 4
    no_frame = data[:mdat] + bytes(32) + data[mdat + 32 :]  # the coded picture's first NAL unit zeroed
    rejection(parse(no_frame, PROPS, "image/heic", daemon_limits()), Reason.CORRUPT_IMAGE)


def test_past_the_byte_limit_or_the_full_decode_limit_a_photo_is_rejected(phone_jpeg, phone_heic):
    limit = daemon_limits().max_image_bytes
    assert limit == 16 * 1024 * 1024
    over = phone_jpeg.data + bytes(limit + 1 - len(phone_jpeg.data))  # still a JPEG, one byte too long
    assert str(limit) in rejection(parse(over, PROPS, "image/jpeg", daemon_limits()), Reason.TOO_LARGE)
    # HEIC decodes at full size, so it is bound like PNG and WebP; a 12 MP iPhone photo is within the default.
    assert 4032 * 3024 <= daemon_limits().max_full_decode_pixels
    small = daemon_limits(max_full_decode_pixels=320 * 480 - 1)
    assert "JPEG" in rejection(parse(phone_heic.data, PROPS, "image/heic", small), Reason.TOO_MANY_PIXELS)


def test_without_pillow_heif_heic_is_refused_with_the_package_to_install(phone_heic):
    # A fresh interpreter in which pillow-heif cannot be imported, as on a machine that lacks it.
    script = (
        "import io, sys\n"
        "sys.modules['pillow_heif'] = None\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "from daemon.ingest.wire import Limits, parse\n"
        "from edge.preprocess import load_rgb\n"
        "heic = Path(sys.argv[1]).read_bytes()\n"
        "limits = Limits(16 << 20, 50_000_000, 64, 0.1, 16_777_216)\n"
        "for content_type in ('image/heic', 'image/jpeg'):\n"
        "    r = parse(heic, [('label', 'x')], content_type, limits)\n"
        "    print(r.reason.value, '|', r.detail)\n"
        "print(load_rgb(heic, 64))\n"
        "jpeg = io.BytesIO()\n"
        "Image.new('RGB', (64, 48)).save(jpeg, format='JPEG')\n"
        "print(type(parse(jpeg.getvalue(), [('label', 'x')], 'image/jpeg', limits)).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, phone_heic.path], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    declared, mislabelled, decoded, jpeg = out.stdout.splitlines()
    assert declared.startswith("unsupported_content_type |") and "pip install pillow-heif" in declared
    assert mislabelled.startswith("not_an_image |") and "pillow-heif" in mislabelled
    assert decoded == "None" and jpeg == "Example"  # the other formats are untouched
