"""A registry folder's names and file formats, its errors, and the times its log writes.

Layout of ``<state_dir>/registry/<model>/``::

    <version>/model.tflite, labels.txt, manifest.json, manifest.json.sig   one folder per version
    <version>/from-<base>.zst   download deltas from recent earlier versions (deltas.py), listed in the manifest
    latest      a byte copy of the latest version's manifest: the pointer and the document served
    latest.sig  a byte copy of that version's manifest.json.sig
    versions    JSON list of {version, created_at, quantization, pinned}, newest first
    pins        JSON list of pinned versions (retention never deletes them)
    log.jsonl   the model's history, one event per line with its time: published, rejected, rollback, pin,
                unpin, deleted, repaired, cleaned, signed, and label_renamed, label_merged, label_deleted
                (``sprout labels``, timed when the change was made)
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.registry.signing import SIGNATURE_SUFFIX
from edge.manifest import Quantization

# 2: the signature left the manifest for manifest.json.sig (a schema-1 reader cannot check it).
SCHEMA = 2
QUANTIZATIONS = tuple(q.value for q in Quantization)
# What publish() takes from the exporter; the registry sets the rest (schema, model, version,
# created_at, files, signing_key_id) so that no caller can get them wrong.
FIELDS = ("base", "labels", "input", "quantization", "metrics", "runtimes_verified")
MANIFEST_KEYS = (
    "schema", "model", "version", "created_at", "base", "labels", "input", "quantization",
    "files", "metrics", "runtimes_verified", "signing_key_id",
)  # fmt: skip
MODEL_FILE, LABELS_FILE, MANIFEST_FILE = "model.tflite", "labels.txt", "manifest.json"
SIGNATURE_FILE = MANIFEST_FILE + SIGNATURE_SUFFIX
LATEST, VERSIONS, PINS, LOG, LOCK = "latest", "versions", "pins", "log.jsonl", ".lock"
LATEST_SIGNATURE = LATEST + SIGNATURE_SUFFIX

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_DIR = re.compile(r"^[1-9][0-9]*$")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says what to do."""


class NoRegistryError(RegistryError):
    """Nothing was ever published for this model here."""


class UnknownVersionError(RegistryError, LookupError):
    """The version asked for is not (or no longer) on disk."""


def registry_root(state_dir: Path) -> Path:
    return Path(state_dir) / "registry"


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-05-09T07:35:25.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_time(at: float) -> str:
    """Unix time ``at`` as :func:`utc_now` writes times."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise RegistryError(f"{path}: not valid JSON ({err}); the registry's writer repairs it on start") from None


def dump(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON for the log: a rejected candidate may well carry a NaN metric."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
