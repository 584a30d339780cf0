"""Reading a model manifest as a device must: refuse anything this client cannot run correctly.

The manifest is the contract between the registry and the device (schema in
docs/manifest.schema.json): which file, its sha256 and size, the labels in
output order, and the input the model takes. A device that guesses at a field
it does not understand classifies wrongly without noticing, so every field the
device relies on is checked here. Fields it does not know are ignored: the
publisher adds informative fields without breaking installed apps, and
``schema`` changes only for a breaking change, which this client refuses
with a reason.

>>> m = parse(b'{"schema": 2, "model": "maize", "version": 3, "labels": ["healthy", "rust"],'
...           b' "input": {"shape": [1, 96, 96, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},'
...           b' "files": {"model.tflite": {"sha256": "' + b"ab" * 32 + b'", "size": 1000,'
...           b' "path": "versions/3/model.tflite"}}}', "maize")
>>> input_size(m), m["labels"][1]
(96, 'rust')
>>> parse(b'{"schema": 3}', "maize")
Traceback (most recent call last):
...
edge.manifest.ManifestError: manifest schema 3 is a breaking change this sprout-edge cannot read (it reads schema 2): upgrade sprout-edge
"""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

log = logging.getLogger("sprout.edge.manifest")

# Schema 2 moved the signature out of the manifest into manifest.json.sig. Schema-1 documents are
# still read: the registry that serves them signs their bytes (daemon/registry/versions.py).
SCHEMA = 2
MODEL_FILE = "model.tflite"


class Quantization(str, enum.Enum):  # noqa: UP042 - enum.StrEnum is 3.11; sprout-edge runs on 3.10
    """How a model's weights (and, for int8, activations) are stored: the manifest's ``quantization``.

    Informative for a device (every mode takes uint8 pixels and gives float32 probabilities), so a
    client does not refuse a mode it does not know. The exporter's modes and the settings' choices are
    these very members. A str: it compares, formats and serialises as its value.
    """

    INT8 = "int8"  # full-integer, calibrated; ~30% of float's size
    DYNAMIC = "dynamic"  # int8 weights, float activations
    FP16 = "fp16"  # half-size float weights
    NONE = "none"  # float32

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:  # f"{mode}" is "int8", on every Python the device may run
        return format(self.value, spec)


INPUT_DTYPES = ("uint8", "float32")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(Exception):
    """A manifest this client must not act on; the message names the field and what is wrong with it."""


def parse(document: bytes, model: str | None = None) -> dict[str, Any]:
    """The manifest in ``document`` (JSON bytes), checked; ``model`` is the name the caller asked for."""
    try:
        manifest = json.loads(document)
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest is not JSON ({err}): the server sent something else") from None
    if not isinstance(manifest, dict):
        raise ManifestError("manifest is not a JSON object: the server sent something else")
    check(manifest, model)
    return manifest


def check(manifest: dict[str, Any], model: str | None = None) -> None:
    """Raise :class:`ManifestError` unless ``manifest`` has every field a device relies on, well-formed."""
    schema = manifest.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ManifestError(
            f"manifest schema must be a positive integer, not {schema!r}: the server sent something else"
        )
    if schema > SCHEMA:
        raise ManifestError(
            f"manifest schema {schema} is a breaking change this sprout-edge cannot read (it reads "
            f"schema {SCHEMA}): upgrade sprout-edge"
        )
    if model is not None and manifest.get("model") != model:
        raise ManifestError(
            f"manifest is for model {manifest.get('model')!r}, but {model!r} was asked for: check the model name and the URL"
        )
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ManifestError(f"manifest version must be a positive integer, not {version!r}")
    labels = manifest.get("labels")
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x and not set(x) & {"\n", "\r"} for x in labels)
    ):
        raise ManifestError("manifest labels must be a non-empty list of class names (index = output index)")
    _check_input(manifest.get("input"))
    files = manifest.get("files")
    entry = files.get(MODEL_FILE) if isinstance(files, dict) else None
    if not isinstance(entry, dict):
        raise ManifestError("manifest has no files.model.tflite")
    size, digest, path = entry.get("size"), entry.get("sha256"), entry.get("path")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ManifestError(f"manifest files.model.tflite.size must be a positive byte count, not {size!r}")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise ManifestError("manifest files.model.tflite.sha256 must be 64 lowercase hex digits")
    # The path is where the file is fetched from: it must be this version's, or a manifest of version N
    # could make the device install the bytes of another version under N's name.
    if path != f"versions/{version}/{MODEL_FILE}":
        raise ManifestError(f"manifest files.model.tflite.path {path!r} is not version {version}'s model file")


