"""The deltas a new version carries: ``from-<base>.zst`` for each of the newest earlier versions on disk.

Each is the new model file as zstd "patch-from" against that base's model file (edge/delta.py), so a
device holding the base downloads kilobytes instead of the whole model. They are made before the new
version's folder is renamed into place and written into it, so a version is complete with its
deltas or absent: a SIGKILL at any instant never leaves a manifest naming a delta that is not there.
The manifest lists them under ``files["model.tflite"]["deltas"]``, keyed by base version, with the
size and sha256 a device checks before applying one (docs/devices.md).

Cost, measured on the demo's EfficientNet-Lite0 exports (2 cores): one :func:`edge.delta.make` per base,
~0.07 s for the 4.1 MB int8 file, ~0.14 s for the 7.0 MB fp16 one; a publish with the default three
bases took 0.22 s (int8) and 0.70 s (fp16) instead of 0.01-0.03 s, beside an export of tens of seconds.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.registry.layout import MODEL_FILE, RegistryError, UnknownVersionError
from edge.delta import FORMAT, make

if TYPE_CHECKING:
    from daemon.registry.versions import Registry

log = logging.getLogger("sprout.registry")

DELTA_FILE = re.compile(r"^from-([1-9][0-9]{0,9})\.zst$")  # what a version folder may hold besides its fixed files


def delta_name(base: int) -> str:
    return f"from-{base}.zst"


@dataclass(frozen=True)
class Deltas:
    files: dict[str, bytes]  # file name in the version's folder -> bytes
    entries: dict[str, dict[str, Any]]  # base version (as a JSON key) -> the manifest's entry


def make_deltas(registry: Registry, version: int, tflite: bytes, count: int) -> Deltas:
    """Deltas to ``version``'s ``tflite`` from each of the newest ``count`` earlier versions on disk.

    A base whose file does not match its own manifest is skipped (with a warning): a delta from bytes no
    device holds would only ever be refused. So is a delta no smaller than the file.
    """
    files: dict[str, bytes] = {}
    entries: dict[str, dict[str, Any]] = {}
    earlier = [v for v in registry.versions() if v < version]
    for base in reversed(earlier[-count:] if count > 0 else []):
        try:
            entry = registry.manifest(base)["files"][MODEL_FILE]
            old = registry.model_path(base).read_bytes()
        except (RegistryError, UnknownVersionError, KeyError, TypeError, OSError) as err:
            log.warning("registry %s: no delta from version %d: %s", registry.folder, base, err)
            continue
        if len(old) != entry.get("size") or hashlib.sha256(old).hexdigest() != entry.get("sha256"):
            log.warning(
                "registry %s: no delta from version %d: its model file does not match its manifest",
                registry.folder,
                base,
            )
            continue
        delta = make(old, tflite)
        if len(delta) >= len(tflite):  # nothing shared (another backbone, a new mode): the file itself is cheaper
            log.info(
                "registry %s: no delta from version %d: it would be no smaller than the file", registry.folder, base
            )
            continue
        name = delta_name(base)
        files[name] = delta
        entries[str(base)] = {
            "path": f"versions/{version}/{name}",
            "size": len(delta),
            "sha256": hashlib.sha256(delta).hexdigest(),
            "format": FORMAT,
        }
    return Deltas(files, entries)
