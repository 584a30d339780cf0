"""What a registry's writer repairs when it opens: whatever a killed writer left, at any instant.

A version folder is built under ``.tmp-<version>-<pid>`` and renamed whole, every other file is
written under a ``.tmp-*`` name, fsynced and renamed; so a SIGKILL leaves temporaries to remove, a
``latest`` (or ``latest.sig``) that may be stale or missing, and possibly a complete version whose
publish was never logged. The writer holds the registry's lock while these run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.registry.layout import (
    LATEST,
    LATEST_SIGNATURE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    VERSIONS,
    RegistryError,
    dump,
    parse,
)
from daemon.registry.signing import SignatureError, verify_file
from edge.atomic import TMP_PREFIX, write_atomic

if TYPE_CHECKING:
    from daemon.registry.versions import Registry

log = logging.getLogger("sprout.registry")


def recover(registry: Registry) -> None:
    """Undo what a killed writer left: temporaries, a missing or dangling ``latest``, a stale ``versions``."""
    stale = sorted(p.name for p in registry.folder.iterdir() if p.name.startswith(TMP_PREFIX))
    for name in stale:
        path = registry.folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        registry._append_log({"event": "cleaned", "removed": stale})
        log.warning("registry %s: removed %d leftovers of an interrupted write: %s", registry.folder, len(stale), stale)

    sign_unsigned_versions(registry)
    problem = latest_problem(registry)
    if problem is not None:
        repair_latest(registry, problem)
    finish_interrupted_publish(registry)

    current = registry.index()
    try:
        on_disk = json.loads((registry.folder / VERSIONS).read_bytes())
    except (FileNotFoundError, ValueError):
        on_disk = None
    if on_disk != current and (on_disk is not None or current):
        write_atomic(registry.folder / VERSIONS, dump(current))


def sign_unsigned_versions(registry: Registry) -> None:
    """Give each version that lacks manifest.json.sig one, over its manifest's bytes as they are.

    Registries written before signatures were detached (schema 1) carried the signature inside
    the manifest; this Sprout's devices check only manifest.json.sig. Without a signing key
    (a read-only command) nothing is signed and such versions stay unservable.
    """
    if registry.signer is None:
        return
    for version in registry.versions():
        where = registry._dir(version)
        if (where / SIGNATURE_FILE).exists() or not (where / MANIFEST_FILE).is_file():
            continue
        write_atomic(where / SIGNATURE_FILE, registry.signer.sign((where / MANIFEST_FILE).read_bytes()))
        registry._append_log(
            {
                "event": "signed",
                "version": version,
                "key_id": registry.signer.key_id,
                "reason": "manifest.json.sig was missing (a registry from before detached signatures)",
            }
        )
        log.info("registry %s: signed version %d's manifest as it is (manifest.json.sig)", registry.folder, version)


def finish_interrupted_publish(registry: Registry) -> None:
    """Complete a publish killed after its version folder was renamed into place (that rename commits it).

    Without this, a kill between the rename and the log left a verified version on disk that was
    never made latest (or was served as latest) and that the log did not know of.
    """
    events = registry.events()
    logged = {e.get("version") for e in events if e.get("event") == "published"}
    newest_known = max((e["version"] for e in events if isinstance(e.get("version"), int)), default=0)
    for version in registry.versions():
        if version in logged:
            continue
        try:
            manifest = registry.manifest(version)
            tflite = registry.model_path(version).read_bytes()
            verify_file(manifest, tflite)
        except (RegistryError, SignatureError):
            continue  # not one of ours to finish: left as it is, never made latest
        latest = registry._latest_or_none()
        # Newer than anything the log knows, rollbacks included: it was meant to be latest.
        if version > newest_known and (latest is None or latest.get("version") != version):
            registry._point_latest(version)
        registry._append_log(
            {
                "event": "published",
                "version": version,
                "sha256": hashlib.sha256(tflite).hexdigest(),
                "size": len(tflite),
                "quantization": manifest.get("quantization"),
                "recovered": "the publishing process stopped after the version was complete",
            }
        )
        log.warning("registry %s: finished the interrupted publish of version %d", registry.folder, version)


def latest_problem(registry: Registry) -> str | None:
    path = registry.folder / LATEST
    if not path.exists():
        return None if not registry.versions() else "latest is missing"
    try:
        document = path.read_bytes()
        latest = parse(document, path)
        version = latest["version"]
        verify_file(latest, registry.model_path(version).read_bytes())
        if document != (registry._dir(version) / MANIFEST_FILE).read_bytes():
            return f"latest is not a copy of version {version}'s manifest"
        if not (registry._dir(version) / SIGNATURE_FILE).exists() and registry.signer is None:
            return None  # a schema-1 registry opened without its key: the daemon signs it, not us
        if (registry.folder / LATEST_SIGNATURE).read_bytes() != registry.signature(version):
            return f"latest.sig is not version {version}'s signature"
    except FileNotFoundError as err:
        return f"{Path(err.filename).name} is missing"
    except (RegistryError, SignatureError, KeyError, TypeError) as err:
        return f"latest is unusable: {err}"
    return None


def repair_latest(registry: Registry, problem: str) -> None:
    # The version latest names first (a rollback stays a rollback), then the newest complete one.
    named = registry._latest_or_none()
    named = named.get("version") if isinstance(named, dict) else None
    versions = registry.versions()
    for version in [v for v in versions if v == named] + [v for v in reversed(versions) if v != named]:
        try:
            manifest = registry.manifest(version)
            verify_file(manifest, registry.model_path(version).read_bytes())
            if registry.signer is not None:
                registry.signature(version)
        except (RegistryError, SignatureError):
            continue
        registry._point_latest(version)
        registry._append_log({"event": "repaired", "version": version, "reason": problem})
        log.warning("registry %s: %s; latest is now version %d", registry.folder, problem, version)
        return
    (registry.folder / LATEST).unlink(missing_ok=True)
    (registry.folder / LATEST_SIGNATURE).unlink(missing_ok=True)
    registry._append_log({"event": "repaired", "version": None, "reason": f"{problem}; no complete version left"})
    log.error("registry %s: %s and no complete version is left; nothing is served", registry.folder, problem)