def is_image_shape(shape: Any) -> TypeGuard[list[int]]:
    """Whether ``shape`` is [1, H, W, 3] with positive integers: one RGB image, NHWC (the registry checks it too)."""
    return (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        and shape[0] == 1
        and shape[3] == 3
    )


def _check_input(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ManifestError("manifest has no input description")
    shape = spec.get("shape")
    if not is_image_shape(shape):
        raise ManifestError(f"manifest input.shape must be [1, H, W, 3], not {shape!r}")
    if shape[1] != shape[2]:
        # Sprout's preprocessing crops the centre square; a rectangular input would need another recipe.
        raise ManifestError(f"manifest input is {shape[1]}x{shape[2]}; sprout-edge feeds square inputs only")
    if spec.get("layout") != "NHWC":
        raise ManifestError(f"manifest input.layout {spec.get('layout')!r}: sprout-edge feeds NHWC only")
    if spec.get("dtype") not in INPUT_DTYPES:
        raise ManifestError(f"manifest input.dtype {spec.get('dtype')!r} is not one of {list(INPUT_DTYPES)}")


def input_size(manifest: dict[str, Any]) -> int:
    """The side of the square image the model takes."""
    return int(manifest["input"]["shape"][1])


@dataclass(frozen=True)
class Delta:
    """A download delta to this version's model file from ``base`` (edge/delta.py applies it)."""

    base: int
    path: str  # relative to /v1/models/<model>/
    size: int
    sha256: str


DELTA_FORMAT = "zstd-patch"


def delta_from(manifest: dict[str, Any], base: int) -> Delta | None:
    """The manifest's delta from version ``base``, or None when it lists none usable.

    Optional and only an optimisation: a malformed entry (a publisher bug, a newer format) is logged
    and ignored, and the device downloads the full file, which :func:`check` vouched for.
    """
    listed = manifest["files"][MODEL_FILE].get("deltas")
    if listed is None:
        return None
    version = manifest["version"]
    entry = listed.get(str(base)) if isinstance(listed, dict) else None
    if entry is None:
        if not isinstance(listed, dict):
            log.warning("version %s: files.model.tflite.deltas is not an object; ignored, full download", version)
        return None
    why = _delta_problem(entry, version, base)
    if why is not None:
        log.warning("version %s: the delta from %d is unusable (%s); ignored, full download", version, base, why)
        return None
    return Delta(base, entry["path"], entry["size"], entry["sha256"])


def _delta_problem(entry: Any, version: int, base: int) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    if entry.get("format") != DELTA_FORMAT:
        return f"format {entry.get('format')!r} is not {DELTA_FORMAT!r}"
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"size {size!r} is not a positive byte count"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        return "sha256 is not 64 lowercase hex digits"
    # Like the model file's path: this version's own folder, so a manifest cannot point elsewhere.
    if entry.get("path") != f"versions/{version}/from-{base}.zst":
        return f"path {entry.get('path')!r} is not versions/{version}/from-{base}.zst"
    return None


def file_entry(manifest: dict[str, Any]) -> tuple[str, int, str]:
    """(path relative to /v1/models/<model>/, size, sha256) of the model file."""
    entry = manifest["files"][MODEL_FILE]
    return entry["path"], int(entry["size"]), entry["sha256"]
