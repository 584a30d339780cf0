"""Delta downloads: a new model file as zstd "patch-from", compressed against the old one as dictionary.

The registry (daemon/registry/deltas.py) writes, beside each new version's model.tflite, one
``from-<base>.zst`` per recent earlier version: a single zstd frame of the new file, compressed with
the base version's whole model file as a raw-content dictionary. A device that holds the base applies
it with any zstd decoder given that file as dictionary (prefix): Python ``zstandard`` (here),
Android's zstd-jni, the zstd C library on iOS, ``zstd -d --patch-from=<old>`` (docs/devices.md).
This module is shared by both sides, so what the registry writes is what the device reads.

In head mode only the classifier's weights change between versions. Measured on the demo's
EfficientNet-Lite0 exports at 128 px: fp16, 7,011,958 bytes, delta 24,162 bytes (0.34%), made in
~0.14 s; int8 with a tenth class added and recalibrated, 4,081,106 bytes, delta 64,893 (1.6%), ~0.07 s.
Applying one takes milliseconds.

>>> import os
>>> old = os.urandom(50_000); new = old[:20_000] + b"changed head" + old[20_000:]
>>> patch = make(old, new)
>>> len(patch) < 200, apply(old, patch, len(new)) == new
(True, True)
"""

from __future__ import annotations

import zstandard

FORMAT = "zstd-patch"  # the manifest's deltas[*].format: the only one there is
# Level 12 with the search tables sized to the dictionary (below) finds the long unchanged runs; lower
# levels' default tables are too small to see a 7 MB dictionary (level 3: 79% of the file, not 0.4%),
# higher ones cost seconds for the same bytes (level 19: 0.85 s, 24,162 bytes either way).
LEVEL = 12
# zstd's largest window on 64-bit decoders; zstd-jni and the CLI refuse frames above 2^27 (128 MB) unless
# told otherwise, which covers every model Sprout exports (a few MB).
MAX_WINDOW_LOG = 31
_MIN_WINDOW_LOG = 10


class DeltaError(Exception):
    """A delta that cannot be applied, or did not give the file it should; the caller downloads the full file."""


def window_log(old_size: int, new_size: int) -> int:
    """The window that reaches from the end of the new file back to the start of the old one."""
    return min(MAX_WINDOW_LOG, max(_MIN_WINDOW_LOG, (old_size + new_size).bit_length()))


def make(old: bytes, new: bytes, level: int = LEVEL) -> bytes:
    """One zstd frame of ``new`` compressed with ``old`` as raw-content dictionary, with its size and checksum."""
    wlog = window_log(len(old), len(new))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(new),
        window_log=wlog,
        # As `zstd --patch-from` does: tables large enough that matches anywhere in the old file are found.
        hash_log=min(wlog - 1, 30),
        chain_log=min(wlog - 1, 30),
        write_content_size=True,
        write_checksum=True,
    )
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(new)


def apply(old: bytes, delta: bytes, size: int) -> bytes:
    """The new file from ``old`` and ``delta``; :class:`DeltaError` unless it is a frame of exactly ``size`` bytes.

    The caller still checks the result's sha256 against the signed manifest: zstd's own checksum
    catches corruption, not a delta made from another base.
    """
    try:
        frame = zstandard.get_frame_parameters(delta)
    except zstandard.ZstdError as err:
        raise DeltaError(f"not a zstd frame ({err})") from None
    if frame.content_size != size:
        # Checked before decoding: the frame's declared size is what the decoder would allocate.
        raise DeltaError(f"the delta makes {frame.content_size} bytes, the manifest says {size}")
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    decoder = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << window_log(len(old), size))
    try:
        new = decoder.decompress(delta, max_output_size=size)
    except zstandard.ZstdError as err:
        raise DeltaError(f"zstd could not apply it ({err})") from None
    if len(new) != size:
        raise DeltaError(f"the delta made {len(new)} bytes, the manifest says {size}")
    return new
